"""Access changes hold on every service from the moment their response returns (issue #14,
item 1).

Real identity, billing and project in this process (tests/support/project.py) and a real
runtime beside them (tests/support/runtime.py), each with its RemoteAuthorizer, TokenVerifier
and AccessWatch as in production. Each scenario first makes a request on a project, a runtime
and a billing route while every watch is live (so the answer is cached), then changes access
through identity, then checks that the very next request on each route sees the change.

Races are driven by hooks (an Authorize answer held until the test lets it go, a watcher that
never gets to acknowledge), never by sleeping; every wait has a generous bound that is never
reached when things work.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
import pytest
from google.protobuf import field_mask_pb2

from hangar.billing.v1 import billing_pb2
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.identity.v1 import identity_pb2_grpc
from hangar.project.v1 import project_pb2
from hangar.runtime.v1 import runtime_pb2
from services.identity.access import AccessBroadcaster
from shared.auth import (
    AccessWatch,
    RemoteAuthorizer,
    ServiceTokenSource,
    TokenVerifier,
)
from shared.clients import Clients
from shared.context import principal_var
from shared.errors import PermissionDenied, Unauthenticated, Unavailable
from shared.loops import cancel_and_wait
from tests.support import runtime as runtime_fixtures
from tests.support.identity import (
    PASSWORD,
    RunningIdentity,
    bearer,
    identity_process_env,
    identity_settings,
    running_identity,
)
from tests.support.procs import ServiceProcess, free_port
from tests.support.project import Tenant, eventually
from tests.support.runtime import Neighbours, Runtime, launch_runtime

neighbours = runtime_fixtures.neighbours

Code = grpc.StatusCode
OK = Code.OK
DENIED = Code.PERMISSION_DENIED
WITHIN = 30.0  # generous bound on any wait; never reached when things work


@pytest.fixture(scope="module")
async def runtime(neighbours: Neighbours) -> AsyncIterator[Runtime]:
    running = await launch_runtime(neighbours)
    try:
        yield running
    finally:
        await running.stop()


@dataclass
class Services:
    """One route of each service, called the way the gateway would call it."""

    neighbours: Neighbours
    runtime: Runtime

    @property
    def identity(self) -> RunningIdentity:
        return self.neighbours.stack.identity

    def watches(self) -> list[AccessWatch]:
        stack = self.neighbours.stack
        apps = (stack.project_app, stack.billing_app, self.runtime.app)
        return [app.access_watch for app in apps if app.access_watch is not None]

    async def all_live(self) -> None:
        """Every service's watch holds a lease, so the next answers come from (or go into)
        its cache: what a change must then reach."""
        async with asyncio.timeout(WITHIN):
            for watch in self.watches():
                await watch.wait_live()

    async def reads(self, token: str, tenant: Tenant, project_id: str) -> dict[str, Code]:
        md = bearer(token)
        stack = self.neighbours.stack
        return {
            "project": await _code(
                stack.project.GetProject(project_pb2.GetProjectRequest(id=project_id), metadata=md)
            ),
            "runtime": await _code(
                self.runtime.stub.ListDeployments(
                    runtime_pb2.ListDeploymentsRequest(project_id=project_id), metadata=md
                )
            ),
            "billing": await _code(
                stack.billing.GetSubscription(
                    billing_pb2.GetSubscriptionRequest(organization_id=tenant.org_id), metadata=md
                )
            ),
        }

    async def writes(
        self, token: str, tenant: Tenant, project: project_pb2.Project
    ) -> dict[str, Code]:
        """Writes past the permission check: each answers OK or INVALID_ARGUMENT when allowed
        (nothing changes), PERMISSION_DENIED when not."""
        md = bearer(token)
        stack = self.neighbours.stack
        same_name = project_pb2.Project(id=project.id, name=project.name)
        return {
            "project": await _code(  # developer: an update that changes nothing
                stack.project.UpdateProject(
                    project_pb2.UpdateProjectRequest(
                        project=same_name, update_mask=field_mask_pb2.FieldMask(paths=["name"])
                    ),
                    metadata=md,
                )
            ),
            "runtime": await _code(  # developer: a deployment with nothing to run
                self.runtime.stub.CreateDeployment(
                    runtime_pb2.CreateDeploymentRequest(project_id=project.id), metadata=md
                )
            ),
            "billing": await _code(  # admin: a plan change naming no plan
                stack.billing.ChangePlan(
                    billing_pb2.ChangePlanRequest(organization_id=tenant.org_id), metadata=md
                )
            ),
        }


async def _code(call: Awaitable[object]) -> Code:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


def _all(code: Code) -> dict[str, Code]:
    return {"project": code, "runtime": code, "billing": code}


@pytest.fixture
async def services(neighbours: Neighbours, runtime: Runtime) -> Services:
    return Services(neighbours, runtime)


async def _tenant_with_project(
    services: Services, *roles: str
) -> tuple[Tenant, project_pb2.Project]:
    stack = services.neighbours.stack
    tenant = await stack.tenant(*roles)
    project = await stack.create(tenant)
    return tenant, project


# ------------------------------------------------------------------ the four changes


async def test_an_added_member_is_let_in_at_once_though_refused_just_before(
    services: Services,
) -> None:
    tenant, project = await _tenant_with_project(services)
    newcomer = await services.neighbours.stack.user()
    await services.all_live()
    assert await services.reads(newcomer.token, tenant, project.id) == _all(DENIED)

    await services.identity.add_member(
        tenant.owner.token, tenant.org_id, newcomer.email, ipb.ROLE_VIEWER
    )
    assert await services.reads(newcomer.token, tenant, project.id) == _all(OK)


async def test_a_demoted_member_cannot_write_from_the_next_request(services: Services) -> None:
    tenant, project = await _tenant_with_project(services, "admin")
    admin = tenant.members["admin"]
    await services.all_live()
    allowed = await services.writes(admin.token, tenant, project)
    assert DENIED not in allowed.values(), allowed

    await services.identity.stub.UpdateMember(
        ipb.UpdateMemberRequest(
            organization_id=tenant.org_id, user_id=admin.user_id, role=ipb.ROLE_VIEWER
        ),
        metadata=tenant.owner.md,
    )
    assert await services.writes(admin.token, tenant, project) == _all(DENIED)
    assert await services.reads(admin.token, tenant, project.id) == _all(OK)


@pytest.mark.parametrize("who", ["removed by the owner", "leaving"])
async def test_a_removed_member_is_refused_from_the_next_request(
    services: Services, who: str
) -> None:
    tenant, project = await _tenant_with_project(services, "developer")
    member = tenant.members["developer"]
    await services.all_live()
    assert await services.reads(member.token, tenant, project.id) == _all(OK)

    by = tenant.owner if who == "removed by the owner" else member
    await services.identity.stub.RemoveMember(
        ipb.RemoveMemberRequest(organization_id=tenant.org_id, user_id=member.user_id),
        metadata=by.md,
    )
    assert await services.reads(member.token, tenant, project.id) == _all(DENIED)


async def test_a_deleted_organization_is_closed_to_its_members_at_once(services: Services) -> None:
    tenant, project = await _tenant_with_project(services, "viewer")
    viewer = tenant.members["viewer"]
    await services.all_live()
    assert await services.reads(viewer.token, tenant, project.id) == _all(OK)

    await services.identity.stub.DeleteOrganization(
        ipb.DeleteOrganizationRequest(id=tenant.org_id), metadata=tenant.owner.md
    )
    assert await services.reads(viewer.token, tenant, project.id) == _all(DENIED)


async def test_logout_ends_the_sessions_access_tokens_everywhere_at_once(
    services: Services,
) -> None:
    tenant, project = await _tenant_with_project(services)
    email = f"leaver-{secrets.token_hex(4)}@example.com"
    signed_up = await services.identity.sign_up(email)
    await services.identity.add_member(tenant.owner.token, tenant.org_id, email, ipb.ROLE_VIEWER)
    other_session = await services.identity.stub.Login(
        ipb.LoginRequest(email=email, password=PASSWORD)
    )
    await services.all_live()
    assert await services.reads(signed_up.access_token, tenant, project.id) == _all(OK)

    await services.identity.stub.Logout(ipb.LogoutRequest(refresh_token=signed_up.refresh_token))
    assert await services.reads(signed_up.access_token, tenant, project.id) == _all(
        Code.UNAUTHENTICATED
    )
    me = services.identity.stub.GetCurrentUser(
        ipb.GetCurrentUserRequest(), metadata=bearer(signed_up.access_token)
    )
    assert await _code(me) == Code.UNAUTHENTICATED  # identity's own handlers too
    # Only that session: the same user's other sign-in still works.
    assert await services.reads(other_session.access_token, tenant, project.id) == _all(OK)


async def test_a_replayed_refresh_token_ends_its_sessions_access_tokens(
    services: Services,
) -> None:
    tenant, project = await _tenant_with_project(services)
    email = f"replayed-{secrets.token_hex(4)}@example.com"
    first = await services.identity.sign_up(email)
    await services.identity.add_member(tenant.owner.token, tenant.org_id, email, ipb.ROLE_VIEWER)
    rotated = await services.identity.stub.Refresh(
        ipb.RefreshRequest(refresh_token=first.refresh_token)
    )
    await services.all_live()
    assert await services.reads(rotated.access_token, tenant, project.id) == _all(OK)

    replay = services.identity.stub.Refresh(ipb.RefreshRequest(refresh_token=first.refresh_token))
    assert await _code(replay) == Code.UNAUTHENTICATED  # reuse: the family is revoked
    assert await services.reads(rotated.access_token, tenant, project.id) == _all(
        Code.UNAUTHENTICATED
    )
    reuse = services.identity.stub.Refresh(ipb.RefreshRequest(refresh_token=rotated.refresh_token))
    assert await _code(reuse) == Code.UNAUTHENTICATED


# ------------------------------------------------------------------------ the races


class _Watching:
    """A RemoteAuthorizer, a TokenVerifier and an AccessWatch of a pretend service ("project")
    against an identity, as a service process holds them."""

    def __init__(
        self,
        identity: RunningIdentity,
        *,
        watch_class: type[AccessWatch] = AccessWatch,
        authorizer_class: type[RemoteAuthorizer] = RemoteAuthorizer,
    ) -> None:
        settings = replace(identity.settings, service="project")
        self.source = ServiceTokenSource(settings)
        self.clients = Clients(settings.addresses, token_provider=self.source)
        self.watch = watch_class(self.clients)
        self.authorizer = authorizer_class(self.clients, watch=self.watch)
        assert identity.app is not None
        self.verifier = TokenVerifier.for_settings(
            settings, identity.app.keys.jwks_source, sessions=self.watch
        )
        self.task = asyncio.create_task(self.watch.run())

    async def as_user(self, token: str) -> None:
        principal_var.set(await self.verifier.authenticate(token))

    async def close(self) -> None:
        await cancel_and_wait([self.task])
        await self.clients.close()
        await self.source.close()


class HeldAuthorizer(RemoteAuthorizer):
    """Holds each Authorize answer, once fetched, until the test lets it go."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fetched = asyncio.Event()
        self.release = asyncio.Event()

    async def _ask(self, request: ipb.AuthorizeRequest) -> ipb.AuthorizeResponse:
        reply = await super()._ask(request)
        self.fetched.set()
        await self.release.wait()
        return reply


