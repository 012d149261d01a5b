"""Typed, validated configuration for a pruning run.

The config is flat on purpose: a search space (YAML) and the CLI both address settings by
one name, and a best configuration written by a search must re-run unchanged through
`launch/prune.py --config FILE`. Validation happens here, before any model is loaded or
any file is written, so a bad value costs the user nothing but a one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from raysparse.errors import ConfigError
from raysparse.sparsity.pattern import SparsityPattern, parse_sparsity

METHODS = ("magnitude", "wanda", "sparsegpt", "structured")


SCHEDULES = ("oneshot", "iterative")


RECOVERIES = ("none", "masked", "lora")


MAGNITUDE_SCOPES = ("layer", "global")


DTYPES = ("auto", "float32", "bfloat16", "float16")


DEFAULT_MAX_WINDOW = 2048


@dataclass
class TrialConfig:
    """Everything one trial needs: pruning, schedule, recovery. Defaults: tiny preset, Wanda 50%, one-shot.

    `sparsity` is the final target (the CLI also accepts it as `--target-sparsity`).
    """

    model: str = "tiny"
    method: str = "wanda"
    sparsity: str = "0.5"
    magnitude_scope: str = "layer"
    calib_data: str | None = None
    eval_data: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    eval_seqlen: int | None = None
    eval_stride: int | None = None
    eval_batch_size: int = 4
    eval_max_windows: int | None = None
    calib_batch_size: int = 8
    percdamp: float = 0.01
    blocksize: int = 128
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None
    save: bool = False
    trust_remote_code: bool = False
    # schedule
    schedule: str = "oneshot"
    prune_percentage: float = 0.1
    max_iterations: int = 100
    # recovery
    recovery: str = "none"
    epochs_per_iteration: int = 1
    lr: float = 2e-5
    batch_size: int = 8
    max_steps: int | None = None
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    train_data: str | None = None
    train_samples: int = 256
    train_seqlen: int | None = None
    batch_scaled: bool = False
    total_samples: int | None = None
    early_stopping_patience: int | None = None
    keep_best: bool = True
    bf16: str = "auto"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,v_proj"
    workers: int = 1
    resume: bool = True
    stats_cache: str | None = None  # folder of shared dense-model statistics (set by a search)
    ray_train_storage: str | None = None  # where distributed recovery keeps epoch checkpoints (set by a search)
    # non-uniform per-layer sparsity from layer importance
    pruning_strategy: str = "uniform"
    alpha: float = 1.0
    min_pruning_rate: float = 0.0
    max_pruning_rate: float = 0.95
    importance_method: str = "removal"
    importance_samples: int = 50
    importance_config: str | None = None
    # structured pruning (method structured): whole kv groups and MLP channels are removed
    pruning_ratio: float | None = None  # fraction of the prunable parameters in [layer_start, layer_end)
    num_examples: int = 10  # Taylor importance windows
    max_seq_len: int = 128  # Taylor importance window length (capped by the model)
    layer_start: int = 0
    layer_end: int | None = None  # exclusive; default: the last layer
    test_after_prune: bool = True  # evaluate (and sample a generation) right after pruning

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, str):
            self.sparsity = str(self.sparsity)

    @property
    def pattern(self) -> SparsityPattern:
        return parse_sparsity(self.sparsity)

    @property
    def is_structured(self) -> bool:
        return self.method == "structured"

    @property
    def target_ratio(self) -> float:
        """The final fraction removed: parameters for structured pruning, weights otherwise."""
        return float(self.pruning_ratio) if self.is_structured else self.pattern.ratio

    def validate(self) -> "TrialConfig":
        """Check every setting that needs no model; raise ConfigError naming the fix."""
        self.pattern  # noqa: B018 - parsing validates
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.magnitude_scope not in MAGNITUDE_SCOPES:
            raise ConfigError(
                f"unknown magnitude_scope '{self.magnitude_scope}': choose 'layer' or 'global'"
            )
        if self.magnitude_scope == "global" and self.pattern.is_nm:
            raise ConfigError("magnitude_scope 'global' cannot make N:M patterns: use 'layer'")
        _positive_int("nsamples", self.nsamples)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("calib_batch_size", self.calib_batch_size)
        _positive_int("blocksize", self.blocksize)
        for name in ("seqlen", "eval_seqlen", "eval_stride", "eval_max_windows"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value, minimum=2 if "seqlen" in name else 1)
        if self.eval_stride is not None and self.eval_seqlen is not None and self.eval_stride > self.eval_seqlen:
            raise ConfigError(
                f"eval_stride {self.eval_stride} is larger than eval_seqlen {self.eval_seqlen}: "
                "tokens between windows would never be scored; use a stride <= the window"
            )
        if not 0.0 <= self.percdamp < 1.0:
            raise ConfigError(f"percdamp {self.percdamp} is outside [0, 1): the usual value is 0.01")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}': choose one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"unknown device '{self.device}': use auto, cpu, cuda or cuda:N")
        if self.save and not self.output:
            raise ConfigError("save is set but no output directory is given: add --output DIR")
        self._validate_schedule_and_recovery()
        self._validate_structured()
        self._validate_allocation()
        return self

    def _validate_structured(self) -> None:
        if not self.is_structured:
            if self.pruning_ratio is not None:
                raise ConfigError("pruning_ratio applies to --method structured; unstructured methods take --sparsity")
            if self.layer_start != 0 or self.layer_end is not None:
                raise ConfigError("layer_start/layer_end apply to --method structured; unstructured methods prune every layer")
            return
        if self.pruning_ratio is None:
            raise ConfigError("--method structured needs --pruning-ratio: the fraction of parameters to remove, e.g. 0.25")
        if isinstance(self.pruning_ratio, bool) or not isinstance(self.pruning_ratio, (int, float)) \
                or not 0.0 < float(self.pruning_ratio) < 1.0:
            raise ConfigError(f"pruning_ratio {self.pruning_ratio!r} is outside (0, 1): give the fraction of "
                              "parameters to remove, e.g. 0.25")
        if self.schedule != "oneshot":
            raise ConfigError("structured pruning runs one-shot: use --schedule oneshot (recovery still applies)")
        _positive_int("num_examples", self.num_examples)
        _positive_int("max_seq_len", self.max_seq_len, minimum=2)
        _positive_int("layer_start", self.layer_start, minimum=0)
        if self.layer_end is not None:
            _positive_int("layer_end", self.layer_end)
            if self.layer_end <= self.layer_start:
                raise ConfigError(f"layer range [{self.layer_start}, {self.layer_end}) is empty: "
                                  "layer_end is exclusive and must be larger than layer_start")

    def _validate_allocation(self) -> None:
        if self.pruning_strategy not in ("uniform", "inverse", "proportional"):
            raise ConfigError(f"unknown pruning_strategy '{self.pruning_strategy}': choose uniform, inverse or proportional")
        if self.pruning_strategy == "uniform":
            return
        if self.pattern.is_nm and not self.is_structured:
            raise ConfigError("per-layer ratios need a fractional sparsity: N:M patterns are uniform by definition")
        if self.method == "magnitude" and self.magnitude_scope == "global":
            raise ConfigError("a global magnitude threshold sets its own per-layer ratios: use pruning_strategy uniform")
        if self.alpha < 0:
            raise ConfigError(f"alpha {self.alpha} must be >= 0 (0 = uniform, 1 = standard, 2-3 = aggressive)")
        if not 0.0 <= self.min_pruning_rate <= self.max_pruning_rate < 1.0:
            raise ConfigError(
                f"need 0 <= min_pruning_rate ({self.min_pruning_rate}) <= max_pruning_rate ({self.max_pruning_rate}) < 1"
            )
        target = self.target_ratio
        if not self.min_pruning_rate <= target <= self.max_pruning_rate:
            bound = "min_pruning_rate" if target < self.min_pruning_rate else "max_pruning_rate"
            raise ConfigError(
                f"the target {target} cannot be met inside the clamps [{self.min_pruning_rate}, "
                f"{self.max_pruning_rate}]: it is {'below' if bound == 'min_pruning_rate' else 'above'} {bound}; "
                f"{'lower min_pruning_rate' if bound == 'min_pruning_rate' else 'raise max_pruning_rate'} "
                "or change the target"
            )
        if self.importance_method not in ("removal", "activation"):
            raise ConfigError(f"unknown importance_method '{self.importance_method}': choose removal or activation")
        _positive_int("importance_samples", self.importance_samples)

    def _validate_schedule_and_recovery(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.schedule}': choose {' or '.join(SCHEDULES)}")
        if self.schedule == "iterative":
            if not 0.0 < self.prune_percentage < 1.0:
                raise ConfigError(
                    f"prune_percentage {self.prune_percentage} is outside (0, 1): it is the fraction of the "
                    "remaining weights removed per iteration, e.g. 0.1"
                )
            if self.pattern.is_nm:
                raise ConfigError("an iterative schedule needs a fractional sparsity, not an N:M pattern")
            _positive_int("max_iterations", self.max_iterations)
        if self.recovery not in RECOVERIES:
            raise ConfigError(f"unknown recovery '{self.recovery}': choose one of {', '.join(RECOVERIES)}")
        if self.recovery == "none":
            return
        for name in ("epochs_per_iteration", "batch_size", "grad_accum", "train_samples", "workers"):
            _positive_int(name, getattr(self, name))
        for name in ("max_steps", "total_samples", "early_stopping_patience", "train_seqlen"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name), minimum=2 if name == "train_seqlen" else 1)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigError(f"lr {self.lr} must be in (0, 1), e.g. 1e-5")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay and warmup_steps must be >= 0")
        if self.bf16 not in ("auto", "true", "false", True, False):
            raise ConfigError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        if self.recovery == "lora":
            _positive_int("lora_r", self.lora_r)
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ConfigError(f"lora_dropout {self.lora_dropout} is outside [0, 1)")
            if not self.lora_targets:
                raise ConfigError("lora_target_modules is empty: name linear layers, e.g. q_proj,v_proj")
            if self.workers > 1:
                raise ConfigError("LoRA recovery runs in-process: use --workers 1 (distributed recovery is masked)")

    @property
    def lora_targets(self) -> list[str]:
        value = self.lora_target_modules
        items = value.split(",") if isinstance(value, str) else list(value)
        return [item.strip() for item in items if item.strip()]

    def effective_lr(self) -> float:
        """lr, or base_lr * sqrt(batch_size) with the batch-size-aware rule (`batch_scaled`)."""
        return self.lr * math.sqrt(self.batch_size) if self.batch_scaled else self.lr

    def effective_max_steps(self) -> int | None:
        """max_steps, or total_samples / batch_size with the batch-size-aware rule."""
        if self.batch_scaled and self.total_samples:
            return max(1, self.total_samples // self.batch_size)
        return self.max_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "TrialConfig":
        """Build from a plain mapping, naming unknown keys instead of ignoring them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; known settings are: "
                + ", ".join(sorted(known))
            )
        try:
            return cls(**dict(values))
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "TrialConfig":
        """Read a JSON or YAML config file (a search's best_config.json, say)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text)
            else:
                values = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if isinstance(values, dict) and "config" in values and isinstance(values["config"], dict):
            values = values["config"]  # accept a summary.json directly
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of setting: value")
        return cls.from_dict(values, source=str(path))


PruneConfig = TrialConfig  # the one-shot API name; same settings


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
