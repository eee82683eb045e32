"""Launch variables checked before the rendezvous: the checks themselves, fast, without a process group.

The real processes (a NODE_RANK left in the shell, a MASTER_ADDR that does not resolve or answer, a
node 1 that starts before node 0) are in tests/ddp/test_ddp_failures.py.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from lightning_gpupar.ddp import rendezvous
from lightning_gpupar.ddp.checks import DDPConfigError
from lightning_gpupar.ddp.rendezvous import (
    CONNECT_BOUND_ENV,
    check_node_rank,
    check_rendezvous,
    connect_bound,
    reach_master,
    resolve_master,
)

LAUNCH = ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*LAUNCH, CONNECT_BOUND_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NODE_RANK": "1"}, "NODE_RANK"),
        ({"GROUP_RANK": "3"}, "GROUP_RANK"),
        ({"NODE_RANK": "2"}, "NODE_RANK"),
    ],
)
def test_a_node_rank_beyond_the_nodes_is_named(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(DDPConfigError) as info:
        check_node_rank(LightningEnvironment(), num_nodes=1)
    message = str(info.value)
    assert message.startswith(f"{variable}={env[variable]} (LightningEnvironment), but trainer.num_nodes=1")
    assert f"unset {variable}" in message and "node ranks 0..0 exist" in message


def test_node_ranks_within_the_nodes_pass(clean_env: pytest.MonkeyPatch) -> None:
    check_node_rank(LightningEnvironment(), num_nodes=1)
    clean_env.setenv("NODE_RANK", "1")
    check_node_rank(LightningEnvironment(), num_nodes=2)


def test_torchrun_and_slurm_name_their_own_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GROUP_RANK", "2")
    with pytest.raises(DDPConfigError, match=r"^GROUP_RANK=2 \(TorchElasticEnvironment\)"):
        check_node_rank(TorchElasticEnvironment(), num_nodes=2)
    clean_env.setenv("SLURM_NODEID", "4")
    with pytest.raises(DDPConfigError, match=r"^SLURM_NODEID=4 \(SLURMEnvironment\)"):
        check_node_rank(SLURMEnvironment(), num_nodes=2)


def test_an_address_that_does_not_resolve_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(DDPConfigError) as info:
        resolve_master("node-0.example.invalid", bound=5)
    message = str(info.value)
    assert message.startswith("MASTER_ADDR='node-0.example.invalid' does not resolve to an address")
    assert (
        "Name or service not known" in message
        and "unset it when every process runs on this machine" in message
    )


def test_a_resolver_that_does_not_answer_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3))
    start = time.monotonic()
    with pytest.raises(DDPConfigError, match=r"no answer from the resolver within 0.2 s"):
        resolve_master("slow-dns", bound=0.2)
    assert time.monotonic() - start < 1.5


def test_local_addresses_resolve() -> None:
    resolve_master("127.0.0.1", bound=5)
    resolve_master("localhost", bound=5)


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


def test_a_listening_rank_0_answers(listening: int) -> None:
    reach_master("127.0.0.1", listening, bound=2, global_rank=1)


def test_a_refused_connection_is_an_answer_rank_0_may_come_later(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger=rendezvous.__name__):
        reach_master("127.0.0.1", closed_port, bound=5, global_rank=3)
    assert time.monotonic() - start < 1
    assert f"nothing listens on MASTER_PORT={closed_port} yet" in caplog.text


@pytest.mark.parametrize(
    ("failure", "said"),
    [(TimeoutError("timed out"), "within 0.3 s."), (OSError(101, "Network is unreachable"), "unreachable")],
)
def test_silence_for_the_whole_bound_fails_naming_the_address(
    monkeypatch: pytest.MonkeyPatch, failure: OSError, said: str
) -> None:
    tries: list[float] = []

    def silent(address: object, timeout: float) -> None:
        tries.append(timeout)
        raise failure

    monkeypatch.setattr(socket, "create_connection", silent)
    start = time.monotonic()
    with pytest.raises(DDPConfigError) as info:
        reach_master("192.0.2.1", 29500, bound=0.3, global_rank=2)
    assert 0.3 <= time.monotonic() - start < 1.5
    message = str(info.value)
    assert message.startswith("MASTER_ADDR='192.0.2.1' gave no answer on MASTER_PORT=29500 within 0.3 s")
    assert said in message and "Rank 2 connects there" in message and CONNECT_BOUND_ENV in message
    assert len(tries) >= 1 and max(tries) <= 0.3


def test_rank_0_never_probes(monkeypatch: pytest.MonkeyPatch, clean_env: pytest.MonkeyPatch) -> None:
    """Rank 0 hosts the rendezvous and legitimately waits for the others."""

    def probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("rank 0 probed MASTER_ADDR")

    monkeypatch.setattr(socket, "create_connection", probe)
    clean_env.setenv("MASTER_PORT", "29500")
    check_rendezvous(LightningEnvironment(), num_nodes=1, global_rank=0, timeout_s=1800)


def test_the_bound_is_seconds_never_more_than_the_timeout(clean_env: pytest.MonkeyPatch) -> None:
    assert connect_bound(1800) == rendezvous.CONNECT_BOUND_S
    assert connect_bound(2) == 2
    clean_env.setenv(CONNECT_BOUND_ENV, "60")
    assert connect_bound(1800) == 60
    clean_env.setenv(CONNECT_BOUND_ENV, "soon")
    with pytest.raises(DDPConfigError, match=rf"^{CONNECT_BOUND_ENV}='soon' is not a number of seconds"):
        connect_bound(1800)