async def test_an_answer_fetched_before_a_removal_is_not_cached_after_it(
    services: Services,
) -> None:
    tenant, _ = await _tenant_with_project(services, "viewer")
    viewer = tenant.members["viewer"]
    watching = _Watching(services.identity, authorizer_class=HeldAuthorizer)
    authorizer = watching.authorizer
    assert isinstance(authorizer, HeldAuthorizer)
    try:
        async with asyncio.timeout(WITHIN):
            await watching.watch.wait_live()
        await watching.as_user(viewer.token)
        in_flight = asyncio.create_task(authorizer.require(tenant.org_id, "projects.get"))
        async with asyncio.timeout(WITHIN):
            await authorizer.fetched.wait()  # identity said yes; the answer is on its way

        await services.identity.stub.RemoveMember(
            ipb.RemoveMemberRequest(organization_id=tenant.org_id, user_id=viewer.user_id),
            metadata=tenant.owner.md,
        )
        authorizer.release.set()
        # The request that was in flight during the removal gets the answer it fetched ...
        assert await in_flight == ipb.ROLE_VIEWER
        # ... but the answer was not kept: the next request is refused.
        assert not authorizer._cache
        with pytest.raises(PermissionDenied):
            await authorizer.require(tenant.org_id, "projects.get")
    finally:
        authorizer.release.set()
        await watching.close()


