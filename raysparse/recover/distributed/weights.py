"""Weights and run metadata as distributed recovery moves them: tied weights stored once,
safetensors on disk, and a fingerprint that keeps a resume from picking up another run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysparse.recover.distributed.job import EvalSpec
from raysparse.recover.loop import TrainSettings
from raysparse.sparsity.masks import Masks, MaskViolation

WEIGHTS_FILE = "model.safetensors"

META_FILE = "recovery.json"


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys that alias another tensor (tied embeddings): safetensors refuses shared storage."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        identity = (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        unique[key] = tensor
    return unique, aliases


def _is_tied(model: nn.Module, key: str) -> bool:
    """A key missing from a deduplicated state dict is fine if it is the same tensor as a present one."""
    state = model.state_dict()
    if key not in state:
        return False
    ptr = state[key].untyped_storage().data_ptr()
    return sum(1 for value in state.values() if value.untyped_storage().data_ptr() == ptr) > 1


def _write_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / WEIGHTS_FILE))
    meta = json.loads((folder / META_FILE).read_text())
    for alias, source in meta.get("aliases", {}).items():
        state.setdefault(alias, state[source])
    return state


def _read_meta(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / META_FILE).read_text())


def _check_state_masks(state: dict[str, torch.Tensor], masks: Masks, epoch: int) -> None:
    """Fail the epoch (not only the end) if a pruned weight moved: the invariant, checked early."""
    bad = [name for name, mask in masks.items() if name in state and bool((state[name][~mask] != 0).any())]
    if bad:
        raise MaskViolation(f"epoch {epoch}: pruned weights became non-zero under FSDP in {', '.join(bad)}")


def _fingerprint(model: nn.Module, masks: Masks, windows: torch.Tensor, settings: TrainSettings,
                 eval_spec: EvalSpec | None) -> str:
    """Identify the job (starting weights, masks, data, optimisation settings) so a run name
    reused for another job is refused instead of silently resumed. Epoch count, keep_best and
    patience are left out: raising the epochs of a finished run is a legitimate resume."""
    digest = hashlib.blake2b(digest_size=16)

    def add(value: Any) -> None:
        digest.update(repr(value).encode())

    add((type(model).__name__, model.config.to_json_string() if hasattr(model.config, "to_json_string") else ""))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            add((name, tuple(tensor.shape), f"{float(tensor.double().sum()):.6e}",
                 f"{float(tensor.double().abs().sum()):.6e}"))
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].detach().cpu().bool().contiguous().numpy().tobytes())
    digest.update(windows.detach().cpu().contiguous().numpy().tobytes())
    tuning = {k: v for k, v in dataclasses.asdict(settings).items()
              if k not in ("epochs", "keep_best", "early_stopping_patience")}
    add(sorted(tuning.items()))
    if eval_spec is not None:
        add((eval_spec.seqlen, eval_spec.stride, eval_spec.max_windows, eval_spec.stream.numel()))
        if eval_spec.max_tokens is not None:  # only when set: earlier runs' checkpoints keep their digest
            add(("max_tokens", eval_spec.max_tokens))
        digest.update(eval_spec.stream.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
