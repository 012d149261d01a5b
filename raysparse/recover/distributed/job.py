"""The hand-off from the recovery driver to its Ray Train workers: what to train and how to
evaluate it (the weights travel as a separate object, so a resumed worker need not fetch them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raysparse.recover.distill import DistillSettings
from raysparse.recover.loop import TrainSettings
from raysparse.sparsity.masks import Masks


@dataclass
class EvalSpec:
    """How workers evaluate perplexity after every epoch (all ranks run the same windows,
    since an FSDP forward is a collective every rank must join)."""

    stream: torch.Tensor
    seqlen: int
    stride: int | None = None
    batch_size: int = 4
    max_windows: int | None = None
    max_tokens: int | None = None


@dataclass
class TeacherJob:
    """The frozen teacher each worker rebuilds and shards like the student (its weights travel
    as their own object), and how the recovery loss uses it."""

    model_cls: type
    model_config: Any
    dtype: torch.dtype
    aliases: dict[str, str]
    distill: DistillSettings


@dataclass
class _Job:
    """Everything a worker needs except the weights (shipped as a separate object so a
    resumed worker need not fetch them)."""

    model_cls: type
    model_config: Any
    dtype: torch.dtype
    aliases: dict[str, str]
    masks: Masks
    windows: torch.Tensor
    settings: TrainSettings
    eval_spec: EvalSpec | None
    fingerprint: str
    use_gpu: bool
    error_file: str = ""  # where a worker records a user-facing failure before raising
    teacher: TeacherJob | None = None  # distillation: the teacher to rebuild (weights shipped separately)
