"""How a search runs (objective, samples, concurrency, storage); what it searches is the space."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysparse.config import check_settings, from_mapping, setting
from raysparse.errors import ConfigError

SEARCH_STATE_FILE = "raysparse_search.json"

RESULTS_CSV = "results.csv"

RESULTS_PARQUET = "results.parquet"

BEST_CONFIG_FILE = "best_config.json"

CACHE_STATS_FILE = "cache_stats.json"

ASHA_STATE_FILE = "asha_state.json"  # the early-stopping rungs, read back by --resume

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"

# Objective name -> (metrics, modes). The first is single-objective (ASHA applies).
OBJECTIVES: dict[str, tuple[list[str], list[str]]] = {
    "final_ppl": (["val_ppl"], ["min"]),
    "ppl_vs_compute": (["val_ppl", "train_steps_total"], ["min", "min"]),
    "ppl_vs_params": (["val_ppl", "params_remaining"], ["min", "min"]),
    # lm-eval's mean accuracy on the tasks' validation split (the space must set eval_tasks)
    "zeroshot_acc": (["val_zeroshot_acc"], ["max"]),
    "ppl_vs_acc": (["val_ppl", "val_zeroshot_acc"], ["min", "max"]),
}


@dataclass
class SearchSettings:
    """How to run a search (what to search lives in the space file).

    Declared with `setting(...)` like TrialConfig, so launch/search.py's flags and their
    --help lines, and the simple checks in validate(), follow from the fields.
    """

    objective: str = setting("final_ppl", "final_ppl: min validation perplexity at the target; ppl_vs_compute / "
                             "ppl_vs_params: Pareto set of validation perplexity vs training steps / parameters "
                             "left; zeroshot_acc: max mean lm-eval accuracy (validation split) at the target; "
                             "ppl_vs_acc: Pareto set of the two (zero-shot objectives need eval_tasks)", choices=tuple(OBJECTIVES))
    space: str = setting(str(DEFAULT_SPACE), "search space YAML (see search_spaces/)",
                         shown="search_spaces/default.yaml")
    num_samples: int = setting(8, "trials to run", within=">= 1")
    max_concurrent: int = setting(2, "trials running at once at most", within=">= 1")
    cpus_per_trial: float = setting(1.0, "CPUs each trial holds", within="> 0",
                                    fix="a Tune trial cannot hold zero CPUs; use e.g. --cpus-per-trial 0.2")
    gpus_per_trial: float = setting(0.0, "GPUs each trial holds", within=">= 0")
    address: str | None = setting(None, "Ray cluster address (e.g. auto)", shown="a local Ray instance")
    storage: str = setting("runs", "folder (or s3://, gs://) for results")
    name: str | None = setting(None, "experiment name: one folder name inside --storage", shown="search-<timestamp>")
    seed: int = setting(0, "searcher seed")
    max_failures: int = setting(1, "retries per trial (-1: retry forever)", within=">= -1",
                                fix="give the retries per failed trial, e.g. 1 (0: none, -1: forever)")
    early_stopping: bool = setting(True, "ASHA stops weak trials at sparsity milestones "
                                   "(--no-early-stopping: every trial runs to the end)")
    # 40, not 20: replays of 9 fully run searches on two spaces (asha_replay.py) found a trial's
    # value at 20-30% sparsity uncorrelated with its final one (Spearman -0.09..0.08), so a
    # 20% rung stopped trials at random and taught TPE noise; from 40% it starts to rank them.
    grace_sparsity_pct: int = setting(40, "first ASHA milestone, in percent sparsity (rungs double: 40, 80)",
                                      within="[1, 100)",
                                      fix="it is the sparsity in percent at which ASHA first compares trials, e.g. 40")
    # One-shot trials have a single sparsity milestone, the target: ASHA could never stop one
    # early. Their recovery epochs are the resource there, as in Hyperband's own use of ASHA.
    fidelity: str = setting("sparsity", "what ASHA's rungs count: sparsity (milestones of iterative trials) or "
                            "epochs (recovery epochs of one-shot trials, which report after every epoch)",
                            choices=("sparsity", "epochs"))
    grace_epochs: int = setting(1, "first ASHA rung with --fidelity epochs, in recovery epochs (rungs double: 1, "
                                "2, 4, ... below the trials' epochs)", within=">= 1")
    reduction_factor: int = setting(2, "ASHA keeps the best 1/N of the trials at each rung, and rungs are N times "
                                    "apart (Ray's reduction_factor)", within=">= 2",
                                    fix="ASHA's reduction factor is at least 2, e.g. --reduction-factor 3")
    rung_metric: str = setting("val_ppl", "what ASHA and TPE compare at the sparsity milestones: val_ppl (the trial's "
                               "own validation ppl there) or projected (its model pruned one-shot to the target "
                               "first; one prune and evaluation per iteration; --objective final_ppl; on the "
                               "wide space it ranked worse than val_ppl: tests/benchmarks/rung_projection.py "
                               "measures yours)",
                               choices=("val_ppl", "projected"))
    stopped_trials: str = setting("pruned", "what TPE learns from a trial ASHA stopped: pruned (Optuna's PRUNED, "
                                  "ranked below every finished trial) or ignore (told FAIL: only finished trials "
                                  "shape its model; for spaces whose early milestones do not rank the final "
                                  "result)", choices=("pruned", "ignore"))
    searcher: str = setting("optuna", "optuna (TPE, NSGA-II for two objectives), random (the baseline a "
                            "model-based search must beat) or qmc (a scrambled Sobol design)",
                            choices=("optuna", "random", "qmc"))
    startup_trials: int | None = setting(None, "random trials TPE draws before it models the results",
                                         within=">= 1", shown="a third of --num-samples, 2 to 10")
    final_eval: bool = setting(True, "once the search is over, re-run the chosen configuration(s) with the test "
                               "text reported (--no-final-eval: report validation numbers only)")
    final_seeds: int = setting(1, "re-run the chosen configuration(s) with this many calibration seeds and "
                               "report their test perplexity (mean and spread)", within=">= 1")
    # A custom resource each trial (its Train driver) also holds, e.g. "driver", which
    # cluster.yaml gives only the head node: trials then never sit on spot GPU workers.
    driver_resource: str | None = setting(None, "custom resource each trial also holds (1 unit), e.g. driver: keeps "
                                          "trials and their Train drivers on the nodes that offer it (cluster.yaml: "
                                          "the head)")
    cache: bool = setting(True, "compute dense-model statistics and one-shot pruning results once per search "
                          "and storage, shared through the object store (--no-cache: every trial computes its own)")
    cache_memory: int = setting(1024, "MiB of cached statistics and pruning results the object store holds at "
                                "most; least recently used entries leave memory and are read back from storage",
                                within=">= 0")
    extra: dict[str, Any] = setting(factory=dict, help="free-form values recorded with the search's settings",
                                    cli=False)

    def validate(self) -> "SearchSettings":
        """Declared types, choices and bounds, then the driver resource's name."""
        check_settings(self)
        if self.driver_resource is not None and (not self.driver_resource.strip()
                                                 or self.driver_resource.lower() in ("cpu", "gpu", "memory")):
            raise ConfigError(f"--driver-resource '{self.driver_resource}' must name a custom resource, "
                              "e.g. driver (cluster.yaml gives the head node {\"driver\": 8})")
        if self.rung_metric == "projected" and self.objective != "final_ppl":
            raise ConfigError(f"--rung-metric projected ranks trials by validation perplexity at the target: it "
                              f"goes with --objective final_ppl, not {self.objective} (drop --rung-metric)")
        if self.fidelity == "epochs" and self.objective != "final_ppl":
            raise ConfigError(f"--fidelity epochs ranks trials by validation perplexity after every recovery epoch: "
                              f"it goes with --objective final_ppl, not {self.objective} (drop --fidelity)")
        if self.rung_metric == "projected" and self.fidelity == "epochs":
            raise ConfigError("--rung-metric projected projects iterative trials to their target at sparsity "
                              "milestones; --fidelity epochs ranks one-shot trials by recovery epochs: use one")
        if self.name is not None:
            check_experiment_name(self.name)
        return self


