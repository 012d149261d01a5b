"""Everything the steps of a trial share: model, data streams, device, timer, statistics cache."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from raysparse.config import TrialConfig
from raysparse.config.inputs import check_inputs
from raysparse.data.overlap import KGRAM, MAX_SHARED, shared_fraction
from raysparse.data.sources import calibration_windows, resolve_source, token_stream
from raysparse.errors import DataError, ModelError
from raysparse.metrics.perplexity import perplexity, window_starts
from raysparse.metrics.resources import PhaseTimer
from raysparse.metrics.zeroshot import TaskSpec, describe_tasks, evaluate_tasks
from raysparse.models.loading import LoadedModel, load_model, resolve_device, resolve_model_path
from raysparse.models.offload import layers_on_device
from raysparse.trial.cache import StatsCache
from raysparse.trial.settings import ResolvedSettings, resolve_settings


@dataclass
class TrialContext:
    """What every step of a trial shares: model, data, device, timers."""

    config: TrialConfig
    settings: ResolvedSettings
    loaded: LoadedModel
    device: torch.device
    val_stream: torch.Tensor  # every decision; the test text only when the trial makes none
    test_stream: torch.Tensor  # reported, never used for a decision
    calib: torch.Tensor | None
    importance_calib: torch.Tensor | None
    train_windows: torch.Tensor | None
    timer: PhaseTimer
    cache: Any = None  # a StatsCache when the trial runs inside a search
    taylor_windows: torch.Tensor | None = None  # structured pruning's Taylor importance data
    fingerprints: dict[str, str] = field(default_factory=dict)  # content digests of model and data (cache keys)
    teacher: Any = None  # the frozen dense model for distillation, loaded when recovery first needs it
    teacher_cache: Any = None  # its outputs per training window (TeacherOutputCache), kept for the whole trial
    profile_ratios: list[float] | None = None  # --layer-ratios, checked against this model and the target
    tasks: TaskSpec | None = None  # lm-eval tasks (--eval-tasks)
    tasks_protocol: dict[str, Any] | None = None  # lm-eval's and the tasks' versions, the splits each role reads
    # Called with a partial record after every recovery epoch (a search with --fidelity epochs
    # reports it to ASHA); None: reports come once per iteration only.
    on_epoch: Any = None

    def zeroshot(self, role: str = "validation", desc: str = "zero-shot") -> dict[str, Any] | None:
        """The lm-eval tasks on the model as it is now (None without --eval-tasks)."""
        if self.tasks is None:
            return None
        return evaluate_tasks(self.loaded.model, self.loaded.tokenizer, self.tasks, role, self.device, desc)

    def evaluate(self, model: torch.nn.Module | None = None, desc: str = "perplexity") -> float:
        """Perplexity on the validation text: what every decision of the trial reads."""
        return self._perplexity(self.val_stream, model, desc)

    def evaluate_test(self, model: torch.nn.Module | None = None, desc: str = "test perplexity") -> float:
        """Perplexity on the test text: reported, never compared to choose anything."""
        return self._perplexity(self.test_stream, model, desc)

    def _perplexity(self, stream: torch.Tensor, model: torch.nn.Module | None, desc: str) -> float:
        with self.on_device():
            return perplexity(
                model if model is not None else self.loaded.model, stream, self.settings.eval_seqlen,
                self.settings.eval_stride, batch_size=self.config.eval_batch_size,
                max_windows=self.config.eval_max_windows, max_tokens=self.config.eval_max_tokens,
                device=self.device, desc=desc,
            ).ppl

    def on_device(self) -> contextlib.AbstractContextManager:
        """Forward passes of the model with --offload: one decoder layer at a time on the device."""
        if self.config.offload == "none":
            return contextlib.nullcontext()
        return layers_on_device(self.loaded.adapter, self.device)


def _prepare(config: TrialConfig) -> TrialContext:
    config.validate()
    check_inputs(config)
    settings = resolve_settings(config)
    tasks = TaskSpec.from_config(config)
    # Task names and datasets are checked here, before the model is loaded.
    tasks_protocol = describe_tasks(tasks) if tasks is not None else None
    calib_source = resolve_source(settings.calib_data, "calibration")
    test_source = resolve_source(settings.eval_data, "test")
    val_source = resolve_source(settings.val_data, "validation") if settings.val_data else None
    train_source = resolve_source(settings.train_data, "calibration") if config.recovery != "none" else None
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    timer = PhaseTimer()
    with timer.phase("load"):
        loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code, config.offload)
        if config.offload == "none":  # offloaded: weights stay on the host / on disk, layers visit the device
            loaded.model.to(device)
        if config.distill != "none" and config.teacher:
            check_teacher(config.teacher, loaded, config.trust_remote_code)
    with timer.phase("data"):
        test_stream = token_stream(loaded.tokenizer, test_source)
        val_stream = token_stream(loaded.tokenizer, val_source) if val_source is not None else test_stream
        for role, source, stream in (("validation", val_source, val_stream), ("test", test_source, test_stream)):
            if source is not None:
                check_window_fits(stream, settings.eval_seqlen, settings.eval_stride, role, source.describe())
        calib = importance_calib = taylor_windows = None
        if config.is_structured:
            taylor_windows = calibration_windows(token_stream(loaded.tokenizer, calib_source), config.num_examples,
                                                 settings.taylor_seqlen, config.seed, flag="--max-seq-len")
        elif config.method != "magnitude":
            calib = calibration_windows(token_stream(loaded.tokenizer, calib_source), config.nsamples,
                                        settings.seqlen, config.seed)
        if config.pruning_strategy != "uniform" and not config.importance_config:
            importance_calib = calibration_windows(token_stream(loaded.tokenizer, calib_source),
                                                   config.importance_samples, settings.seqlen, config.seed)
        train_windows = None
        if train_source is not None:
            # A different seed than calibration, so training does not just replay the calibration windows.
            train_windows = calibration_windows(token_stream(loaded.tokenizer, train_source), config.train_samples,
                                                settings.train_seqlen, config.seed + 1, role="training",
                                                flag="--train-seqlen")
        others = [("validation", val_source, val_stream)] if val_source is not None else []
        others.append(("calibration", calib_source, token_stream(loaded.tokenizer, calib_source)))
        if train_source is not None:
            others.append(("training", train_source, token_stream(loaded.tokenizer, train_source)))
        check_disjoint(test_stream, test_source.describe(), others)
    cache = None
    if config.stats_cache:
        cache = StatsCache(config.stats_cache)
    ctx = TrialContext(config, settings, loaded, device, val_stream, test_stream, calib, importance_calib,
                       train_windows, timer, cache, taylor_windows, tasks=tasks, tasks_protocol=tasks_protocol)
    if config.layer_ratios:
        ctx.profile_ratios = load_profile_ratios(ctx)
    return ctx


def load_profile_ratios(ctx: TrialContext) -> list[float]:
    """--layer-ratios, refused for another model (layer count, fingerprint) or another total."""
    from raysparse.config.layer_ratios import check_layer_ratios, read_layer_ratios
    from raysparse.models.fingerprint import model_fingerprint

    config, adapter = ctx.config, ctx.loaded.adapter
    data = read_layer_ratios(config.layer_ratios)
    layers = adapter.decoder_layers()
    sizes = [sum(m.weight.numel() for m in adapter.prunable_linears(layer).values()) for layer in layers]
    fingerprint = None
    if data.get("fingerprint") is not None and data.get("num_layers") == len(layers):
        revision = getattr(ctx.loaded.model.config, "_commit_hash", None)
        fingerprint = model_fingerprint(ctx.loaded.path, revision)
    return check_layer_ratios(data, config.layer_ratios, len(layers), fingerprint, sizes, config.target_ratio)


def check_teacher(teacher: str, student: LoadedModel, trust_remote_code: bool) -> None:
    """Refuse a teacher that reads tokens differently, before any pruning: its distributions
    would be over other tokens, and the KL between them meaningless."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(teacher), trust_remote_code=trust_remote_code)
        vocab_size = AutoConfig.from_pretrained(resolve_model_path(teacher), trust_remote_code=trust_remote_code).vocab_size
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's path
        raise ModelError(f"cannot read the teacher {teacher}: {str(exc).splitlines()[0]}") from None
    if tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ModelError(f"the teacher {teacher} has another tokenizer than the model: distillation needs the same "
                         "tokenizer (give a teacher of the same family, or leave --teacher unset for the dense model)")
    student_vocab = student.model.config.vocab_size
    if vocab_size != student_vocab:
        raise ModelError(f"the teacher {teacher} has a vocabulary of {vocab_size} logits, the model {student_vocab}: "
                         "distillation compares them one to one")


def check_window_fits(stream: torch.Tensor, seqlen: int, stride: int, role: str, name: str) -> None:
    """Refuse text too short for one evaluation window (its perplexity would be undefined)."""
    if not window_starts(stream.numel(), seqlen, stride):
        raise DataError(f"{role} text {name} has {stream.numel()} tokens, fewer than one evaluation window of "
                        f"{seqlen}: give a longer text or a smaller --eval-seqlen")


def check_disjoint(test: torch.Tensor, test_name: str, others: list[tuple[str, Any, torch.Tensor]]) -> None:
    """Refuse validation, calibration or training text that already contains the test text."""
    for role, source, stream in others:
        shared = shared_fraction(stream, test)
        if shared > MAX_SHARED:
            raise DataError(
                f"{100 * shared:.1f}% of the test text's {KGRAM}-token spans ({test_name}) also occur in the "
                f"{role} text ({source.describe()}): the test number would not be held out; give disjoint texts"
            )
