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

import yaml

from raysparse.config.declare import check_settings, from_mapping, setting
from raysparse.errors import ConfigError, parse_error_line
from raysparse.sparsity.pattern import SparsityPattern, parse_sparsity

METHODS = ("magnitude", "wanda", "sparsegpt", "structured")

SCHEDULES = ("oneshot", "iterative")

RECOVERIES = ("none", "masked", "lora")

DISTILL_MODES = ("none", "logits", "squarehead")

MAGNITUDE_SCOPES = ("layer", "global")

CALIBRATION_PASSES = ("two", "one")

DTYPES = ("auto", "float32", "bfloat16", "float16")

OFFLOAD_MODES = ("none", "cpu", "disk")

DEFAULT_MAX_WINDOW = 2048

# --help sections (a setting without a group is listed under the general options)
SCHEDULE = "schedule"

RECOVERY = "recovery"

RATIOS = "per-layer ratios from layer importance"

STRUCTURED = "structured pruning (--method structured)"

ZEROSHOT = "zero-shot accuracy (lm-evaluation-harness, pip install 'raysparse[eval]')"

_DATA = "wikitext2 | c4 | ptb | pydoc | PATH (.txt/.jsonl)"

_WINDOW = f"the model's context, at most {DEFAULT_MAX_WINDOW}"


