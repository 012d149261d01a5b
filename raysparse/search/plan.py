"""`launch/search.py --plan`: what a search will ask of the cluster and how long it will take.

Printed before anything is launched, so an operator sizes the cluster (or the space)
instead of discovering after an hour that trials queue for GPUs that never come. The
resource arithmetic is the one the search itself uses (a Tune trial holds
`--cpus-per-trial`/`--gpus-per-trial`; with `workers > 1` it is a Train driver and its
FSDP workers each hold 1 CPU, plus 1 GPU when the trial's device is CUDA). The time is
measured, not guessed: one warm-up run of the space's first configuration, on the
cluster with a trial's resources, stopped after its first iteration (model load, data,
dense evaluation and one prune + recover + evaluate step), scaled by the schedule's
iteration count and by how many waves of concurrent trials `--num-samples` needs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import socket
import time
from dataclasses import dataclass
from typing import Any

from raysparse.errors import RaysparseError
from raysparse.search.runner import _check_resources, _connect, max_workers
from raysparse.search.space import SearchSpace
from raysparse.search.space_file import load_space
from raysparse.sparsity.schedule import sparsity_schedule
from raysparse.trial.runner import run_trial

logger = logging.getLogger(__name__)


@dataclass
class TrialResources:
    """What one trial holds while it runs."""

    trial_cpu: float
    trial_gpu: float
    workers: int
    worker_cpu: float = 1.0
    worker_gpu: float = 0.0

    @property
    def cpu(self) -> float:
        return self.trial_cpu + (self.workers * self.worker_cpu if self.workers > 1 else 0.0)

    @property
    def gpu(self) -> float:
        return self.trial_gpu + (self.workers * self.worker_gpu if self.workers > 1 else 0.0)


def trial_resources(space: SearchSpace, cpus_per_trial: float, gpus_per_trial: float) -> TrialResources:
    """Per-trial resources for the largest worker count the space can ask for."""

    workers = max_workers(space)
    device = str(space.fixed.get("device", "auto"))
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus_per_trial > 0)
    return TrialResources(trial_cpu=cpus_per_trial, trial_gpu=gpus_per_trial, workers=workers,
                          worker_gpu=1.0 if on_gpu else 0.0)


def concurrent_trials(resources: TrialResources, nodes: list[dict[str, float]]) -> int:
    """How many trials the nodes hold at once.

    A single-process trial is one bundle and must fit on one node; a Train-in-Tune trial's
    workers are separate actors that may spread over nodes, so its limit is the cluster total.
    """
    def fit(capacity: float, need: float) -> float:
        return math.inf if need <= 0 else math.floor(capacity / need + 1e-9)

    if resources.workers <= 1:
        return int(sum(min(fit(n.get("CPU", 0.0), resources.cpu), fit(n.get("GPU", 0.0), resources.gpu))
                       for n in nodes))
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    return int(min(fit(total_cpu, resources.cpu), fit(total_gpu, resources.gpu)))


class _WarmupDone(Exception):
    """Raised by the warm-up's reporter after the first iteration: the rest is extrapolated."""


