"""gRPC clients between services: one channel per target, a deadline on every call, the
caller's request id and remaining deadline passed on, and retries on UNAVAILABLE for methods
the contract marks idempotent (`option idempotency_level` in the .proto).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import descriptor, descriptor_pb2

from shared.context import remaining_seconds, request_id_var
from shared.errors import DeadlineExceeded
from shared.tls import TlsCredentials, process_of, process_tls
from shared.tracing import client_interceptors

if TYPE_CHECKING:
    from shared.metrics import Metrics

TokenProvider = Callable[[], Awaitable[str]]
StubT = TypeVar("StubT")

STAMP_EVERY_SECONDS = 1.0  # how often Clients looks whether its TLS files were renewed

_RETRYABLE = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)


def retry_service_config(
    services: Iterable[descriptor.ServiceDescriptor], *, round_robin: bool = False
) -> str:
    """A gRPC service config that retries UNAVAILABLE on the idempotent methods only; with
    `round_robin`, calls are spread over every address the target resolves to (replicas)."""
    names = [
        {"service": svc.full_name, "method": method.name}
        for svc in services
        for method in svc.methods
        if method.GetOptions().idempotency_level in _RETRYABLE
    ]
    config: dict[str, Any] = {"methodConfig": []}
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return json.dumps(config)


def replica_addresses(address: str) -> list[str]:
    """The addresses an address setting names: one "host:port", or a service's replicas as
    a comma-separated list (HANGAR_<SVC>_TARGETS)."""
    return [part.strip() for part in address.split(",") if part.strip()]


def _ip_family(address: str) -> str:
    host, _, port = address.rpartition(":")
    if port.isdigit():
        try:
            if host.startswith("[") and host.endswith("]"):
                ipaddress.IPv6Address(host[1:-1])
                return "ipv6"
            ipaddress.IPv4Address(host)
            return "ipv4"
        except ValueError:
            pass
    raise ValueError(
        f"{address!r}: each address of a list must be an IP literal with its port"
        " (127.0.0.1:50052, [::1]:50052); a DNS name that resolves to every replica is one"
        " address"
    )


def resolves_to_replicas(address: str) -> bool:
    """A `dns:` target ("dns:///identity-pods:50051", a Kubernetes headless Service): gRPC
    resolves it to every replica's address, and re-resolves as they come and go."""
    return address.strip().startswith("dns:")


def grpc_target(address: str) -> str:
    """The channel target for an address setting. One address is used as it is (a DNS name
    or an IP, one connection: gRPC's pick_first). Several become one static target of
    gRPC's `ipv4:`/`ipv6:` resolver ("ipv4:127.0.0.1:50052,127.0.0.1:50062"), which
    channel_options balances with round_robin, as it does a `dns:` target's addresses."""
    if resolves_to_replicas(address):
        return address.strip()
    addresses = replica_addresses(address)
    if len(addresses) < 2:
        return addresses[0] if addresses else address
    families = {_ip_family(a) for a in addresses}
    if len(families) > 1:
        raise ValueError(f"{address!r}: one list mixes IPv4 and IPv6 addresses")
    return f"{families.pop()}:{','.join(addresses)}"


