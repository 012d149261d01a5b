"""`launch/profile_search.py`: flags -> TrialConfig + ProfileOptions -> run_profile_search -> report."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from raysparse.cli.common import EXIT_INTERRUPTED, fail, setup_logging
from raysparse.cli.flags import add_settings, given_settings
from raysparse.config import TrialConfig
from raysparse.errors import RaysparseError
from raysparse.profile.driver import DATABASES, FITNESSES, SEARCHES, ProfileOptions


def build_profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/profile_search.py",
        description="Search the per-layer sparsity profile at an exact total sparsity, over a database of layers "
                    "pruned once per level; writes best_profile.json for --layer-ratios.")
    p.add_argument("--config", help="JSON/YAML file of settings; flags override it")
    g = p.add_argument_group("profile search")
    d = ProfileOptions()
    g.add_argument("--profile-levels", dest="levels", default=None,
                   help="level grid: LO:HI:STEP or a comma list, evenly spaced, holding the target "
                        "(default target +- 0.25 by 0.05)")
    g.add_argument("--search", choices=SEARCHES, default=d.search,
                   help="evolution: (1+lambda) level switches (EvoPress); tpe / cmaes: Optuna over per-layer offsets")
    g.add_argument("--generations", type=int, default=d.generations, help=f"evolution generations (default {d.generations})")
    g.add_argument("--offspring", type=int, default=d.offspring,
                   help=f"children per generation; Optuna: proposals scored together (default {d.offspring})")
    g.add_argument("--survivors", type=int, default=d.survivors,
                   help=f"children promoted from the first fidelity to the next (default {d.survivors})")
    g.add_argument("--fidelity", default=d.fidelity,
                   help=f"validation windows per fidelity stage, increasing (default {d.fidelity})")
    g.add_argument("--fitness", choices=FITNESSES, default=d.fitness,
                   help="what a candidate is scored by on the validation windows: kl (to the dense model's "
                        "next-token distributions, EvoPress) or ce (next-token cross-entropy, i.e. log validation "
                        f"perplexity) (default {d.fitness})")
    g.add_argument("--max-step", type=int, default=d.max_step, help="largest level switch, in grid steps (default 1)")
    g.add_argument("--trials", type=int, default=d.trials, help=f"Optuna proposals in all (default {d.trials})")
    g.add_argument("--eval-workers", dest="eval_workers", type=int, default=d.workers,
                   help="Ray actors scoring candidates in parallel (default 0: in-process)")
    g.add_argument("--storage", default=None,
                   help="folder or URI of the layer database (the statistics cache; default --stats-cache, "
                        "else OUTPUT/layer_db)")
    g.add_argument("--rescore", type=int, default=0,
                   help="prune the K best profiles sequentially (as launch/prune.py does), with every start "
                        "candidate (--start best: uniform and each heuristic), and keep the one with the best "
                        "validation perplexity (default 0: the best KL)")
    g.add_argument("--start", default=d.start, metavar="{uniform,best,FILE}",
                   help="where the search starts: uniform (every layer at the target); best (the lowest validation "
                        "KL among uniform and the importance / OWL profiles at --start-alphas); or a "
                        "best_profile.json / layer-ratios file, snapped onto the grid (default uniform)")
    g.add_argument("--database", choices=DATABASES, default=d.database,
                   help="dense: one grid for all layers, entries calibrated on the dense model's inputs (EvoPress); "
                        "anchored: each layer's grid is centred on the start profile (chosen by the sequential "
                        "prune's validation perplexity with --start best) and its entries are calibrated on the "
                        "inputs that profile's prune gives, so the search scores profiles near it as "
                        "launch/prune.py prunes them (default dense)")
    g.add_argument("--rescore-seeds", type=int, default=d.rescore_seeds,
                   help="prune each rescored profile with N calibration draws (seed, seed+1, ...) and rank by the "
                        "mean validation perplexity: one draw's luck no longer decides (default 1)")
    g.add_argument("--rounds", type=int, default=d.rounds,
                   help="with --database anchored and --rescore: search, re-centre the database on the winner "
                        "(OUTPUT/round-K), search again, up to N rounds; stops when the anchor wins (default 1)")
    g.add_argument("--start-alphas", default=None,
                   help="comma list of alphas for the importance / OWL start candidates (default --alpha)")
    g.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the importance and OWL profiles drawn beside the searched one")
    add_settings(p, TrialConfig)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def profile_main(argv: Sequence[str] | None = None) -> int:
    args = build_profile_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        values = TrialConfig.from_file(args.config).to_dict() if args.config else {}
        values.update(given_settings(args, TrialConfig))
        config = TrialConfig.from_dict(values)
        options = ProfileOptions(levels=args.levels, search=args.search, generations=args.generations,
                                 offspring=args.offspring, survivors=args.survivors, fidelity=args.fidelity,
                                 fitness=args.fitness, max_step=args.max_step, trials=args.trials, workers=args.eval_workers,
                                 storage=args.storage, compare=args.compare, rescore=args.rescore,
                                 start=args.start, start_alphas=args.start_alphas, database=args.database,
                                 rescore_seeds=args.rescore_seeds, rounds=args.rounds)
        from raysparse.config.inputs import check_inputs
        from raysparse.profile.driver import check_profile_request
        from raysparse.profile.rounds import run_rounds

        check_profile_request(config, options)
        check_inputs(config)
        record = run_rounds(config, options)
    except RaysparseError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted", code=EXIT_INTERRUPTED)
    print(f"profile          {' '.join(f'{r:.2f}' for r in record['layer_ratios'])}")
    print(f"total sparsity   {record['total_sparsity']:.4f} (target {record['target']})")
    kl = "off the grid" if record["kl"] is None else f"{record['kl']:.5g}"
    start = record["start"]
    baseline = (f"uniform {record['kl_uniform']:.5g}" if record["kl_uniform"] is not None
                else f"start {min(start['kl'].values()):.5g}, database anchored on it")
    label = "KL to dense  " if record["fitness"] == "kl" else "cross-entropy"
    print(f"{label}    {kl} assembled ({baseline}, validation; started from {start['name']})")
    if record["rescored"]:
        best = record["rescored"][0]
        print(f"chosen           {record['chosen']}: validation perplexity {best['val_ppl']:.4g}, {record['fitness']} "
              f"{best['kl_pruned']:.5g} after the sequential prune ({len(record['rescored'])} re-pruned)")
    for r in record.get("rounds", []):
        print(f"round {r['round']:<10} anchored on {r['anchor_name']}: {r['chosen']} chosen, validation perplexity "
              f"{r['val_ppl']:.4g}{' (the anchor won: stopped)' if r['converged'] else ''}")
    print(f"database         {record['database_s']:.1f}s {record['database']}; search {record['search_s']:.1f}s"
          f"; rescoring {record['rescore_s']:.1f}s")
    if config.output:
        print(f"best profile     {config.output}/best_profile.json (launch/prune.py --layer-ratios FILE)")
        print(f"plot             {record.get('plot')}")
    return 0
