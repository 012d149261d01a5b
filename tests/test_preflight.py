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
