"""Searches over profiles (one grid index per layer) at an exact total sparsity.

`evolve`: EvoPress's (1+lambda) level-switch search. Each generation makes `offspring`
children of the parent by budget-preserving mutations, scores all of them with few
validation windows, the best `survivors` with more, and the best child replaces the parent
when it beats it at the highest fidelity. `optuna_search`: an Optuna sampler (TPE or CMA-ES)
proposes a continuous grid position per layer, projected onto the budget. Both take an
`evaluate(profiles, windows) -> fitness list` (lower is better), so they run the same
in-process or on Ray actors.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tqdm.auto import tqdm

from raysparse.profile.levels import Bounds, mutate, project

logger = logging.getLogger(__name__)

Evaluate = Callable[[Sequence[Sequence[int]], int], list[float]]


@dataclass
class SearchResult:
    best: list[int]
    fitness: float  # at the highest fidelity
    curve: list[float] = field(default_factory=list)  # best fitness after each generation (highest fidelity)
    evaluations: dict[int, int] = field(default_factory=dict)  # windows -> profiles scored with that many
    scored: dict[tuple[int, ...], float] = field(default_factory=dict)  # every profile scored at the top fidelity

    def top(self, k: int) -> list[tuple[list[int], float]]:
        """The k best distinct profiles scored at the highest fidelity, best first."""
        return [(list(p), f) for p, f in sorted(self.scored.items(), key=lambda item: item[1])[:k]]


def evolve(start: Sequence[int], sizes: Sequence[int], num_levels: int, evaluate: Evaluate,
           fidelities: Sequence[int], survivors: int, generations: int, offspring: int, seed: int = 0,
           max_step: int = 1, bounds: Bounds | None = None) -> SearchResult:
    """(1+lambda) evolution with multi-fidelity selection; `fidelities` are increasing window counts."""
    rng = random.Random(seed)
    top = fidelities[-1]
    parent = list(start)
    parent_fit = evaluate([parent], top)[0]
    result = SearchResult(parent, parent_fit, [parent_fit], {top: 1}, {tuple(parent): parent_fit})
    bar = tqdm(range(generations), desc="profile search", leave=False)
    for _ in bar:
        children = {tuple(mutate(parent, sizes, num_levels, rng, max_step, bounds)) for _ in range(offspring)}
        candidates = [list(c) for c in children if list(c) != parent]
        for stage, windows in enumerate(fidelities):
            if not candidates:
                break
            scores = evaluate(candidates, windows)
            result.evaluations[windows] = result.evaluations.get(windows, 0) + len(candidates)
            if windows == top:
                result.scored.update({tuple(c): f for c, f in zip(candidates, scores)})
            order = sorted(range(len(candidates)), key=scores.__getitem__)
            keep = 1 if stage == len(fidelities) - 1 else max(1, survivors)
            best_scores = [scores[i] for i in order[:keep]]
            candidates = [candidates[i] for i in order[:keep]]
        if candidates and best_scores[0] < parent_fit:
            parent, parent_fit = candidates[0], best_scores[0]
        result.curve.append(parent_fit)
        bar.set_postfix(fitness=f"{parent_fit:.4g}")
    result.best, result.fitness = parent, parent_fit
    return result


def optuna_search(start: Sequence[int], target_idx: int, sizes: Sequence[int], num_levels: int, evaluate: Evaluate,
                  windows: int, trials: int, batch: int, sampler: str = "tpe", seed: int = 0,
                  bounds: Bounds | None = None) -> SearchResult:
    """Optuna over one continuous grid position per layer, projected to the budget of the uniform
    profile at `target_idx`; the `start` profile is the first proposal (and CMA-ES's mean), and
    `batch` proposals are scored together (in parallel on actors)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    limits = bounds if bounds is not None else [(0, num_levels - 1)] * len(sizes)
    first = {f"l{i}": float(level) for i, level in enumerate(start)}
    chosen = (optuna.samplers.CmaEsSampler(seed=seed, x0=first) if sampler == "cmaes"
              else optuna.samplers.TPESampler(seed=seed))
    study = optuna.create_study(direction="minimize", sampler=chosen)
    study.enqueue_trial(first)
    best, best_fit = list(start), float("inf")
    result = SearchResult(best, best_fit, [], {windows: 0})
    bar = tqdm(range(0, trials, batch), desc=f"profile search ({sampler})", leave=False)
    for _ in bar:
        asked = [study.ask() for _ in range(batch)]
        profiles = [project([t.suggest_float(f"l{i}", float(lo), float(hi)) for i, (lo, hi) in enumerate(limits)],
                            sizes, num_levels, target_idx, limits) for t in asked]
        scores = evaluate(profiles, windows)
        result.evaluations[windows] += len(profiles)
        for trial, profile, score in zip(asked, profiles, scores):
            study.tell(trial, score)
            result.scored[tuple(profile)] = score
            if score < best_fit:
                best, best_fit = profile, score
        result.curve.append(best_fit)
        bar.set_postfix(fitness=f"{best_fit:.4g}")
    result.best, result.fitness = best, best_fit
    return result
