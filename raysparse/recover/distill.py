"""Recovery by distillation from the dense model: the loss maths, and a loss for `fit`.

The dense model is where every trial starts, so it is always at hand as a teacher. Two
losses from the literature:

- `logits`: KL(teacher || student) of the next-token distributions at temperature T,
  scaled by T² so its gradients keep their size as T changes (Hinton et al.; Minitron's
  logit distillation).
- `squarehead`: the logit KL plus, for each chosen decoder layer, the MSE between the
  student's and the teacher's layer outputs divided by the teacher output's mean square
  (Kurtic et al., "Sparse Fine-tuning for Inference Acceleration of LLMs"): normalised so
  that every layer counts alike whatever the scale of its activations.

The total is `(1 - weight) * next_token + weight * distillation`, so `weight` 0 is plain
recovery and 1 is pure distillation. The teacher is frozen and only ever runs under
`no_grad`; a NaN or inf in its output stops the trial (its numbers would be garbage).

The teacher never changes and recovery revisits the same training windows every epoch and
every iteration, so its outputs can be kept per window (`TeacherOutputCache`) and the
teacher runs once per window per trial instead of once per step. Whether they fit is
decided up front from their size, so a trial either caches every window or none.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raysparse.recover.loop import LossFn, TrainingDiverged

DISTILL_MODES = ("none", "logits", "squarehead")


@dataclass
class DistillSettings:
    """How the recovery loss mixes in the teacher (see the module docstring)."""

    mode: str = "none"
    weight: float = 1.0
    temperature: float = 1.0
    layers: tuple[int, ...] | None = None  # decoder layers the feature loss compares; None = all

    @property
    def enabled(self) -> bool:
        return self.mode != "none" and self.weight > 0


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature`, times temperature²."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])  # padded vocabularies: compare the shared part
    student = F.log_softmax(student_logits[..., :vocab].float() / temperature, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """SquareHead's feature term: per layer MSE(student, teacher) / mean(teacher²), averaged over layers."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature loss needs the same non-empty set of layers ({len(student)} vs {len(teacher)})")
    terms = [F.mse_loss(s.float(), t.float()) / (t.float().pow(2).mean() + eps) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def select_layers(count: int, layers: Sequence[int] | None) -> list[int]:
    """The decoder layers the feature loss compares (all by default); negative indices count from the end."""
    if layers is None:
        return list(range(count))
    outside = [index for index in layers if not -count <= index < count]
    if outside:
        raise ValueError(f"--distill-layers names layer(s) {outside} outside 0..{count - 1}")
    return sorted({index % count for index in layers})


@contextlib.contextmanager
def layer_outputs(layers: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record each module's output hidden states (the first element when a layer returns a tuple)."""
    outputs: list[torch.Tensor] = []

    def hook(_module, _args, output):
        outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TeacherCost:
    """What the teacher cost this recovery: forward passes and their seconds, cache reuses."""

    forwards: int = 0
    seconds: float = 0.0
    reused: int = 0  # batches whose teacher outputs came from the cache


class TeacherOutputCache:
    """The teacher's logits (and chosen layers' outputs) per training window, on the CPU.

    Keyed by the window's tokens, so shuffled batches and later iterations find their rows.
    `budget_bytes` bounds the memory: the first batch tells the size of one window's outputs,
    and if all `windows` of them do not fit, nothing is cached (`enabled` turns False and
    `needed_bytes` says what it would have taken).
    """

    def __init__(self, windows: int, budget_bytes: int) -> None:
        self.windows, self.budget_bytes = windows, budget_bytes
        self.enabled = budget_bytes > 0 and windows > 0
        self.needed_bytes: int | None = None
        self._rows: dict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        return hashlib.blake2b(row.detach().cpu().numpy().tobytes(), digest_size=16).digest()

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for logits, feats in self._rows.values() for t in (logits, *feats))

    def get(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The batch's teacher outputs if every row is cached, else None."""
        if not self.enabled:
            return None
        rows = [self._rows.get(self._key(row)) for row in batch]
        if any(row is None for row in rows):
            return None
        logits = torch.stack([r[0] for r in rows]).to(batch.device)
        feats = [torch.stack([r[1][i] for r in rows]).to(batch.device) for i in range(len(rows[0][1]))]
        return logits, feats

    def put(self, batch: torch.Tensor, logits: torch.Tensor, feats: Sequence[torch.Tensor]) -> None:
        if not self.enabled:
            return
        if self.needed_bytes is None:
            per_window = sum(t[0].numel() * t.element_size() for t in (logits, *feats))
            self.needed_bytes = per_window * self.windows
            if self.needed_bytes > self.budget_bytes:
                self.enabled = False
                return
        for index, row in enumerate(batch):
            self._rows[self._key(row)] = (logits[index].detach().cpu().clone(),
                                          [f[index].detach().cpu().clone() for f in feats])

    def describe(self, cost: TeacherCost) -> str:
        """What was done, for the summary: cached (and its memory) or recomputed (and why)."""
        if self.enabled and self._rows:
            return (f"cached per window on the CPU ({self.stored_bytes / 2**20:.1f} MiB): {cost.forwards} teacher "
                    f"forwards, {cost.reused} batches reused")
        if self.needed_bytes is not None and self.needed_bytes > self.budget_bytes:
            return (f"recomputed every step: caching {self.windows} windows needs {self.needed_bytes / 2**20:.0f} MiB "
                    f"> --distill-cache-mb {self.budget_bytes / 2**20:.0f}")
        return "recomputed every step (--distill-cache-mb 0)" if self.budget_bytes <= 0 else "recomputed every step"


def distillation_loss(
    teacher: nn.Module,
    settings: DistillSettings,
    student_layers: Callable[[nn.Module], Sequence[nn.Module]],
    teacher_layers: Sequence[nn.Module],
    cost: TeacherCost | None = None,
    cache: TeacherOutputCache | None = None,
) -> LossFn:
    """A loss for `fit`: next-token loss mixed with the teacher's, and its parts for the history.

    `student_layers(model)` finds the student's decoder layers in whatever `fit` trains (a peft
    wrapper or an FSDP module hold the same layer modules as the plain model). `cache` must
    stay None when the teacher is sharded (FSDP): its forward is a collective every worker
    has to join, so no worker may skip it on a cache hit.
    """
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    features = settings.mode == "squarehead"
    chosen = select_layers(len(teacher_layers), settings.layers) if features else []
    cost = cost if cost is not None else TeacherCost()

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        started = time.perf_counter()
        cached = cache.get(batch) if cache is not None else None
        if cached is not None:
            teacher_logits, teacher_feats = cached
            cost.reused += 1
        else:
            with torch.no_grad(), layer_outputs([teacher_layers[i] for i in chosen]) as teacher_feats:
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            cost.forwards += 1
            if not torch.isfinite(teacher_logits).all():
                raise TrainingDiverged("the teacher's output holds NaN or inf: check --teacher (its weights or dtype); "
                                       "a student cannot learn from it")
            if cache is not None:
                cache.put(batch, teacher_logits, teacher_feats)
        cost.seconds += time.perf_counter() - started
        layers = student_layers(model)
        with layer_outputs([layers[i] for i in chosen]) as student_feats:
            out = model(input_ids=batch, labels=batch, use_cache=False)
        parts = {"next_token": out.loss, "kl": logit_kl(out.logits, teacher_logits, settings.temperature)}
        distill = parts["kl"]
        if features:
            parts["feature"] = feature_loss(student_feats, teacher_feats)
            distill = distill + parts["feature"]
        total = (1.0 - settings.weight) * out.loss + settings.weight * distill
        return total, {name: float(value.detach()) for name, value in parts.items()}

    return loss_fn


__all__ = ["DISTILL_MODES", "DistillSettings", "TeacherCost", "TeacherOutputCache", "distillation_loss", "feature_loss", "layer_outputs",
           "logit_kl", "select_layers"]
