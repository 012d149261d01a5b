"""Bad cluster input is refused fast: an --address where nothing listens."""
import socket
import time

import pytest

from raysparse.cli.search import search_main
from raysparse.cluster.preflight import check_address_reachable, resolve_address
from raysparse.errors import ConfigError


def closed_port() -> int:
    with socket.socket() as sock:  # bound then closed: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_address_is_one_line_exit_2_within_seconds(tmp_path, capsys):
    """Ray 2.60's ray.init hangs for many minutes on such an address; the search must not."""
    import ray

    assert not ray.is_initialized()
    started = time.perf_counter()
    assert search_main(["--address", f"127.0.0.1:{closed_port()}", "--storage", str(tmp_path)]) == 2
    assert time.perf_counter() - started < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach a Ray cluster at '127.0.0.1:"), err
    assert not ray.is_initialized()


@pytest.mark.parametrize("address,expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("ray://head.example:10001", ("head.example", 10001)),
    ("no-port", None),
])
def test_addresses_resolve_to_host_and_port(address, expected):
    assert resolve_address(address) == expected


def test_auto_reads_ray_address_through_rays_own_helper(monkeypatch):
    """Pins the private helper `auto` relies on (ray._private.services)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    host, port = resolve_address("auto")  # Ray maps 127.0.0.1 to this node's address
    assert port == 1 and host
    with pytest.raises(ConfigError, match="cannot reach"):
        check_address_reachable("auto", timeout_s=2)


def test_a_stale_ray_start_record_is_ignored_but_a_live_one_and_ray_address_are_kept(monkeypatch, caplog):
    """A killed `ray start` leaves /tmp/ray/ray_current_cluster behind; a plain ray.init() would
    then fail after a minute of GCS retries instead of starting a local instance."""
    import socket

    from ray._private import services

    from raysparse.recover.distributed.ray_env import joinable_cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: dead)
    with caplog.at_level("WARNING"):
        assert joinable_cluster_address(probe_timeout_s=0.5) is None
    assert "no longer answers" in caplog.text and dead.split(":")[1] in caplog.text  # Ray names the node IP

    with socket.socket() as listening:
        listening.bind(("0.0.0.0", 0))  # Ray rewrites 127.0.0.1 to the node IP
        listening.listen()
        live = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: live)
        assert joinable_cluster_address().endswith(live.split(":")[1])

    monkeypatch.setenv("RAY_ADDRESS", dead)  # the user's explicit choice: kept, fails loudly later
    assert joinable_cluster_address().endswith(dead.split(":")[1])
