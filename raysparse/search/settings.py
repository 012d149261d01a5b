"""How a search runs (objective, samples, concurrency, storage); what it searches is the space."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysparse.errors import ConfigError

SEARCH_STATE_FILE = "raysparse_search.json"


RESULTS_CSV = "results.csv"


RESULTS_PARQUET = "results.parquet"


BEST_CONFIG_FILE = "best_config.json"


DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"


# Objective name -> (metrics, modes). The first is single-objective (ASHA applies).
OBJECTIVES: dict[str, tuple[list[str], list[str]]] = {
    "final_ppl": (["final_ppl"], ["min"]),
    "ppl_vs_compute": (["final_ppl", "train_steps_total"], ["min", "min"]),
    "ppl_vs_params": (["final_ppl", "params_remaining"], ["min", "min"]),
}


@dataclass
class SearchSettings:
    """How to run a search (what to search lives in the space file)."""

    objective: str = "final_ppl"
    space: str = str(DEFAULT_SPACE)
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None
    storage: str = "runs"
    name: str | None = None
    seed: int = 0
    max_failures: int = 1
    early_stopping: bool = True
    grace_sparsity_pct: int = 20
    searcher: str = "optuna"  # or "random" (the baseline a model-based search must beat)
    # A custom resource each trial (its Train driver) also holds, e.g. "driver", which
    # cluster.yaml gives only the head node: trials then never sit on spot GPU workers.
    driver_resource: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "SearchSettings":
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective '{self.objective}': choose one of {', '.join(OBJECTIVES)}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("--num-samples and --max-concurrent must be >= 1")
        if self.cpus_per_trial <= 0:
            raise ConfigError("--cpus-per-trial must be > 0 (a Tune trial cannot hold zero CPUs; use e.g. 0.2)")
        if self.searcher not in ("optuna", "random"):
            raise ConfigError(f"unknown searcher '{self.searcher}': choose optuna or random")
        if self.driver_resource is not None and (not self.driver_resource.strip()
                                                 or self.driver_resource.lower() in ("cpu", "gpu", "memory")):
            raise ConfigError(f"--driver-resource '{self.driver_resource}' must name a custom resource, "
                              "e.g. driver (cluster.yaml gives the head node {\"driver\": 8})")
        return self