def channel_options(
    address: str, services: Iterable[descriptor.ServiceDescriptor] = ()
) -> list[tuple[str, Any]]:
    """The options of a channel to `address` (grpc_target's argument): retries on the
    idempotent methods of `services`, and round_robin when it names several replicas, so
    each call goes to the next ready one and a dead replica is skipped as soon as its
    connection drops."""
    balanced = len(replica_addresses(address)) > 1 or resolves_to_replicas(address)
    return [
        ("grpc.service_config", retry_service_config(services, round_robin=balanced)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]


def make_channel(
    address: str,
    *,
    options: list[tuple[str, Any]],
    tls: TlsCredentials | None,
    peer: str = "",
    interceptors: Iterable[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to `address` (grpc_target's argument): plaintext without `tls`; with it,
    mutual TLS, the server's certificate checked against `peer`'s name (shared.tls)."""
    target = grpc_target(address)
    chain = list(interceptors) if interceptors is not None else None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    if not peer:
        raise ValueError(f"{address}: a TLS channel must name the process it calls")
    return grpc.aio.secure_channel(
        target,
        tls.channel_credentials(),
        options=[*options, *tls.channel_options(peer)],
        interceptors=chain,
    )


class _CallDefaults:
    """Shared by the four client interceptor kinds: deadline, request id, service token."""

    def __init__(self, default_timeout: float, token_provider: TokenProvider | None) -> None:
        self.default_timeout = default_timeout
        self.token_provider = token_provider

    async def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout if details.timeout is not None else self.default_timeout
        inbound = remaining_seconds()
        if inbound is not None:
            if inbound <= 0:
                raise DeadlineExceeded("the caller's deadline has already passed")
            timeout = min(timeout, inbound)
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        request_id = request_id_var.get()
        if request_id and "x-request-id" not in metadata:
            metadata.add("x-request-id", request_id)
        if self.token_provider is not None and "authorization" not in metadata:
            metadata.add("authorization", f"Bearer {await self.token_provider()}")
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class _UnaryUnary(_CallDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(await self.details(client_call_details), request)


class _UnaryStream(_CallDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(await self.details(client_call_details), request)


class _StreamUnary(_CallDefaults, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(await self.details(client_call_details), request_iterator)


class _StreamStream(_CallDefaults, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(await self.details(client_call_details), request_iterator)


def open_channel(
    address: str,
    *,
    services: Iterable[descriptor.ServiceDescriptor] = (),
    default_timeout: float = 5.0,
    token_provider: TokenProvider | None = None,
    streaming_timeout: float | None = None,
    metrics: Metrics | None = None,
    tls: TlsCredentials | None = None,
    peer: str = "",
) -> grpc.aio.Channel:
    """A channel with deadlines and retries. Streams get `streaming_timeout` (None: no limit).
    With `metrics`, every call is counted (grpc_client_*) once its deadline is set; with
    tracing on (shared.tracing), every call is a span and carries its `traceparent`. With
    `tls` (default: the process's HANGAR_TLS_* files), mutual TLS to the process `peer`
    (default: the one serving `services`)."""
    services = list(services)
    unary = (
        _UnaryUnary(default_timeout, token_provider),
        _StreamUnary(default_timeout, token_provider),
    )
    streams = (
        _UnaryStream(streaming_timeout or 10 * 365 * 86400.0, token_provider),
        _StreamStream(streaming_timeout or 10 * 365 * 86400.0, token_provider),
    )
    return make_channel(
        address,
        options=channel_options(address, services),
        tls=tls or process_tls(),
        peer=peer or next((p for s in services if (p := process_of(s.full_name))), ""),
        interceptors=[
            *unary,
            *streams,
            *(metrics.client_interceptors() if metrics else ()),
            *client_interceptors(),
        ],
    )


class Clients:
    """The channels one process keeps to other services, created once and reused."""

    def __init__(
        self,
        addresses: dict[str, str],
        *,
        default_timeout: float = 5.0,
        token_provider: TokenProvider | None = None,
        metrics: Metrics | None = None,
        tls: TlsCredentials | None = None,
    ) -> None:
        self.addresses = addresses
        self.default_timeout = default_timeout
        self.token_provider = token_provider
        self.metrics = metrics
        self.tls = tls  # None: the process's (open_channel)
        self._channels: dict[str, grpc.aio.Channel] = {}
        # The TLS files as each channel was made with them; once renewed, a new channel.
        self._stamps: dict[str, object] = {}
        self._stamp: object = ()
        self._stamped_at = -STAMP_EVERY_SECONDS
        self._retired: list[grpc.aio.Channel] = []

    def channel(
        self, target: str, services: Iterable[descriptor.ServiceDescriptor] = ()
    ) -> grpc.aio.Channel:
        now = time.monotonic()
        if now - self._stamped_at >= STAMP_EVERY_SECONDS:  # a few stat calls, once a second
            tls = self.tls or process_tls()
            self._stamp, self._stamped_at = (tls.stamp() if tls is not None else ()), now
        stamp = self._stamp
        if target in self._channels and self._stamps[target] != stamp:
            # Calls in flight finish on the old channel; it is closed with the others.
            self._retired.append(self._channels.pop(target))
        if target not in self._channels:
            self._stamps[target] = stamp
            self._channels[target] = open_channel(
                self.addresses[target],
                services=services,
                default_timeout=self.default_timeout,
                token_provider=self.token_provider,
                metrics=self.metrics,
                tls=self.tls,
                peer=target,
            )
        return self._channels[target]

    def files_changed(self) -> None:
        """Look at the TLS files again at the next call (a process that just renewed them)."""
        self._stamped_at = -STAMP_EVERY_SECONDS

    def stub(
        self,
        target: str,
        stub_class: Callable[[grpc.aio.Channel], StubT],
        service: descriptor.ServiceDescriptor,
    ) -> StubT:
        return stub_class(self.channel(target, [service]))

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()
        self._retired.clear()