@dataclass
class TrialConfig:
    """Everything one trial needs: pruning, schedule, recovery. Defaults: tiny preset, Wanda 50%, one-shot.

    Each field is declared once with `setting(...)`: its flag, --help line, search-space type and
    simple bounds follow from it (raysparse.config.declare); validate() adds the cross-field rules.
    """

    model: str = setting("tiny", "hub id, local folder, or 'tiny' (offline preset)")
    method: str = setting("wanda", "pruning method", choices=METHODS)
    sparsity: str = setting("0.5", "final sparsity: fraction in [0,1) or N:M such as 2:4",
                            flags=("--target-sparsity",), also=(int, float))
    magnitude_scope: str = setting("layer", "magnitude: rank weights within each layer or against one global threshold",
                                   choices=MAGNITUDE_SCOPES)
    calib_data: str | None = setting(None, f"calibration text: {_DATA}", shown="c4; pydoc for tiny")
    eval_data: str | None = setting(None, f"test text, reported and never used for a decision: {_DATA}",
                                    shown="wikitext2; pydoc for tiny")
    val_data: str | None = setting(None, "validation text for every decision (kept epoch, early stopping, a "
                                   f"search's choice): {_DATA}", shown="the validation split of the test "
                                   "dataset; a test file needs one named")
    report_test: bool = setting(True, "evaluate the test text (dense, pruned, final); a search turns it off "
                                "in its trials and evaluates only the configurations it chose")
    nsamples: int = setting(128, "calibration windows", within=">= 1")
    seqlen: int | None = setting(None, "calibration window", within=">= 2", shown=_WINDOW)
    eval_seqlen: int | None = setting(None, "evaluation window", within=">= 2", shown=_WINDOW)
    eval_stride: int | None = setting(None, "evaluation stride", within=">= 1", shown="the window, no overlap")
    eval_batch_size: int = setting(4, "evaluation windows per forward pass", within=">= 1")
    eval_max_windows: int | None = setting(None, "evaluate only the first N windows (quick checks)", within=">= 1",
                                           shown="all")
    eval_max_tokens: int | None = setting(None, "evaluate on the first N scored tokens only (quick search-time "
                                          "validation; the last window scores what is left of N)", within=">= 1",
                                          shown="all")
    calib_batch_size: int = setting(8, "calibration windows per forward pass", within=">= 1")
    calibration_passes: str = setting("two", "Wanda/SparseGPT: two passes per decoder layer (reference: statistics "
                                      "from the dense layer) or one (true sequential: each sublayer calibrated on "
                                      "the pruned sublayers before it; all calibration windows at once through a "
                                      "layer)", choices=CALIBRATION_PASSES)
    percdamp: float = setting(0.01, "SparseGPT dampening (fraction of mean diag)", within="[0, 1)",
                              fix="the usual value is 0.01")
    blocksize: int = setting(128, "SparseGPT column block size", within=">= 1")
    seed: int = setting(0, "random seed (calibration windows, training order)")
    device: str = setting("auto", "auto | cpu | cuda[:N]")
    dtype: str = setting("auto", "dtype the model is loaded in", choices=DTYPES)
    offload: str = setting("none", "models larger than the device (or host) memory: cpu keeps the weights in host "
                           "memory, disk maps them from a scratch safetensors file (in TMPDIR); only the decoder "
                           "layer being pruned or evaluated is on the device", choices=OFFLOAD_MODES)
    output: str | None = setting(None, "folder for summary.json (and the model with --save)")
    save: bool = setting(False, "save the pruned model (safetensors)")
    trust_remote_code: bool = setting(False, "let transformers run the model repository's own code")
    schedule: str = setting("oneshot", "oneshot: prune to the target at once; iterative: prune, recover, repeat",
                            choices=SCHEDULES, group=SCHEDULE)
    prune_percentage: float = setting(0.1, "iterative: fraction of the remaining weights removed per iteration",
                                      within="(0, 1)", group=SCHEDULE,
                                      fix="it is the fraction of the remaining weights removed per iteration, e.g. 0.1")
    max_iterations: int = setting(100, "iterative: safety bound on the iterations", within=">= 1", group=SCHEDULE)
    project_to_target: bool = setting(False, "iterative: also measure the validation ppl of a copy pruned one-shot "
                                      "to the target after each iteration (--rung-metric projected)", group=SCHEDULE)
    recovery: str = setting("none", "training after pruning: none, masked (masks kept) or lora", choices=RECOVERIES,
                            group=RECOVERY)
    epochs_per_iteration: int = setting(1, "training epochs after each pruning step", within=">= 1",
                                        flags=("--epochs",), group=RECOVERY)
    lr: float = setting(2e-5, "learning rate; the base lr with --batch-scaled", within="(0, 1)", group=RECOVERY,
                        message="{name} {value} must be in {within}, e.g. 1e-5")
    batch_size: int = setting(8, "training batch size", within=">= 1", group=RECOVERY)
    max_steps: int | None = setting(None, "optimizer steps per epoch at most", within=">= 1", shown="a whole epoch",
                                    group=RECOVERY)
    grad_accum: int = setting(1, "gradient accumulation steps", within=">= 1", group=RECOVERY)
    warmup_steps: int = setting(0, "learning-rate warm-up steps", within=">= 0", group=RECOVERY)
    weight_decay: float = setting(0.0, "AdamW weight decay", within=">= 0", group=RECOVERY)
    train_data: str | None = setting(None, f"training text: {_DATA}", shown="the calibration data", group=RECOVERY)
    train_samples: int = setting(256, "training windows", within=">= 1", group=RECOVERY)
    train_seqlen: int | None = setting(None, "training window", within=">= 2", shown="seqlen", group=RECOVERY)
    batch_scaled: bool = setting(False, "batch-size-aware rule: lr = lr*sqrt(batch), steps = total_samples/batch",
                                 group=RECOVERY)
    total_samples: int | None = setting(None, "with --batch-scaled: training samples in all, e.g. 10000",
                                        within=">= 1", group=RECOVERY)
    early_stopping_patience: int | None = setting(None, "stop after N epochs without perplexity gain", within=">= 1",
                                                  shown="never", group=RECOVERY)
    keep_best: bool = setting(True, "keep the best epoch's weights (--no-keep-best: the last epoch's)", group=RECOVERY)
    bf16: str = setting("auto", "train in bfloat16", choices=("auto", "true", "false"), also=(bool,), group=RECOVERY)
    lora_r: int = setting(8, "LoRA rank", within=">= 1", group=RECOVERY)
    lora_alpha: int = setting(16, "LoRA scaling alpha", group=RECOVERY)
    lora_dropout: float = setting(0.05, "LoRA dropout", within="[0, 1)", group=RECOVERY)
    lora_target_modules: str = setting("q_proj,v_proj", "comma-separated names of the linear layers LoRA adapts",
                                       also=(list,), group=RECOVERY)
    workers: int = setting(1, "Ray Train FSDP workers for masked recovery (1 = in-process)", within=">= 1",
                           group=RECOVERY)
    worker_retries: int = setting(2, "restarts of the Ray Train workers from their last epoch checkpoint after a "
                                  "worker or node failure (a NaN loss is not retried)", within=">= 0",
                                  group=RECOVERY)
    distill: str = setting("none", "recovery loss from the dense model: logits (KL of the next-token distributions) "
                           "or squarehead (logit KL + normalised per-layer feature MSE)", choices=DISTILL_MODES,
                           group=RECOVERY)
    distill_weight: float = setting(1.0, "share of the distillation loss: (1-w)*next-token + w*distillation",
                                    within="[0, 1]", group=RECOVERY)
    distill_temperature: float = setting(1.0, "softmax temperature of the logit KL", within="(0, 100]",
                                         group=RECOVERY)
    distill_layers: str | None = setting(None, "comma-separated decoder layer indices the squarehead feature loss "
                                         "compares (negative: from the end)", shown="all", also=(list,),
                                         group=RECOVERY)
    teacher: str | None = setting(None, "the teacher for --distill: a model with the same tokenizer",
                                  shown="the dense model", group=RECOVERY)
    distill_cache_mb: int = setting(2048, "CPU memory (MiB) for the teacher's outputs per training window, reused "
                                    "across epochs and iterations instead of re-running the teacher (0: recompute "
                                    "every step; FSDP workers always recompute)", within=">= 0", group=RECOVERY)
    resume: bool = setting(True, "continue from a checkpoint of this trial in --output (--no-resume: start over)")
    stats_cache: str | None = setting(None, "folder or URI (s3://, gs://, file://) of cached dense-model statistics "
                                      "and pruning results, shared with searches (a search sets it)")
    ray_train_storage: str | None = setting(None, "where distributed recovery keeps its epoch checkpoints (a search sets it)")
    pruning_strategy: str = setting("uniform", "inverse: important layers pruned less; proportional: pruned more",
                                    choices=("uniform", "inverse", "proportional"), group=RATIOS)
    alpha: float = setting(1.0, "spread of the ratios (0 uniform, 1 standard, 2-3 aggressive)", within=">= 0",
                           fix="0 = uniform, 1 = standard, 2-3 = aggressive", group=RATIOS)
    min_pruning_rate: float = setting(0.0, "lowest per-layer ratio", within="[0, 1)", group=RATIOS)
    max_pruning_rate: float = setting(0.95, "highest per-layer ratio", within="[0, 1)", group=RATIOS)
    importance_method: str = setting("removal", "removal: loss change when a layer is skipped; "
                                     "activation: how much a layer changes its input; owl: share of outlier "
                                     "weights (|W|*||X|| above owl_m x the layer mean; use with inverse)",
                                     choices=("removal", "activation", "owl"), group=RATIOS)
    owl_m: float = setting(5.0, "owl: a score counts as an outlier above owl_m x its layer's mean score",
                           within="> 0", fix="the OWL paper uses 5 to 10", group=RATIOS)
    importance_samples: int = setting(50, "windows the importance analysis reads", within=">= 1", group=RATIOS)
    importance_config: str | None = setting(None, "reuse a layer_importance.json (skips the analysis)", group=RATIOS)
    layer_ratios: str | None = setting(None, "per-layer ratios from a JSON file (a profile search's "
                                       "best_profile.json): checked against the model and the target", group=RATIOS)
    pruning_ratio: float | None = setting(None, "fraction of the prunable parameters (kv groups + MLP channels) in "
                                          "[layer_start, layer_end) to remove, e.g. 0.25", within="(0, 1)",
                                          fix="give the fraction of parameters to remove, e.g. 0.25", group=STRUCTURED)
    num_examples: int = setting(10, "Taylor importance windows", within=">= 1", group=STRUCTURED)
    max_seq_len: int = setting(128, "Taylor importance window length (capped by the model)", within=">= 2",
                               group=STRUCTURED)
    layer_start: int = setting(0, "first decoder layer pruned", within=">= 0", group=STRUCTURED)
    layer_end: int | None = setting(None, "layer after the last one pruned (exclusive)", within=">= 1",
                                    shown="the last layer", group=STRUCTURED)
    test_after_prune: bool = setting(True, "evaluate and sample a generation right after pruning "
                                     "(--no-test-after-prune: skip it; recovery's own baseline is used "
                                     "if it takes one)", group=STRUCTURED)

    eval_tasks: str | None = setting(None, "lm-eval tasks run on the model after every iteration and on the dense model, "
                                     "e.g. arc_easy,piqa or raysparse_lastword_pydoc (offline, shipped)", shown="none",
                                     also=(list,), group=ZEROSHOT)
    eval_tasks_path: str | None = setting(None, "folder of extra lm-eval task YAMLs", group=ZEROSHOT)
    eval_tasks_limit: int | None = setting(None, "first N documents of each task (quick searches)", within=">= 1",
                                           shown="all", group=ZEROSHOT)
    eval_tasks_fewshot: int = setting(0, "few-shot examples per document", within=">= 0", group=ZEROSHOT)
    eval_tasks_batch_size: int = setting(8, "lm-eval batch size", within=">= 1", group=ZEROSHOT)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, str):
            self.sparsity = str(self.sparsity)

    @property
    def makes_decisions(self) -> bool:
        """True when the trial chooses something by perplexity (the kept epoch, early stopping)."""
        return self.recovery != "none" and (self.keep_best or self.early_stopping_patience is not None)

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
        """Check every setting that needs no model; raise ConfigError naming the fix.

        Types, choices and bounds come from the field declarations (one generic loop); what
        follows are the rules that tie settings together.
        """
        check_settings(self)
        self.pattern  # noqa: B018 - parsing validates
        if self.magnitude_scope == "global" and self.pattern.is_nm:
            raise ConfigError("magnitude_scope 'global' cannot make N:M patterns: use 'layer'")
        if self.project_to_target and self.schedule != "iterative":
            raise ConfigError("project_to_target measures an iterative trial's way to its target: use --schedule "
                              "iterative, or drop it (a one-shot trial is at its target after its only step)")
        if self.eval_stride is not None and self.eval_seqlen is not None and self.eval_stride > self.eval_seqlen:
            raise ConfigError(
                f"eval_stride {self.eval_stride} is larger than eval_seqlen {self.eval_seqlen}: "
                "tokens between windows would never be scored; use a stride <= the window"
            )
        if self.eval_max_tokens is not None and self.eval_max_windows is not None:
            raise ConfigError("eval_max_tokens and eval_max_windows both limit the evaluation: give one of them")
        if self.calibration_passes != "two" and self.method not in ("wanda", "sparsegpt"):
            raise ConfigError(f"calibration_passes applies to wanda and sparsegpt; --method {self.method} "
                              "does not calibrate layer by layer: leave it at two")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"unknown device '{self.device}': use auto, cpu, cuda or cuda:N")
        if self.offload != "none" and self.recovery != "none":
            raise ConfigError(f"--offload {self.offload} covers pruning (unstructured and structured) and "
                              "evaluation; recovery (training) needs the whole model on the device: use "
                              "--offload none, or prune with --offload and --save, then recover the saved model")
        if self.save and not self.output:
            raise ConfigError("save is set but no output directory is given: add --output DIR")
        if self.val_data is not None and self.eval_data is not None and _same_text(self.val_data, self.eval_data):
            raise ConfigError(f"--val-data and --eval-data both name {self.eval_data}: validation text drives "
                              "decisions and test text must stay unseen by them; give disjoint texts")
        self._validate_zeroshot()
        self._validate_schedule_and_recovery()
        self._validate_structured()
        self._validate_allocation()
        return self

    def _validate_zeroshot(self) -> None:
        from raysparse.metrics.zeroshot import lm_eval_version, parse_task_names

        if isinstance(self.eval_tasks, (list, tuple)):
            self.eval_tasks = ",".join(str(name) for name in self.eval_tasks)
        if not parse_task_names(self.eval_tasks):
            if self.eval_tasks_path is not None:
                raise ConfigError("--eval-tasks-path is set but no --eval-tasks: name the tasks to run")
            return
        lm_eval_version()  # the extra is installed
        if self.eval_tasks_path is not None and not Path(self.eval_tasks_path).is_dir():
            raise ConfigError(f"--eval-tasks-path {self.eval_tasks_path} is not a folder of lm-eval task YAMLs")

    def _validate_structured(self) -> None:
        if not self.is_structured:
            if self.pruning_ratio is not None:
                raise ConfigError("pruning_ratio applies to --method structured; unstructured methods take --sparsity")
            if self.layer_start != 0 or self.layer_end is not None:
                raise ConfigError("layer_start/layer_end apply to --method structured; unstructured methods prune every layer")
            return
        if self.pruning_ratio is None:
            raise ConfigError("--method structured needs --pruning-ratio: the fraction of parameters to remove, e.g. 0.25")
        if self.schedule != "oneshot":
            raise ConfigError("structured pruning runs one-shot: use --schedule oneshot (recovery still applies)")
        if self.layer_end is not None and self.layer_end <= self.layer_start:
            raise ConfigError(f"layer range [{self.layer_start}, {self.layer_end}) is empty: "
                              "layer_end is exclusive and must be larger than layer_start")

    def _validate_allocation(self) -> None:
        if self.layer_ratios is not None:
            if self.pruning_strategy != "uniform":
                raise ConfigError("--layer-ratios gives the per-layer ratios itself: drop --pruning-strategy "
                                  f"{self.pruning_strategy} (or drop --layer-ratios)")
            if self.is_structured or self.pattern.is_nm:
                raise ConfigError("--layer-ratios needs unstructured pruning at a fractional sparsity: N:M patterns "
                                  "are fixed per layer, structured pruning takes --pruning-ratio")
            if self.method == "magnitude" and self.magnitude_scope == "global":
                raise ConfigError("a global magnitude threshold sets its own per-layer ratios: drop --layer-ratios "
                                  "or use magnitude_scope layer")
        if self.pruning_strategy == "uniform":
            return
        if self.pattern.is_nm and not self.is_structured:
            raise ConfigError("per-layer ratios need a fractional sparsity: N:M patterns are uniform by definition")
        if self.method == "magnitude" and self.magnitude_scope == "global":
            raise ConfigError("a global magnitude threshold sets its own per-layer ratios: use pruning_strategy uniform")
        if self.min_pruning_rate > self.max_pruning_rate:
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

    def _validate_schedule_and_recovery(self) -> None:
        if self.schedule == "iterative" and self.pattern.is_nm:
            raise ConfigError("an iterative schedule needs a fractional sparsity, not an N:M pattern")
        if self.recovery == "lora":
            if not self.lora_targets:
                raise ConfigError("lora_target_modules is empty: name linear layers, e.g. q_proj,v_proj")
            if self.workers > 1:
                raise ConfigError("LoRA recovery runs in-process: use --workers 1 (distributed recovery is masked)")
        if self.distill != "none":
            if self.recovery == "none":
                raise ConfigError(f"--distill {self.distill} needs a recovery: add --recovery masked or lora")
            self.distill_layer_indices  # noqa: B018 - parses, raising on a malformed list

    @property
    def lora_targets(self) -> list[str]:
        value = self.lora_target_modules
        items = value.split(",") if isinstance(value, str) else list(value)
        return [item.strip() for item in items if item.strip()]

    @property
    def distill_layer_indices(self) -> tuple[int, ...] | None:
        """--distill-layers as integers (None = every decoder layer)."""
        value = self.distill_layers
        if value is None or value == "" or value == []:
            return None
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            return tuple(int(str(item).strip()) for item in items if str(item).strip())
        except ValueError:
            raise ConfigError(f"--distill-layers {value!r} must be comma-separated layer indices, e.g. 0,5,-1") from None

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
        return from_mapping(cls, values, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrialConfig":
        """Read a JSON or YAML config file (a search's best_config.json, say)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_bytes().decode("utf-8")
            values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise ConfigError(f"cannot parse config file {path}: {parse_error_line(exc)}") from None
        if isinstance(values, dict) and "config" in values and isinstance(values["config"], dict):
            values = values["config"]  # accept a summary.json directly
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of setting: value")
        return cls.from_dict(values, source=str(path))


PruneConfig = TrialConfig  # the one-shot API name; same settings


def _same_text(a: str, b: str) -> bool:
    """The same named dataset or the same file (however the path is written)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
