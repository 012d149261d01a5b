"""The Ray Train environment of a distributed recovery: timeouts sized for a loaded machine,
and the State API users (Train state tracking, the PlacementGroupCleaner) only where a
dashboard serves that API. See the driver's docstring for why."""
from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
# Ray Train's timeouts, sized for slow start-up (a value the user set is kept). Read where the
# trainer is built and passed on to its controller and workers.
TRAIN_ENV = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",  # Ray's 60 s: too short beside busy cores
    "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "1200",  # a starved worker is slow, not dead
}
DASHBOARD_PROBE_TIMEOUT_S = 2.0


def dashboard_reachable() -> bool:
    """True when the connected Ray cluster has a dashboard that answers (it serves the State API)."""
    import socket
    from urllib.parse import urlparse

    try:
        from ray._private.services import get_webui_url_from_internal_kv

        url = get_webui_url_from_internal_kv()
    except Exception:  # noqa: BLE001 - private API moved, or not connected: no dashboard known
        return False
    if not url:
        return False
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname or not parsed.port:
        return False
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=DASHBOARD_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def train_env(dashboard: bool) -> dict[str, str]:
    """The Ray Train environment for this run: timeouts, and state tracking only with a dashboard."""
    env = {name: os.environ.get(name, value) for name, value in TRAIN_ENV.items()}
    env[STATE_TRACKING_ENV] = os.environ.get(STATE_TRACKING_ENV, "1" if dashboard else "0")
    return env


class EnvSet:
    """Set environment variables for a block and restore them after (Ray reads them in `fit`)."""

    def __init__(self, env: dict[str, str]):
        self.env, self.saved = env, {}

    def __enter__(self) -> None:
        self.saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def trainer_class(dashboard: bool) -> type:
    """TorchTrainer, without the PlacementGroupCleaner when no dashboard serves the State API.

    The cleaner (a default callback of every Train V2 run) removes the run's placement group
    when a State API query says the controller is gone; with no dashboard every query fails.
    Overrides Ray's private `_create_default_callbacks` (pinned by tests/test_distributed_load.py).
    """
    from ray.train.torch import TorchTrainer

    if dashboard:
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class TrainerWithoutStateApi(TorchTrainer):
        def _create_default_callbacks(self):  # noqa: ANN202 - Ray's signature
            return [cb for cb in super()._create_default_callbacks()
                    if not isinstance(cb, PlacementGroupCleanerCallback)]

    return TrainerWithoutStateApi


def joinable_cluster_address(probe_timeout_s: float = 2.0) -> str | None:
    """The cluster a plain `ray.init()` would join: RAY_ADDRESS, or the last `ray start` here.

    None when `ray.init()` should start a local instance of its own. A `ray start` that was
    killed (not `ray stop`ped) leaves its record behind, and a plain `ray.init()` then fails
    after a minute of GCS retries ("Failed to connect to GCS"); a record whose port does not
    answer is ignored with a warning. RAY_ADDRESS is the user's explicit choice and is kept,
    so a dead one still fails loudly at `ray.init`.
    """
    try:  # the private helper `ray.init()` itself resolves its address with
        from ray._private.services import canonicalize_bootstrap_address

        address = canonicalize_bootstrap_address(None)
    except (ConnectionError, RuntimeError, ValueError, ImportError):
        return None
    if not address or os.environ.get("RAY_ADDRESS"):
        return address
    resolved = host_port(address)
    if resolved is None:
        return address
    try:
        with socket.create_connection(resolved, timeout=probe_timeout_s):
            return address
    except OSError:
        logger.warning(
            "ignoring the record of a `ray start` cluster at %s that no longer answers (left by a "
            "killed `ray start`; `ray stop` removes it); starting a local Ray instead", address)
        return None


def host_port(address: str) -> tuple[str, int] | None:
    """host and port of a Ray address such as `ray://10.0.0.1:10001` or `[::1]:6379` (None: no port)."""
    target = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
