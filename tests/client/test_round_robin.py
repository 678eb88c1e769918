"""Client-side round-robin over replicas: one multi-address target, calls spread over every
server, results unchanged, a replica that drains is left out."""

from __future__ import annotations

import time

import pytest

from curvscope import Client
from curvscope_service.config import ServerConfig
from curvscope_service.in_process import InProcessServer


@pytest.fixture
def two_servers(tmp_path):
    """Two servers with separate stores (so a blob tells which server answered)."""
    with InProcessServer(ServerConfig(store=tmp_path / "a")) as a, InProcessServer(ServerConfig(store=tmp_path / "b")) as b:
        yield a, b


def both(a: InProcessServer, b: InProcessServer) -> str:
    return f"ipv4:{a.target},{b.target}"


def found_pattern(client: Client, sha256: str, calls: int) -> list[bool]:
    return [client.stat(sha256) is not None for _ in range(calls)]


def warm_up(client: Client, sha256: str) -> None:
    """Until both subchannels are connected (round robin only picks ready ones)."""
    deadline = time.monotonic() + 10
    while len(set(found_pattern(client, sha256, 4))) < 2:
        assert time.monotonic() < deadline, "the second server never received a call"


def test_round_robin_alternates_between_servers(two_servers, tmp_path):
    a, b = two_servers
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"only on server a")
    with Client(a.target) as direct:
        digest = direct.upload(blob)
    with Client(b.target) as direct:
        assert direct.stat(digest) is None

    with Client(both(a, b), load_balancing="round_robin") as balanced:
        warm_up(balanced, digest)
        pattern = found_pattern(balanced, digest, 10)
    # Strict alternation: every other call reached the server that holds the blob.
    assert pattern.count(True) == 5 and all(x != y for x, y in zip(pattern, pattern[1:])), pattern

    # Without the option the channel picks the first address and stays there.
    with Client(both(a, b)) as pinned:
        assert len(set(found_pattern(pinned, digest, 10))) == 1


def test_channel_options_are_passed_through(two_servers, tmp_path):
    a, b = two_servers
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"only on server b")
    with Client(b.target) as direct:
        digest = direct.upload(blob)
    with Client(both(a, b), options=[("grpc.lb_policy_name", "round_robin")]) as balanced:
        warm_up(balanced, digest)
        assert found_pattern(balanced, digest, 6).count(True) == 3


def test_replicas_sharing_a_store_serve_whole_analyses(tmp_path, digits_files):
    model, data = digits_files
    store = tmp_path / "shared"
    with InProcessServer(ServerConfig(store=store)) as a, InProcessServer(ServerConfig(store=store)) as b:
        with Client(a.target) as single:
            expected = single.analyze(model, data, eigen=2, seed=3).to_dict()["results"]["hessian_eigen"]
        with Client(both(a, b), load_balancing="round_robin") as balanced:
            # Upload, stat and analyse land on different replicas; the shared store makes it work.
            for _ in range(2):
                result = balanced.analyze(model, data, eigen=2, seed=3).to_dict()["results"]["hessian_eigen"]
                assert result["largest"] == pytest.approx(expected["largest"], rel=1e-6)

            a.stop()
            time.sleep(0.2)
            # The drained replica is left out: every further call reaches the other one.
            for _ in range(6):
                assert balanced.capabilities()["analyses"]
