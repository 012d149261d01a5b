"""Offline checks of Ray cluster configs (`ray up` has no dry run).

Ray ships its own JSON schema and fills provider defaults in `prepare_config`; running both
before `ray up` turns a misspelt key into a message naming its path instead of a failure
minutes into provisioning.
"""
from __future__ import annotations

import contextlib
import difflib
import io
from pathlib import Path
from typing import Any

import yaml

from raysparse.errors import ConfigError

_LOCAL_PROVIDER_KEYS = {"coordinator_address", "external_head_ip", "head_ip", "worker_ips"}


def validate_cluster_config(path: str | Path) -> dict[str, Any]:
    """Load, fill defaults and validate a cluster YAML with Ray's own validator."""

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): give a cluster YAML such as cluster.yaml") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"{path} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of Ray cluster settings")
    _check_provider_keys(path, raw)
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # Ray's checks print their own PANIC/error lines before raising: keep them off the terminal.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            validate_config(prepare_config(raw))
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise ConfigError(f"{path}: invalid at '{where}': {' '.join(exc.message.split())}") from None
        except (ValueError, KeyError, RuntimeError, TypeError, click.ClickException) as exc:
            message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            raise ConfigError(f"{path}: {' '.join(message.split())}") from None
    return raw


def _known_provider_keys() -> set[str]:
    """Keys Ray's schema names under `provider`, plus the local provider's own."""
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    return set(schema["properties"]["provider"]["properties"]) | _LOCAL_PROVIDER_KEYS


def _check_provider_keys(path: Path, raw: dict[str, Any]) -> None:
    """Ray's schema lets `provider` hold any key (providers take their own), so a misspelt
    `head_ipp` would pass it and fail later with another message: name near misses here."""
    provider = raw.get("provider")
    if not isinstance(provider, dict):
        return
    known = _known_provider_keys()
    for key in provider:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{path}: unknown key 'provider/{key}': did you mean '{close[0]}'?")
