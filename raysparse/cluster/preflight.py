"""Checks before a search launches anything on a cluster.

Two failure modes that otherwise cost the user minutes or a whole search:
- `ray.init(address=...)` pointed at a host:port where nothing listens does not fail: Ray
  2.60 retries its GCS connection 20 times with a long per-try timeout (measured here:
  still hanging after 10 minutes). A plain TCP connect answers in milliseconds.
- a `--storage` folder that is a local disk on each node instead of a shared mount: trials
  on other nodes write their outputs and checkpoints where the driver (and a retry on
  another node) never sees them. A task pinned to each node reads a token the driver
  wrote, which tells the two apart before any trial runs.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

from raysparse.errors import ConfigError
from raysparse.recover.distributed.ray_env import host_port

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0

PROBE_TIMEOUT_S = 120.0


def resolve_address(address: str) -> tuple[str, int] | None:
    """host and port of a Ray address ('auto' read from RAY_ADDRESS / the last `ray start`).

    None when the address cannot be resolved here (then `ray.init` gives its own error).
    """
    target = address
    if target == "auto":
        try:  # private helper (pinned by a test): where `ray start` recorded the head's address
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, RuntimeError, ValueError, ImportError):
            return None
    return host_port(target)


def check_address_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse fast when nothing listens at `address` (ray.init would hang for many minutes)."""
    resolved = resolve_address(address)
    if resolved is None:
        return
    host, port = resolved
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cannot reach a Ray cluster at '{address}' ({host}:{port}: {reason}): start one with "
            "`ray start --head` (or `ray up cluster.yaml`), check the address and port, or drop --address to run locally"
        ) from None


def _sees_token(path: str, token: str) -> tuple[bool, str]:
    """Run on a node: does it read the token the driver wrote at `path`? (and its host name)"""
    try:
        return Path(path).read_text(encoding="utf-8") == token, socket.gethostname()
    except OSError:
        return False, socket.gethostname()


def unshared_nodes(storage_root: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Alive nodes that do not see a file the driver writes under `storage_root` (empty: shared).

    A zero-CPU task pinned to each node reads the token, so the check fits beside running
    work and needs no free CPU. Nodes that do not answer within `timeout_s` are skipped
    with a warning (they may be starting): the check must not block a search on its own.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return []
    token = uuid.uuid4().hex
    probe = Path(storage_root) / f".raysparse-shared-{token[:12]}"
    probe.write_text(token, encoding="utf-8")
    try:
        remote = ray.remote(num_cpus=0, max_retries=0)(_sees_token)
        refs = {node["NodeID"]: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(str(probe), token) for node in nodes}
        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        if pending:
            logger.warning("%d node(s) did not answer the shared-storage check within %.0f s; not checked",
                           len(pending), timeout_s)
        missing = []
        for node in nodes:
            ref = refs[node["NodeID"]]
            if ref in ready:
                seen, host = ray.get(ref)
                if not seen:
                    missing.append(f"{node.get('NodeManagerAddress', '?')} ({host}, node {node['NodeID'][:12]})")
        return missing
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def check_shared_storage(storage_root: str) -> None:
    """Refuse a multi-node search whose storage folder is not shared by every node.

    Filesystem storage only: with object storage trials upload their folders instead.
    """
    missing = unshared_nodes(storage_root)
    if missing:
        raise ConfigError(
            f"--storage {storage_root} is not shared across the cluster's nodes: {', '.join(missing)} cannot see "
            "files the driver writes there, so their trials' results and checkpoints would be lost; mount one "
            "shared folder (NFS) at the same path on every node, or use one node"
        )


AUTH_MODE_ENV = "RAY_AUTH_MODE"


def send_token_like_auto(address: str | None) -> bool:
    """Make an explicit --address authenticate as `--address auto` does.

    Ray 2.60 turns token authentication on by default (`ray start --head` writes
    ~/.ray/auth_token). `ray.init(address="auto")` then sends the token it finds by itself,
    but an explicit address never does, and the cluster refuses the client (InvalidAuthToken,
    after half a minute of retries). With RAY_AUTH_MODE unset and a token on this machine,
    token mode is turned on here the way Ray's own `auto` path does it. True when it was.
    """
    if not address or address == "auto" or os.environ.get(AUTH_MODE_ENV) is not None:
        return False
    try:  # private helper (the one `auto` uses): respects RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # pragma: no cover - another Ray version: the refusal is explained instead
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def token_refused_hint(address: str | None, sent_token: bool) -> str | None:
    """What to do when a reachable cluster refused this client, if a token is the likely cause."""
    if not address or address == "auto":
        return None
    if sent_token or os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
        return (f"the Ray cluster at '{address}' answers but refused this machine's Ray token: use the "
                "cluster's (`ray get-auth-token` on the head prints it; put it in RAY_AUTH_TOKEN or "
                "~/.ray/auth_token here)")
    return (f"the Ray cluster at '{address}' answers but refused this client: if it uses token "
            "authentication (Ray's default since 2.60), run with RAY_AUTH_MODE=token and the cluster's "
            "token (`ray get-auth-token` on the head prints it; RAY_AUTH_TOKEN or ~/.ray/auth_token here)")
