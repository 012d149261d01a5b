"""Fitness of a profile on validation windows (never the test text), lower is better.

"kl": KL divergence of the assembled model's next-token distributions to the dense model's
(EvoPress's choice: a dense signal from every vocabulary entry, low variance on few tokens).
"ce": next-token cross-entropy of the text itself, i.e. log validation perplexity: what the
rescoring and the user finally judge by. Near a strong heuristic the two can disagree (a
profile closer to dense in KL with a higher perplexity), so a search may need the latter.

The dense log-probabilities (KL only) are computed once; a candidate costs one forward pass
over the first `n` windows, so the number of windows is the fidelity of a multi-fidelity search.
An evaluator runs in-process or as a Ray actor (`remote_evaluators`), each holding its own
copy of the model and reading the database from the object store.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from raysparse.models.adapters import get_adapter
from raysparse.profile.database import DenseWeights, LayerEntry, ProfileAssembler


@torch.no_grad()
def log_probs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """(n, seqlen, vocab) next-token log-probabilities, float32 on the CPU."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        logits = model(input_ids=windows[start:start + batch_size].to(device), use_cache=False).logits
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def kl_to_reference(model: torch.nn.Module, windows: torch.Tensor, reference: torch.Tensor, n: int,
                    batch_size: int, device: torch.device) -> float:
    """Mean per-token KL(dense || model) over the first `n` windows; `reference` is the dense
    model's `log_probs` on the same windows."""
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        logits = model(input_ids=windows[start:stop].to(device), use_cache=False).logits
        mine = F.log_softmax(logits.float(), dim=-1).cpu()
        ref = reference[start:stop]
        total += float((ref.exp() * (ref - mine)).sum())
        count += ref.shape[0] * ref.shape[1]
    return total / count


FITNESSES = ("kl", "ce")


@torch.no_grad()
def cross_entropy(model: torch.nn.Module, windows: torch.Tensor, n: int, batch_size: int,
                  device: torch.device) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over the first `n` windows."""
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start:min(start + batch_size, n)].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


def fitness(model: torch.nn.Module, windows: torch.Tensor, reference: torch.Tensor | None, n: int,
            batch_size: int, device: torch.device) -> float:
    """KL to the dense `reference` log-probabilities, or cross-entropy when there is none."""
    if reference is None:
        return cross_entropy(model, windows, n, batch_size, device)
    return kl_to_reference(model, windows, reference, n, batch_size, device)


class ProfileEvaluator:
    """Assembles profiles into one model and scores them: KL to the dense `reference`, or
    cross-entropy when `reference` is None."""

    def __init__(self, model: torch.nn.Module, database: Sequence[LayerEntry], windows: torch.Tensor,
                 reference: torch.Tensor | None, batch_size: int = 4, device: torch.device | str = "cpu",
                 dense: DenseWeights | None = None):
        self.model = model.eval()
        self.device = torch.device(device)
        self.assembler = ProfileAssembler(get_adapter(model), database, dense)
        self.windows, self.reference, self.batch_size = windows, reference, batch_size

    def score(self, profile: Sequence[int], windows: int) -> float:
        """The fitness of the assembled profile over the first `windows` validation windows."""
        self.assembler.apply(profile)
        return fitness(self.model, self.windows, self.reference, windows, self.batch_size, self.device)

    def score_many(self, profiles: Sequence[Sequence[int]], windows: int) -> list[float]:
        return [self.score(p, windows) for p in profiles]


class _RemoteEvaluator:
    """A Ray actor: loads its own copy of the model, reads the database from the object store."""

    def __init__(self, model: str, dtype: str, trust_remote_code: bool, database: Any, windows: torch.Tensor,
                 reference: torch.Tensor | None, batch_size: int):
        from raysparse.models.loading import load_model

        torch.set_num_threads(1)
        loaded = load_model(model, "cpu", dtype, trust_remote_code)
        self.evaluator = ProfileEvaluator(loaded.model, database, windows, reference, batch_size)

    def score_many(self, profiles: Sequence[Sequence[int]], windows: int) -> list[float]:
        return self.evaluator.score_many(profiles, windows)


class ParallelEvaluator:
    """Scores a batch of profiles on `workers` Ray actors (round-robin), or in-process when given one evaluator."""

    def __init__(self, local: ProfileEvaluator | None = None, actors: list | None = None):
        self.local, self.actors = local, actors or []

    def __call__(self, profiles: Sequence[Sequence[int]], windows: int) -> list[float]:
        if not self.actors:
            assert self.local is not None
            return self.local.score_many(profiles, windows)
        import ray

        shares = [list(range(i, len(profiles), len(self.actors))) for i in range(len(self.actors))]
        refs = [actor.score_many.remote([profiles[j] for j in share], windows)
                for actor, share in zip(self.actors, shares) if share]
        results: list[float] = [0.0] * len(profiles)
        for share, values in zip([s for s in shares if s], ray.get(refs)):
            for j, value in zip(share, values):
                results[j] = value
        return results


def remote_evaluators(workers: int, model: str, dtype: str, trust_remote_code: bool, database: Sequence[LayerEntry],
                      windows: torch.Tensor, reference: torch.Tensor | None, batch_size: int) -> list:
    """`workers` evaluator actors sharing one copy of the database in the object store."""
    import ray

    database_ref = ray.put(list(database))
    actor = ray.remote(num_cpus=1)(_RemoteEvaluator)
    return [actor.remote(model, dtype, trust_remote_code, database_ref, windows, reference, batch_size)
            for _ in range(workers)]
