"""Offline checks of Ray cluster configs (`ray up` has no dry run).

Ray ships its own JSON schema and fills provider defaults in `prepare_config`; running both
before `ray up` turns a misspelt key into a message naming its path instead of a failure
minutes into provisioning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raysparse.errors import ConfigError


def validate_cluster_config(path: str | Path) -> dict[str, Any]:
    """Load, fill defaults and validate a cluster YAML with Ray's own validator."""

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of Ray cluster settings")
    try:
        import jsonschema
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(raw))
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: invalid at '{where}': {exc.message}") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return raw
