"""The Hugging Face hub when it cannot be used: offline switches that count even after import.

Kept free of torch: `launch/prune.py` checks its inputs before importing it.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_requested() -> str | None:
    """The name of the offline switch set in the environment, if any."""
    return next((name for name in OFFLINE_SWITCHES
                 if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")), None)


def apply_offline_switches() -> None:
    """Make an offline switch set after huggingface_hub / datasets were imported count.

    Both libraries read HF_HUB_OFFLINE once, at import; a process that imported them before
    the switch was set (lm-eval imports datasets) would otherwise try the unreachable hub
    and wait out its retries.
    """
    if offline_requested() is None:
        return
    for module, switch in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                           ("datasets.config", "HF_DATASETS_OFFLINE")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, switch):
            setattr(loaded, switch, True)


def hub_offline_reason(probe_timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub is not to be used (an offline switch is set, or it does not answer), else None.

    An unreachable hub sets the offline switches for this process, so cached files still load
    at once instead of after half a minute of retries (and every retry's warning).
    """
    switch = offline_requested()
    if switch:
        apply_offline_switches()
        return f"{switch} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=probe_timeout_s):
            return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    logger.info("the Hugging Face hub (%s:%d) cannot be reached (%s): using cached files only", host, port, reason)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    apply_offline_switches()
    return f"cannot reach the Hugging Face hub ({host}:{port}: {reason})"
