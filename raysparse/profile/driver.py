"""`launch/profile_search.py`: build (or load) the layer database, search a profile, write it.

Thin: the maths lives in levels.py / search.py, the database in database.py, the fitness in
fitness.py. The database goes through the statistics cache at `storage` (a folder or URI),
so a second search on the same model, data and grid only loads it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.paths import write_json_atomic
from raysparse.profile.fitness import FITNESSES
from raysparse.profile.levels import Grid, parse_levels, same_ratios, snap, target_index, weighted_sparsity
from raysparse.profile.plot import write_plot

logger = logging.getLogger(__name__)

SEARCHES = ("evolution", "tpe", "cmaes")
STARTS = ("uniform", "best")
DATABASES = ("dense", "anchored")


@dataclass
class ProfileOptions:
    """The search's own settings (the pruning and data settings are a TrialConfig's)."""

    levels: str | None = None
    search: str = "evolution"
    generations: int = 40
    offspring: int = 16
    survivors: int = 4
    fidelity: str = "2,8"  # validation windows: many candidates on the first count, survivors on the last
    # "kl" to the dense model's outputs, or "ce" (validation cross-entropy); the record's `kl*`
    # fields hold whichever was searched on
    fitness: str = "kl"
    max_step: int = 1
    trials: int = 200  # Optuna proposals
    workers: int = 0  # Ray actors scoring candidates (0: in-process)
    storage: str | None = None  # the database cache; default --stats-cache, else OUTPUT/layer_db
    compare: bool = True  # also compute importance / OWL profiles for the plot
    rescore: int = 0  # re-prune the best K profiles and every start candidate sequentially; best validation ppl wins
    # Where the search starts: "uniform"; "best" (the lowest validation KL among uniform and the
    # importance / OWL profiles at each of start_alphas); or a layer-ratios JSON file.
    start: str = "uniform"
    start_alphas: str | None = None  # comma list; default the config's --alpha
    # "dense": entries calibrated on the dense model's inputs, one grid for every layer (EvoPress);
    # "anchored": the grid is centred on the start profile (chosen first, by the sequential
    # prune's validation perplexity when "best") and entries see the inputs its prune gives.
    database: str = "dense"
    rescore_seeds: int = 1  # calibration draws per rescored candidate, ranked by their mean validation ppl
    rounds: int = 1  # > 1: re-centre the anchored database on each round's winner and search again (rounds.py)
    # sequential prunes measured by earlier rounds (rounds.py): a candidate with the same ratios is not pruned again
    known_rows: tuple[dict[str, Any], ...] = ()

    def alphas(self, default: float) -> list[float]:
        if not self.start_alphas:
            return [default]
        try:
            values = [float(a) for a in str(self.start_alphas).split(",") if a.strip()]
        except ValueError:
            raise ConfigError(f"--start-alphas {self.start_alphas!r}: give comma-separated numbers, e.g. "
                              "0.25,0.5,1") from None
        if not values or any(not a >= 0 for a in values):
            raise ConfigError(f"--start-alphas {self.start_alphas!r}: give comma-separated numbers >= 0")
        return values

    def fidelities(self) -> list[int]:
        try:
            values = [int(v) for v in str(self.fidelity).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--fidelity {self.fidelity!r}: give increasing window counts, e.g. 2,8") from None
        if not values or any(v < 1 for v in values) or values != sorted(set(values)):
            raise ConfigError(f"--fidelity {self.fidelity!r}: give increasing window counts >= 1, e.g. 2,8")
        return values


def check_profile_request(config: TrialConfig, options: ProfileOptions) -> list[float]:
    """Everything refusable before a model is loaded; returns the level grid."""
    config.validate()
    if config.pattern.is_nm:
        raise ConfigError(f"a profile search needs a fractional sparsity: the N:M pattern {config.sparsity} is "
                          "fixed per layer, there is no profile to search")
    if config.method not in ("wanda", "sparsegpt"):
        raise ConfigError(f"a profile search prunes with wanda or sparsegpt, not {config.method}: its database "
                          "holds calibrated layers")
    if config.pruning_strategy != "uniform" or config.layer_ratios:
        raise ConfigError("a profile search finds the per-layer ratios itself: drop --pruning-strategy / "
                          "--layer-ratios")
    if config.schedule != "oneshot" or config.recovery != "none":
        raise ConfigError("a profile search scores one-shot pruning: use --schedule oneshot --recovery none, then "
                          "recover with launch/prune.py or launch/search.py --layer-ratios best_profile.json")
    if options.search not in SEARCHES:
        raise ConfigError(f"--search {options.search}: choose one of {', '.join(SEARCHES)}")
    if options.search == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError("--search cmaes needs the cmaes package (Optuna's CMA-ES): pip install cmaes, "
                              "or use --search tpe")
    if options.fitness not in FITNESSES:
        raise ConfigError(f"--fitness {options.fitness}: choose one of {', '.join(FITNESSES)}")
    if options.database not in DATABASES:
        raise ConfigError(f"--database {options.database}: choose one of {', '.join(DATABASES)}")
    if options.rescore < 0:
        raise ConfigError(f"--rescore must be >= 0, got {options.rescore}")
    if options.rescore_seeds < 1:
        raise ConfigError(f"--rescore-seeds must be >= 1, got {options.rescore_seeds}")
    if options.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {options.rounds}")
    if options.rounds > 1 and (options.database != "anchored" or options.rescore < 1):
        raise ConfigError("--rounds re-centres an anchored database on each round's winner, chosen by rescoring: "
                          "add --database anchored and --rescore K (e.g. 4)")
    for name in ("generations", "offspring", "survivors", "max_step", "trials"):
        if getattr(options, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.workers < 0:
        raise ConfigError(f"--eval-workers must be >= 0, got {options.workers}")
    options.fidelities()
    options.alphas(config.alpha)
    if options.start not in STARTS:
        from raysparse.config.layer_ratios import read_layer_ratios

        read_layer_ratios(options.start)  # a file: refused here when missing or malformed
    if not (config.output or options.storage or config.stats_cache):
        raise ConfigError("a profile search needs --output (best_profile.json, plot, and by default the database)")
    return parse_levels(options.levels, config.target_ratio)


def _validation_windows(stream: torch.Tensor, seqlen: int, count: int) -> torch.Tensor:
    available = stream.numel() // seqlen
    if available < count:
        raise ConfigError(f"the validation text holds {available} windows of {seqlen} tokens, the search's "
                          f"highest fidelity needs {count}: lower --fidelity or --eval-seqlen, or give more text")
    return stream[:count * seqlen].view(count, seqlen)


def heuristic_profiles(ctx, config: TrialConfig, sizes: list[int], alphas: list[float]) -> dict[str, list[float]]:
    """The importance (removal, inverse) and OWL (inverse) profiles at each alpha; the scores are
    computed once per method. Labels are `importance` / `owl` with one alpha, else `owl a=0.5`."""
    import dataclasses

    from raysparse.data.sources import calibration_windows, resolve_source, token_stream
    from raysparse.sparsity.allocate import allocate_ratios
    from raysparse.sparsity.importance import compute_importance

    source = resolve_source(ctx.settings.calib_data, "calibration")
    windows = calibration_windows(token_stream(ctx.loaded.tokenizer, source), config.importance_samples,
                                  ctx.settings.seqlen, config.seed)
    out = {}
    for label, method in (("importance", "removal"), ("owl", "owl")):
        cfg = dataclasses.replace(config, importance_method=method)
        scores = compute_importance(ctx.loaded.adapter, windows, method, cfg.model, cfg.seed, source.describe(),
                                    cfg.calib_batch_size, cfg.owl_m).scores
        for alpha in alphas:
            name = label if len(alphas) == 1 else f"{label} a={alpha:g}"
            out[name] = allocate_ratios(scores, config.target_ratio, "inverse", alpha, config.min_pruning_rate,
                                        config.max_pruning_rate, layer_sizes=sizes)
    return out


def choose_start(options: ProfileOptions, config: TrialConfig, heuristics: dict[str, list[float]],
                 levels: list[float], sizes: list[int], evaluate, windows: int,
                 fingerprint: str | None) -> tuple[str, list[int], dict[str, float], dict[str, list[int]]]:
    """The profile the search starts from, snapped onto the grid at exactly the target, the KL of
    each candidate and the candidates. With "best", every candidate is scored once at the highest
    fidelity on validation windows and the lowest KL wins: the search then only has to improve
    on the best heuristic, not rediscover it."""
    from raysparse.config.layer_ratios import check_layer_ratios, read_layer_ratios

    target_idx = target_index(levels, config.target_ratio)
    uniform = [target_idx] * len(sizes)
    if options.start == "uniform":
        return "uniform", uniform, {}, {"uniform": uniform}
    if options.start != "best":
        ratios = check_layer_ratios(read_layer_ratios(options.start), options.start, len(sizes), fingerprint, sizes,
                                    config.target_ratio)
        start = snap(ratios, levels, sizes, target_idx)
        return options.start, start, {}, {options.start: start}
    candidates = {"uniform": uniform, **{name: snap(r, levels, sizes, target_idx) for name, r in heuristics.items()}}
    names = list(candidates)
    scores = evaluate([candidates[n] for n in names], windows)
    kls = dict(zip(names, scores))
    best = min(names, key=kls.__getitem__)
    logger.info("search starts from %s (validation fitness %s)", best,
                ", ".join(f"{n} {k:.4g}" for n, k in kls.items()))
    return best, candidates[best], kls, candidates


def choose_anchor(ctx, config: TrialConfig, options: ProfileOptions, heuristics: dict[str, list[float]],
                  sizes: list[int], fingerprint: str | None, restore_dense, windows: torch.Tensor,
                  reference: torch.Tensor | None) -> tuple[str, list[float], list[dict[str, Any]]]:
    """The profile an anchored database is centred on, its name, and the sequential prunes that
    chose it (best validation perplexity first; empty when there was nothing to choose). With
    "best" every candidate (uniform, each heuristic as it is) is pruned once as launch/prune.py
    would: the anchor must be the best heuristic on the measure that decides, since the
    search explores around it."""
    from raysparse.config.layer_ratios import check_layer_ratios, read_layer_ratios
    from raysparse.profile.rescore import rescore

    uniform = [config.target_ratio] * len(sizes)
    if options.start == "uniform":
        return "uniform", uniform, []
    if options.start != "best":
        ratios = check_layer_ratios(read_layer_ratios(options.start), options.start, len(sizes), fingerprint, sizes,
                                    config.target_ratio)
        return options.start, [float(r) for r in ratios], []
    candidates = [{"name": name, "profile": None, "ratios": list(r), "kl": None}
                  for name, r in {"uniform": uniform, **heuristics}.items()]
    rows = rescore(ctx, config, restore_dense, candidates, windows, reference, options.rescore_seeds)
    logger.info("the anchored database is centred on %s (validation perplexity %s)", rows[0]["name"],
                ", ".join(f"{r['name']} {r['val_ppl']:.4g}" for r in rows))
    return rows[0]["name"], rows[0]["ratios"], rows


def run_profile_search(config: TrialConfig, options: ProfileOptions) -> dict[str, Any]:
    """The whole search; returns its record (also written to OUTPUT/profile_search.json)."""
    from raysparse.config.layer_ratios import write_layer_ratios
    from raysparse.models.fingerprint import model_fingerprint
    from raysparse.profile.database import DenseWeights, build_database
    from raysparse.profile.fitness import ParallelEvaluator, ProfileEvaluator, log_probs, remote_evaluators
    from raysparse.profile.rescore import rescore, rescore_candidates
    from raysparse.profile.search import evolve, optuna_search
    from raysparse.trial.cache import StatsCache
    from raysparse.trial.context import _prepare
    from raysparse.trial.statistics import profile_layer_key

    levels = check_profile_request(config, options)
    fidelities = options.fidelities()
    started = time.perf_counter()
    ctx = _prepare(config)
    adapter = ctx.loaded.adapter
    layers = adapter.decoder_layers()
    sizes = [sum(m.weight.numel() for m in adapter.prunable_linears(layer).values()) for layer in layers]
    model = ctx.loaded.model.eval()
    dense = DenseWeights(adapter)
    windows = _validation_windows(ctx.val_stream, ctx.settings.eval_seqlen, fidelities[-1])
    reference = log_probs(model, windows, config.eval_batch_size, ctx.device) if options.fitness == "kl" else None
    revision = getattr(model.config, "_commit_hash", None)
    fingerprint = model_fingerprint(ctx.loaded.path, revision)
    anchored = options.database == "anchored"

    start_started = time.perf_counter()
    heuristics = (heuristic_profiles(ctx, config, sizes, options.alphas(config.alpha))
                  if options.compare or options.start == "best" else {})
    anchor_rows: list[dict[str, Any]] = []
    if anchored:
        anchor_name, anchor, anchor_rows = choose_anchor(ctx, config, options, heuristics, sizes, fingerprint,
                                                         dense.restore, windows, reference)
        grid = Grid.build(levels, config.target_ratio, anchor)
    else:
        grid = Grid.build(levels, config.target_ratio, len(layers))
    anchor_s = time.perf_counter() - start_started
    bounds = grid.bounds()
    centre = grid.centre

    storage = options.storage or config.stats_cache or str(Path(config.output) / "layer_db")
    cache = StatsCache(storage)
    build_started = time.perf_counter()
    database = build_database(
        adapter, config.method, ctx.calib, [grid.layer_levels(i) for i in range(len(layers))], ctx.device,
        config.calib_batch_size, config.percdamp, config.blocksize,
        get_or_compute=lambda index, make: cache.get_or_compute(
            profile_layer_key(ctx, config, index, grid.layer_levels(index), grid.anchor if anchored else None), make),
        inputs_from=[centre - lo for lo, _ in bounds] if anchored else None, firsts=[lo for lo, _ in bounds])
    build_s = time.perf_counter() - build_started
    outcomes = [e["outcome"] for e in cache.events]
    logger.info("layer database: %d layers x %d levels in %.1fs (%s)", len(layers), len(levels), build_s,
                ", ".join(f"{o} {outcomes.count(o)}" for o in sorted(set(outcomes))))

    started_ray = False
    if options.workers > 0:
        import ray

        if not ray.is_initialized():  # RAY_ADDRESS, when set, names the cluster to join
            address = os.environ.get("RAY_ADDRESS")  # else a fresh local instance, never a recorded one
            ray.init(address=address or "local", num_cpus=None if address else options.workers,
                     include_dashboard=False, log_to_driver=False)
            started_ray = True
        actors = remote_evaluators(options.workers, ctx.loaded.path, config.dtype, config.trust_remote_code,
                                   database, windows, reference, config.eval_batch_size)
        evaluate = ParallelEvaluator(actors=actors)
    else:
        evaluate = ParallelEvaluator(local=ProfileEvaluator(model, database, windows, reference,
                                                             config.eval_batch_size, ctx.device, dense))
    start_started = time.perf_counter()
    if anchored:
        start_name, start = anchor_name, [centre] * len(layers)
        start_kls = {anchor_name: evaluate([start], fidelities[-1])[0]}
        start_candidates = {anchor_name: start}
    else:
        start_name, start, start_kls, start_candidates = choose_start(options, config, heuristics, levels, sizes,
                                                                      evaluate, fidelities[-1], fingerprint)
    start_s = anchor_s + time.perf_counter() - start_started  # importance / OWL scores, one KL or prune each
    search_started = time.perf_counter()
    if options.search == "evolution":
        result = evolve(start, sizes, len(levels), evaluate, fidelities, options.survivors,
                        options.generations, options.offspring, config.seed, options.max_step, bounds)
    else:
        result = optuna_search(start, centre, sizes, len(levels), evaluate, fidelities[-1], options.trials,
                               max(1, options.offspring), options.search, config.seed, bounds)
    search_s = time.perf_counter() - search_started
    if anchored:
        uniform_kl = None  # the uniform profile is not on an anchored grid
    else:
        uniform_kl = (start_kls["uniform"] if "uniform" in start_kls
                      else evaluate([[centre] * len(layers)], fidelities[-1])[0])
    if started_ray:
        import ray

        ray.shutdown()
    rescored, rescore_s = [], 0.0
    if options.rescore:
        rescore_started = time.perf_counter()
        if anchored:  # the anchor candidates were pruned once already: only the searched ones are new
            for row in anchor_rows:
                if row["name"] == anchor_name:
                    row.update(profile=start, kl=start_kls[anchor_name])
            known = [row["ratios"] for row in anchor_rows]
            # an anchor given as a file (or uniform) was not pruned yet: it competes like the others
            starts = ({}, {}) if anchor_rows else (start_candidates, start_kls)
            candidates = [row for row in rescore_candidates(result, options.rescore, grid, *starts, {})
                          if not any(same_ratios(row["ratios"], r) for r in known)]
        else:
            unsnapped = dict(heuristics) if options.start == "best" else {}
            candidates = rescore_candidates(result, options.rescore, grid, start_candidates, start_kls, unsnapped)
        rescored = sorted(rescore(ctx, config, dense.restore, candidates, windows, reference, options.rescore_seeds,
                                  options.known_rows) + anchor_rows,
                          key=lambda row: row["val_ppl"])
        rescore_s = time.perf_counter() - rescore_started
    chosen = rescored[0] if rescored else {"name": "searched #1", "profile": result.best,
                                           "ratios": grid.ratios(result.best), "kl": result.fitness}
    ratios = chosen["ratios"]
    record: dict[str, Any] = {
        "model": config.model, "method": config.method, "target": config.target_ratio, "levels": levels,
        "fitness": options.fitness,  # what the `kl*` fields below hold: "kl" to dense or "ce" (nats/token)
        "database_inputs": options.database, "anchor": list(grid.anchor) if anchored else None,
        "options": asdict(options), "layer_ratios": ratios, "chosen": chosen["name"],
        "profile": chosen["profile"],  # grid indices; None when a heuristic off the grid won the rescoring
        "total_sparsity": weighted_sparsity(ratios, sizes),
        "kl": chosen["kl"], "kl_pruned": chosen.get("kl_pruned"), "kl_uniform": uniform_kl,
        "searched": {"profile": result.best, "kl": result.fitness},  # the search's own best, before rescoring
        "curve": result.curve, "evaluations": {str(k): v for k, v in result.evaluations.items()},
        "start": {"name": start_name, "profile": start, "kl": start_kls or None, "candidates": start_candidates,
                  "s": round(start_s, 3)}, "rescored": rescored,
        "database_s": round(build_s, 3), "database": {o: outcomes.count(o) for o in set(outcomes)},
        "search_s": round(search_s, 3), "rescore_s": round(rescore_s, 3),
        "wall_s": round(time.perf_counter() - started, 3), "storage": storage,
    }
    profiles = {"uniform": [config.target_ratio] * len(layers)}
    if options.compare:
        profiles.update(heuristics)
    profiles[f"chosen ({chosen['name']})"] = ratios
    record["profiles"] = profiles
    if config.output:
        out = Path(config.output)
        write_layer_ratios(out / "best_profile.json", ratios, config.model, fingerprint, config.target_ratio,
                           method=config.method, kl=chosen["kl"], kl_uniform=uniform_kl, levels=levels,
                           chosen=chosen["name"])
        if anchored:  # `--database anchored --start OUTPUT/anchor_profile.json` reloads this database as it is
            record["anchor_file"] = str(out / "anchor_profile.json")
            write_layer_ratios(out / "anchor_profile.json", list(grid.anchor), config.model, fingerprint,
                               config.target_ratio, method=config.method, chosen=anchor_name)
        record["plot"] = write_plot(out / "profile.png", profiles, result.curve, options.search)
        write_json_atomic(out / "profile_search.json", record)
    return record