def check_experiment_name(name: str) -> None:
    """--name is one folder inside --storage: no separators, no '..', nothing that leaves it."""
    if (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or name != name.strip()
            or any(not ch.isprintable() for ch in name)):
        raise ConfigError(f"--name {name!r} must be one folder name inside --storage (no '/', '..' or "
                          "spaces around it): e.g. --name wanda-sweep, and --storage for where it goes")


def parse_search_state(text: str, where: str) -> tuple[SearchSettings, dict[str, Any]]:
    """The settings and the space recorded in a search's raysparse_search.json; a one-line
    ConfigError when the file is not what a search wrote (truncated, edited, another file)."""
    fix = ("the search cannot be resumed from it: restore the file from a copy, or start a new search "
           "(the same --seed and --space repeat its trials)")
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is corrupt (not JSON: {exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) \
            or not isinstance(saved.get("space"), dict):
        raise ConfigError(f"{where} holds no recorded settings and space; {fix}")
    try:
        settings = from_mapping(SearchSettings, saved["settings"], source=where).validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc}; {fix}") from None
    return settings, saved["space"]


def check_local_resume(resume: str) -> None:
    """A local --resume folder holds a readable search state (checked before Ray is imported;
    object-storage URIs are read by the runner)."""
    if "://" in resume:
        return
    state_file = Path(resume).expanduser() / SEARCH_STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"{resume} is not a raysparse search folder (no {SEARCH_STATE_FILE})")
    parse_search_state(state_file.read_bytes().decode("utf-8", errors="replace"),
                       f"{resume.rstrip('/')}/{SEARCH_STATE_FILE}")