def _warmup(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Run a trial until its first iteration is reported; return where the time went."""

    started = time.perf_counter()
    first: dict[str, Any] = {}

    def reporter(record: dict[str, Any]) -> None:
        first.update(record, reported_at=time.perf_counter() - started)
        raise _WarmupDone

    try:
        run_trial(config_dict, reporter=reporter)
    except _WarmupDone:
        pass
    if not first:  # cannot happen for a valid schedule (at least one iteration); say so if it does
        raise RuntimeError("the warm-up trial finished without reporting an iteration")
    iteration_s = float(first.get("time_s") or 0.0)
    return {"setup_s": max(0.0, first["reported_at"] - iteration_s), "iteration_s": iteration_s,
            "reported_at": first["reported_at"], "host": socket.gethostname(), "params": first.get("params_total")}


def iteration_range(space: SearchSpace, config) -> tuple[int, int]:
    """Fewest and most iterations a trial of the space runs (the prune percentage's extremes)."""
    if config.schedule != "iterative":
        return 1, 1
    spec = space.params.get("prune_percentage")
    percentages = [spec.low, spec.top()] if spec is not None and spec.kind != "choice" else (
        list(spec.choices) if spec is not None else [config.prune_percentage])
    counts = [len(sparsity_schedule("iterative", config.pattern.ratio, float(p), 0.0, config.max_iterations))
              for p in percentages]
    return min(counts), max(counts)


def make_plan(settings) -> dict[str, Any]:
    """Resources, concurrency and a measured time estimate for `settings`; launches no trial."""
    import ray

    settings.validate()
    space = load_space(settings.space)
    _connect(settings)
    _check_resources(settings, space)
    resources = trial_resources(space, settings.cpus_per_trial, settings.gpus_per_trial)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = concurrent_trials(resources, nodes)
    if settings.driver_resource:  # each trial also holds one unit of it
        fits = min(fits, int(sum(node.get(settings.driver_resource, 0.0) for node in nodes)))
    concurrency = max(1, min(fits, settings.max_concurrent, settings.num_samples))

    first = {name: spec.first() for name, spec in space.params.items()}
    config = space.sample_config(first)
    low, high = iteration_range(space, config)
    warm = dataclasses.replace(config, output=None, save=False, stats_cache=None)
    task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial, max_retries=0)(_warmup)
    started = time.perf_counter()
    try:
        measured = ray.get(task.remote(warm.to_dict()))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), RaysparseError) else None
        if cause is not None:
            raise cause from None
        raise
    measured["wall_s"] = time.perf_counter() - started
    # Scheduling and worker start-up, measured on the warm-up task: every trial pays it too.
    measured["overhead_s"] = max(0.0, measured["wall_s"] - measured.pop("reported_at"))
    waves = math.ceil(settings.num_samples / concurrency)
    per_trial = [measured["overhead_s"] + measured["setup_s"] + n * measured["iteration_s"] for n in (low, high)]
    return {
        "space": space.source, "model": config.model, "num_samples": settings.num_samples,
        "resources": dataclasses.asdict(resources) | {"cpu": resources.cpu, "gpu": resources.gpu},
        "cluster": {"nodes": len(nodes), "cpu": sum(n.get("CPU", 0.0) for n in nodes),
                    "gpu": sum(n.get("GPU", 0.0) for n in nodes)},
        "fits": fits, "concurrency": concurrency, "max_concurrent": settings.max_concurrent,
        "warmup": measured | {"config": {k: first[k] for k in first}, "iterations": (low, high)},
        "per_trial_s": per_trial, "waves": waves, "total_s": [waves * t for t in per_trial],
        "at_scale": {f"{p / 1e9:g}B": scale_per_trial(per_trial[1], measured["params"], [p])[0] for p in SCALE_TARGETS}
        if measured.get("params") else None,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    r, c, w = plan["resources"], plan["cluster"], plan["warmup"]
    per_trial = f"{r['trial_cpu']:g} CPU" + (f" + {r['trial_gpu']:g} GPU" if r["trial_gpu"] else "")
    if r["workers"] > 1:
        per_trial = (f"{per_trial} for the trial (Train driver) + {r['workers']} FSDP workers x "
                     f"({r['worker_cpu']:g} CPU" + (f" + {r['worker_gpu']:g} GPU" if r["worker_gpu"] else "") + ")")
    low, high = w["iterations"]
    iterations = f"{low}" if low == high else f"{low}-{high}"
    span = lambda pair: _duration(pair[0]) if abs(pair[1] - pair[0]) < 1 else f"{_duration(pair[0])} - {_duration(pair[1])}"  # noqa: E731
    return "\n".join([
        f"plan for {plan['space']} (model {plan['model']}), {plan['num_samples']} trials; nothing launched",
        f"per trial        {per_trial} = {r['cpu']:g} CPU, {r['gpu']:g} GPU",
        f"cluster          {c['nodes']} node(s), {c['cpu']:g} CPU, {c['gpu']:g} GPU: {plan['fits']} trial(s) fit at once; "
        f"running {plan['concurrency']} (--max-concurrent {plan['max_concurrent']})",
        f"warm-up          on {w['host']}: load + data + dense eval {w['setup_s']:.1f} s, first iteration "
        f"{w['iteration_s']:.1f} s, scheduling + start-up {w['overhead_s']:.1f} s; config {w['config']}",
        f"per trial time   {span(plan['per_trial_s'])} ({iterations} iterations at the warm-up config's cost per "
        "iteration; more epochs or steps per iteration cost more)",
        f"total            {span(plan['total_s'])} ({plan['waves']} wave(s) of {plan['concurrency']}); an upper bound: "
        "early stopping cuts many trials at a rung (a sparsity milestone, or a recovery epoch)",
    ] + (["at scale         one trial of the same settings ~ " + ", ".join(
        f"{name} {_duration(s)}" for name, s in plan["at_scale"].items()) + " on this hardware (time grows with "
        "parameters x tokens: tests/benchmarks/bench_scale_model.py)"] if plan.get("at_scale") else []))


# The reference protocol a trial at scale is estimated for (SparseGPT/Wanda papers' settings).
SCALE_TARGETS = (1e9, 8e9)

SCALE_PROTOCOL = {"calib_tokens": 128 * 2048, "eval_tokens": 2 * 141 * 2048, "train_tokens": 100 * 8 * 2048}


def scale_trial_estimate(measured: dict[str, Any], targets: list[float],
                         protocol: dict[str, int] | None = None) -> dict[str, Any]:
    """One trial's seconds at `targets` parameters, from a model measured by bench_scale_model.

    Forward time grows with parameters x tokens, and the benchmark measures every phase as a
    multiple of one forward over the same tokens (multiples that stay put from 0.3M to 135M
    parameters there), so a phase at P parameters costs its multiple x (forward seconds per
    token per parameter, measured) x P x its tokens. A trial here: dense and pruned evaluation
    (`eval_tokens`), one-pass Wanda over `calib_tokens`, one recovery epoch over `train_tokens`.
    Same device and dtype as the measurement; attention's growth with the window is ignored.
    """
    protocol = protocol or SCALE_PROTOCOL
    phases = measured["phases"]
    per_token_param = measured["forward_s"] / (measured["calib_windows"] * measured["seqlen"] * measured["params"])
    recovery = next(v for k, v in phases.items() if k.startswith("recovery"))
    multiples = {"eval": phases["dense eval"]["x_forward"], "prune": phases["wanda (one-pass)"]["x_forward"],
                 "recover": recovery["x_forward"]}
    tokens = {"eval": protocol["eval_tokens"], "prune": protocol["calib_tokens"], "recover": protocol["train_tokens"]}
    rows = [{"params": p, "trial_s": sum(multiples[k] * per_token_param * p * tokens[k] for k in multiples),
             "phases_s": {k: multiples[k] * per_token_param * p * tokens[k] for k in multiples}} for p in targets]
    return {"from": measured["model"], "multiples": multiples, "protocol": protocol, "rows": rows,
            "note": f"From {measured['model']} ({measured['params'] / 1e6:.0f}M parameters, same device and dtype): "
                    f"{protocol['calib_tokens']} calibration tokens (one-pass Wanda), {protocol['eval_tokens']} "
                    f"evaluation tokens (dense + pruned), one recovery epoch of {protocol['train_tokens']} tokens."}


def scale_per_trial(per_trial_s: float, params: int, targets: list[float]) -> list[float]:
    """`--plan`'s warm-up trial time carried to `targets` parameters (time ~ parameters x tokens)."""
    return [per_trial_s * target / params for target in targets]