@pytest.fixture
async def own_identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    """An identity of this test alone, with short leases (so a laggard is waited out fast)."""
    async with running_identity(database_url, db_passwords) as identity:
        assert identity.app is not None
        access = identity.app.access
        access.set_lease(1.0)
        access.ack_timeout = 0.5
        yield identity


class StuckWatch(AccessWatch):
    """Receives invalidations but never gets to apply (nor acknowledge) them."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stuck = asyncio.Event()
        self.unstick = asyncio.Event()

    async def apply(self, invalidation: ipb.AccessInvalidation) -> None:
        self.stuck.set()
        await self.unstick.wait()
        await super().apply(invalidation)


async def test_a_watcher_that_stops_acknowledging_neither_hangs_identity_nor_keeps_a_stale_allow(
    own_identity: RunningIdentity,
) -> None:
    identity = own_identity
    owner, viewer = await identity.sign_up(), await identity.sign_up()
    org = await identity.create_org(owner.access_token)
    await identity.add_member(owner.access_token, org.id, viewer.user.email, ipb.ROLE_VIEWER)
    laggard = _Watching(identity, watch_class=StuckWatch)
    healthy = _Watching(identity)
    watch = laggard.watch
    assert isinstance(watch, StuckWatch)
    try:
        async with asyncio.timeout(WITHIN):
            await watch.wait_live()
            await healthy.watch.wait_live()
        for watching in (laggard, healthy):
            await watching.as_user(viewer.access_token)
            assert await watching.authorizer.require(org.id, "projects.get") == ipb.ROLE_VIEWER

        # Bounded: the laggard is cut off after the acknowledgement timeout and its lease is
        # waited out; without the bound this call would never return.
        await identity.stub.RemoveMember(
            ipb.RemoveMemberRequest(organization_id=org.id, user_id=viewer.user.id),
            metadata=bearer(owner.access_token),
            timeout=WITHIN,
        )
        assert watch.stuck.is_set()
        assert identity.app is not None and identity.app.access.cut_off == 1
        for watching in (laggard, healthy):  # the laggard's cache no longer answers
            await watching.as_user(viewer.access_token)
            with pytest.raises(PermissionDenied):
                await watching.authorizer.require(org.id, "projects.get")
    finally:
        watch.unstick.set()
        await laggard.close()
        await healthy.close()


async def test_identity_down_means_unavailable_not_a_cached_answer(
    database_url: str, db_passwords: dict[str, str]
) -> None:
    async with running_identity(database_url, db_passwords) as identity:
        owner = await identity.sign_up()
        org = await identity.create_org(owner.access_token)
        watching = _Watching(identity)
        try:
            async with asyncio.timeout(WITHIN):
                await watching.watch.wait_live()
            await watching.as_user(owner.access_token)
            assert await watching.authorizer.require(org.id, "projects.get") == ipb.ROLE_OWNER
            assert identity.server is not None
            await identity.server.stop()
            identity.server = None
            async with asyncio.timeout(WITHIN):
                await watching.watch.wait_live(False)  # the stream ended with identity
            with pytest.raises(Unavailable):
                await watching.authorizer.require(org.id, "projects.get")
            with pytest.raises(Unavailable):  # nor can its session be vouched for
                await watching.verifier.authenticate(owner.access_token)
        finally:
            await watching.close()


async def test_a_signed_out_token_is_refused_without_a_watch_too(
    own_identity: RunningIdentity,
) -> None:
    """No live lease (the stream not yet open): the session is checked with identity."""
    identity = own_identity
    user = await identity.sign_up()
    watching = _Watching(identity)
    await cancel_and_wait([watching.task])  # never live
    try:
        await watching.as_user(user.access_token)
        await identity.stub.Logout(ipb.LogoutRequest(refresh_token=user.refresh_token))
        with pytest.raises(Unauthenticated):
            await watching.verifier.authenticate(user.access_token)
    finally:
        await watching.close()


# ------------------------------------------------------------------- ends of streams


async def test_a_service_that_shuts_down_says_goodbye_so_no_change_waits_for_it(
    own_identity: RunningIdentity,
) -> None:
    identity = own_identity
    assert identity.app is not None
    access = identity.app.access
    leaving, vanishing = _Watching(identity), _Watching(identity, watch_class=RudeWatch)
    async with asyncio.timeout(WITHIN):
        await leaving.watch.wait_live()
        await vanishing.watch.wait_live()
    quiet = access.quiet_until
    await leaving.close()  # as a service's close() does: goodbye, then the stream ends
    await eventually(_watchers(access, 1), WITHIN, 0.01)
    assert access.quiet_until == quiet  # nothing to wait out for it
    await vanishing.close()
    await eventually(_watchers(access, 0), WITHIN, 0.01)
    assert access.quiet_until > quiet  # changes wait until its lease has run out


class RudeWatch(AccessWatch):
    """Leaves without a goodbye, as a crashed process or a lost connection does."""

    async def _goodbye(self, *args: object) -> None:
        return None


def _watchers(access: AccessBroadcaster, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return access.watchers == count

    return check


async def test_identity_shutdown_ends_watch_access_streams_instead_of_waiting_out_the_grace(
    database_url: str, db_passwords: dict[str, str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = identity_settings(database_url, db_passwords, address=address)
    env = identity_process_env(settings)
    env["HANGAR_GRACE_SECONDS"] = "120"  # far longer than the bound below
    proc = ServiceProcess.start("identity", address, env)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            token = (
                await stub.IssueServiceToken(
                    ipb.IssueServiceTokenRequest(
                        service="runtime", secret=settings.service_secrets["runtime"]
                    ),
                    timeout=WITHIN,
                )
            ).token
            call = stub.WatchAccess(metadata=bearer(token))
            first = await call.read()
            assert first.WhichOneof("message") == "snapshot"
            proc.terminate()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == Code.UNAVAILABLE  # so the watcher reconnects
        code = await asyncio.to_thread(proc.proc.wait, WITHIN)
        assert code == 0, proc.stderr_text()[-4000:]
        assert "Traceback" not in proc.stderr_text()
    finally:
        proc.stop()


async def test_watch_access_and_check_session_refuse_user_tokens(services: Services) -> None:
    user = await services.identity.sign_up()
    stub = services.identity.stub
    watch = stub.WatchAccess(metadata=bearer(user.access_token), timeout=WITHIN)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch.read()
    assert refused.value.code() == DENIED
    check = stub.CheckSession(
        ipb.CheckSessionRequest(session_id="whatever"),
        metadata=bearer(user.access_token),
        timeout=WITHIN,
    )
    assert await _code(check) == DENIED
    anonymous = stub.CheckSession(ipb.CheckSessionRequest(session_id="x"), timeout=WITHIN)
    assert await _code(anonymous) == Code.UNAUTHENTICATED
