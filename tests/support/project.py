"""Project for tests, with the real services it calls: identity (tokens, Authorize, audit) and
billing (the pool), all in this process on loopback ports, verifying real tokens."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.project.v1 import project_pb2 as pb
from hangar.project.v1 import project_pb2_grpc
from hangar.type.v1 import resources_pb2
from services.billing.server import BillingApp
from services.project.server import ProjectApp
from shared.db import Database
from shared.ids import new_id
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.support.identity import RunningIdentity, bearer, running_identity


def master_keys(*ids: str) -> dict[str, bytes]:
    return {kid: secrets.token_bytes(32) for kid in ids}


def master_keys_env(keys: Mapping[str, bytes]) -> str:
    import json

    return json.dumps({kid: base64.b64encode(key).decode() for kid, key in keys.items()})


@dataclass
class Member:
    user_id: str
    email: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)


@dataclass
class Tenant:
    org_id: str
    owner: Member
    members: dict[str, Member] = field(default_factory=dict)  # role name -> member


@dataclass
class Stack:
    identity: RunningIdentity
    billing_app: BillingApp
    billing_server: RunningServer
    project_app: ProjectApp
    project_server: RunningServer
    project_address: str
    billing_address: str
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self._channels.append(channel)
        return channel

    def __post_init__(self) -> None:
        self.project = project_pb2_grpc.ProjectServiceStub(self._channel(self.project_address))
        self.billing = billing_pb2_grpc.BillingServiceStub(self._channel(self.billing_address))

    async def user(self) -> Member:
        auth = await self.identity.sign_up()
        return Member(auth.user.id, auth.user.email, auth.access_token)

    async def tenant(self, *roles: str) -> Tenant:
        """A new org (owner + one member per role) with billing's default subscription."""
        owner = await self.user()
        org = await self.identity.create_org(owner.token)
        await self.subscribe(org.id)
        tenant = Tenant(org.id, owner)
        for role in roles:
            member = await self.user()
            await self.identity.add_member(
                owner.token, org.id, member.email, ipb.Role.Value(f"ROLE_{role.upper()}")
            )
            tenant.members[role] = member
        return tenant

    async def subscribe(self, org_id: str) -> None:
        """What billing does on organization.created (its own consumer is off here)."""
        event = events_pb2.Event(
            id=new_id(), type="organization.created", organization_id=org_id, aggregate_id=org_id
        )
        async with self.billing_app.db.transaction() as tx:
            await self.billing_app.on_identity_event(tx, event)

    async def allocated(self, org_id: str) -> resources_pb2.Resources:
        token = await self.identity.service_token("project")
        total = resources_pb2.Resources()
        reply = await self.billing.ListAllocations(
            billing_pb2.ListAllocationsRequest(organization_id=org_id, page_size=500),
            metadata=bearer(token),
        )
        for a in reply.allocations:
            total.ram_mb += a.resources.ram_mb
            total.cpu_millis += a.resources.cpu_millis
            total.bandwidth_gb += a.resources.bandwidth_gb
        return total

    async def allocations(self, org_id: str) -> dict[str, billing_pb2.Allocation]:
        token = await self.identity.service_token("project")
        reply = await self.billing.ListAllocations(
            billing_pb2.ListAllocationsRequest(organization_id=org_id, page_size=500),
            metadata=bearer(token),
        )
        return {a.project_id: a for a in reply.allocations}

    async def create(
        self, tenant: Tenant, member: Member | None = None, **fields: object
    ) -> pb.Project:
        slug = str(fields.pop("slug", f"app-{secrets.token_hex(4)}"))
        project = pb.Project(
            name=str(fields.pop("name", slug)),
            slug=slug,
            resources=resources_pb2.Resources(
                ram_mb=int(fields.pop("ram_mb", 128)),  # type: ignore[call-overload]
                cpu_millis=int(fields.pop("cpu_millis", 100)),  # type: ignore[call-overload]
                bandwidth_gb=int(fields.pop("bandwidth_gb", 1)),  # type: ignore[call-overload]
            ),
            region=str(fields.pop("region", "local")),
            **fields,  # type: ignore[arg-type]
        )
        return await self.project.CreateProject(
            pb.CreateProjectRequest(organization_id=tenant.org_id, project=project),
            metadata=(member or tenant.owner).md,
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.project_server.stop()
        await self.billing_server.stop()


def project_settings(
    database_url: str,
    db_passwords: Mapping[str, str],
    identity: RunningIdentity,
    billing_address: str,
    keys: Mapping[str, bytes],
    active_key: str,
) -> Settings:
    return Settings(
        service="project",
        database_url=database_url,
        db_passwords=dict(db_passwords),
        addresses={
            **identity.settings.addresses,
            "identity": identity.address,
            "billing": billing_address,
        },
        service_secrets=dict(identity.settings.service_secrets),
        project_master_keys=dict(keys),
        project_master_key_id=active_key,
        project_reconcile_seconds=3600,
    )


async def start_project(
    settings: Settings, *, run_loops: bool = False
) -> tuple[ProjectApp, RunningServer]:
    db = await Database.connect(settings.service_database_url("project"), max_size=20)
    app = ProjectApp(settings, db, run_loops=run_loops)
    server = await start_server(app, "127.0.0.1:0", grace=0.5)
    return app, server


@asynccontextmanager
async def running_stack(
    database_url: str,
    db_passwords: Mapping[str, str],
    *,
    keys: Mapping[str, bytes] | None = None,
    active_key: str = "",
    run_loops: bool = False,
    **project_settings_overrides: Any,
) -> AsyncIterator[Stack]:
    """Identity, billing and project servers in this process; `project_settings_overrides`
    replace fields of project's settings (an apps domain...; `addresses` are added to its
    own)."""
    keys = keys or master_keys("mk-1")
    async with running_identity(database_url, db_passwords) as identity:
        billing_settings = replace(
            identity.settings,
            service="billing",
            addresses={**identity.settings.addresses, "identity": identity.address},
            jwt_signing_keys=(),
        )
        billing_db = await Database.connect(
            billing_settings.service_database_url("billing"), max_size=20
        )
        billing_app = BillingApp(
            billing_settings, billing_db, consume_identity=False, run_cycle=False
        )
        billing_server = await start_server(billing_app, "127.0.0.1:0", grace=0.5)
        billing_address = f"127.0.0.1:{billing_server.port}"
        settings = project_settings(
            database_url,
            db_passwords,
            identity,
            billing_address,
            keys,
            active_key or next(iter(keys)),
        )
        overrides = dict(project_settings_overrides)
        if "addresses" in overrides:
            overrides["addresses"] = {**settings.addresses, **overrides["addresses"]}
        settings = replace(settings, **overrides)
        app, server = await start_project(settings, run_loops=run_loops)
        stack = Stack(
            identity,
            billing_app,
            billing_server,
            app,
            server,
            f"127.0.0.1:{server.port}",
            billing_address,
        )
        try:
            yield stack
        finally:
            await stack.close()


async def eventually(check, within: float = 10.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Polls an async `check` until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
