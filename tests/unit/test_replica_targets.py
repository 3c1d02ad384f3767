"""Several replicas of a service behind one address setting: the channel target and service
config shared.clients builds from it, the settings that name them, and calls spread over two
real loopback servers by round_robin."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.clients import channel_options, grpc_target, open_channel, retry_service_config
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.unit.test_grpc_plumbing import SERVICE, Recorder, _App


def _service_config(address: str) -> dict[str, object]:
    options = dict(channel_options(address, [SERVICE]))
    config: dict[str, object] = json.loads(options["grpc.service_config"])
    return config


@pytest.mark.parametrize("address", ["127.0.0.1:50052", "identity:50051"])
def test_one_address_is_the_target_as_it_was(address: str) -> None:
    assert grpc_target(address) == address
    assert _service_config(address) == json.loads(retry_service_config([SERVICE]))
    assert "loadBalancingConfig" not in _service_config(address)


def test_a_dns_target_is_balanced_over_what_it_resolves_to() -> None:
    """A Kubernetes headless Service ("dns:///identity-pods:50051") resolves to every
    replica: round_robin over them, as a static list is."""
    address = "dns:///identity-pods.hangar.svc:50051"
    assert grpc_target(address) == address
    assert _service_config(address)["loadBalancingConfig"] == [{"round_robin": {}}]


def test_several_addresses_are_one_static_target_balanced_round_robin() -> None:
    address = "127.0.0.1:50052, 127.0.0.1:50062"
    assert grpc_target(address) == "ipv4:127.0.0.1:50052,127.0.0.1:50062"
    config = _service_config(address)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    # the retry rules are the single address's: idempotent methods only, UNAVAILABLE only
    assert config["methodConfig"] == json.loads(retry_service_config([SERVICE]))["methodConfig"]
    assert grpc_target("[::1]:50052,[::1]:50062") == "ipv6:[::1]:50052,[::1]:50062"


def test_a_trailing_comma_leaves_one_address() -> None:
    assert grpc_target("127.0.0.1:50052,") == "127.0.0.1:50052"
    assert "loadBalancingConfig" not in _service_config("127.0.0.1:50052,")


@pytest.mark.parametrize(
    "address",
    [
        "identity-0:50051,identity-1:50051",  # names: one DNS name resolving to all, instead
        "127.0.0.1,127.0.0.2",  # no ports
        "127.0.0.1:50052,[::1]:50052",  # one resolver scheme per target
    ],
)
def test_a_list_gRPC_cannot_resolve_statically_is_refused(address: str) -> None:
    with pytest.raises(ValueError):
        grpc_target(address)


def test_targets_name_the_replicas_for_clients_and_each_listens_on_its_own_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replicas = "127.0.0.1:50052,127.0.0.1:50062"
    monkeypatch.setenv("HANGAR_PROJECT_ADDR", "127.0.0.1:50062")
    monkeypatch.setenv("HANGAR_PROJECT_TARGETS", replicas)
    project = Settings.from_env("project")
    assert project.listen_address == "127.0.0.1:50062"
    assert project.addresses["project"] == replicas
    gateway = Settings.from_env("gateway")
    assert gateway.addresses["project"] == replicas
    monkeypatch.delenv("HANGAR_PROJECT_TARGETS")
    alone = Settings.from_env("project")
    assert alone.listen_address == alone.addresses["project"] == "127.0.0.1:50062"
    assert alone.own_address == ""  # nothing changes without targets


def test_a_process_listens_on_one_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANGAR_PROJECT_ADDR", "127.0.0.1:50052,127.0.0.1:50062")
    with pytest.raises(ValueError, match="HANGAR_PROJECT_TARGETS"):
        _ = Settings.from_env("project").listen_address
    # a client may still be given the list in the address setting itself
    assert Settings.from_env("gateway").addresses["project"] == "127.0.0.1:50052,127.0.0.1:50062"


@pytest.fixture
async def two_replicas() -> AsyncIterator[list[tuple[Recorder, RunningServer]]]:
    replicas = []
    for _ in range(2):
        recorder = Recorder()
        replicas.append((recorder, await start_server(_App(recorder), "127.0.0.1:0", grace=0.2)))
    yield replicas
    for _, server in replicas:
        await server.stop()


async def test_calls_spread_over_both_replicas_and_skip_a_stopped_one(
    two_replicas: list[tuple[Recorder, RunningServer]],
) -> None:
    (first, first_server), (second, second_server) = two_replicas
    address = f"127.0.0.1:{first_server.port},127.0.0.1:{second_server.port}"
    async with open_channel(address, services=[SERVICE], default_timeout=5) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        request = identity_pb2.GetOrganizationRequest(id="x")
        for _ in range(500):  # each replica, once connected, takes every other call
            await stub.GetOrganization(request)
            if first.seen_request_ids and second.seen_request_ids:
                break
            await asyncio.sleep(0.01)
        assert first.seen_request_ids and second.seen_request_ids

        await first_server.stop()
        before = len(second.seen_request_ids)
        for _ in range(10):  # every one answered, by the replica left
            assert (await stub.GetOrganization(request)).id == "x"
        assert len(second.seen_request_ids) == before + 10
        await second_server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # neither left: no hang
            await stub.GetOrganization(request, timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class _TwoAddresses(asyncio.DatagramProtocol):
    """A DNS server answering one name with two loopback addresses (a headless Service's
    records), every other question with no record."""

    def __init__(self, name: str, ips: list[str]) -> None:
        self.name, self.ips = name, ips
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = DNSRecord.parse(data)
        reply = query.reply()
        question = query.q
        if str(question.qname).rstrip(".") == self.name and QTYPE[question.qtype] == "A":
            for ip in self.ips:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(ip), ttl=1))
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)


async def test_calls_through_a_dns_target_spread_over_every_address_it_resolves_to() -> None:
    name = "identity-pods.hangar.test"
    loop = asyncio.get_running_loop()
    dns = _TwoAddresses(name, ["127.0.0.1", "127.0.0.2"])
    transport, _ = await loop.create_datagram_endpoint(lambda: dns, local_addr=("127.0.0.1", 0))
    dns_port = transport.get_extra_info("sockname")[1]
    first, second = Recorder(), Recorder()
    one = await start_server(_App(first), "127.0.0.1:0", grace=0.2)
    try:
        # The second replica on the same port at the other loopback address.
        two = await start_server(_App(second), f"127.0.0.2:{one.port}", grace=0.2)
    except (RuntimeError, OSError) as exc:  # pragma: no cover - a kernel without 127.0.0.2
        await one.stop()
        transport.close()
        pytest.skip(f"no second loopback address: {exc}")
    address = f"dns://127.0.0.1:{dns_port}/{name}:{one.port}"
    try:
        async with open_channel(address, services=[SERVICE], default_timeout=5) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            request = identity_pb2.GetOrganizationRequest(id="x")
            for _ in range(500):
                await stub.GetOrganization(request)
                if first.seen_request_ids and second.seen_request_ids:
                    break
                await asyncio.sleep(0.01)
            assert first.seen_request_ids and second.seen_request_ids
    finally:
        await one.stop()
        await two.stop()
        transport.close()
