"""Project over real gRPC and PostgreSQL, with real identity (tokens, Authorize, audit) and
real billing (the pool) in this process."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.billing.v1 import billing_pb2
from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.project.v1 import project_pb2 as pb
from hangar.type.v1 import resources_pb2
from shared.ids import new_id
from shared.migrate import migrate
from tests.support.identity import PASSWORD, bearer
from tests.support.project import Stack, Tenant, eventually, running_stack

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def project_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_project")
    migrate(url, db_passwords)
    return url


@pytest.fixture(scope="module")
async def stack(project_db: str, db_passwords: dict[str, str]) -> AsyncIterator[Stack]:
    async with running_stack(project_db, db_passwords) as running:
        yield running


async def _code(call) -> Code:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


def _violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# ------------------------------------------------------------------------ the pool


async def test_concurrent_creates_stay_within_the_pool_and_equal_billings_allocation(
    stack: Stack,
) -> None:
    tenant = await stack.tenant()
    sizes = [(96, 60)] * 20  # 20 x 96 MB > the hobby pool's 1024 MB
    results = await asyncio.gather(
        *(stack.create(tenant, ram_mb=r, cpu_millis=c, bandwidth_gb=0) for r, c in sizes),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, pb.Project)]
    refused = [r for r in results if not isinstance(r, pb.Project)]
    assert accepted and refused
    assert all(
        isinstance(e, grpc.aio.AioRpcError) and e.code() == Code.RESOURCE_EXHAUSTED for e in refused
    )
    total_ram = sum(p.resources.ram_mb for p in accepted)
    assert total_ram <= 1024
    listed = await stack.project.ListProjects(
        pb.ListProjectsRequest(organization_id=tenant.org_id, page_size=100),
        metadata=tenant.owner.md,
    )
    assert {p.id for p in listed.projects} == {p.id for p in accepted}
    allocated = await stack.allocated(tenant.org_id)
    assert allocated.ram_mb == total_ram
    assert allocated.cpu_millis == sum(p.resources.cpu_millis for p in accepted)


async def test_resize_past_the_pool_is_refused_and_changes_nothing(stack: Stack) -> None:
    tenant = await stack.tenant()
    project = await stack.create(tenant, ram_mb=512, cpu_millis=500)
    grow = pb.Project(id=project.id, resources=resources_pb2.Resources(ram_mb=2048))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.project.UpdateProject(
            pb.UpdateProjectRequest(project=grow, update_mask=_mask("resources.ram_mb")),
            metadata=tenant.owner.md,
        )
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    after = await stack.project.GetProject(
        pb.GetProjectRequest(id=project.id), metadata=tenant.owner.md
    )
    assert after.resources.ram_mb == 512 and after.updated_at == project.updated_at
    assert (await stack.allocated(tenant.org_id)).ram_mb == 512

    # Growing within the pool and shrinking both move billing's numbers with the row.
    for ram in (1000, 64):
        updated = await stack.project.UpdateProject(
            pb.UpdateProjectRequest(
                project=pb.Project(id=project.id, resources=resources_pb2.Resources(ram_mb=ram)),
                update_mask=_mask("resources.ram_mb"),
            ),
            metadata=tenant.owner.md,
        )
        assert (updated.resources.ram_mb, updated.resources.cpu_millis) == (ram, 500)
        assert (await stack.allocated(tenant.org_id)).ram_mb == ram

    # With no mask, the dimensions the message sets are the update: CPU only, RAM kept.
    updated = await stack.project.UpdateProject(
        pb.UpdateProjectRequest(
            project=pb.Project(id=project.id, resources=resources_pb2.Resources(cpu_millis=250))
        ),
        metadata=tenant.owner.md,
    )
    assert (updated.resources.ram_mb, updated.resources.cpu_millis) == (64, 250)
    # "resources" in a mask is all three: a zero RAM is refused, naming the dimension.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.project.UpdateProject(
            pb.UpdateProjectRequest(
                project=pb.Project(
                    id=project.id, resources=resources_pb2.Resources(cpu_millis=300)
                ),
                update_mask=_mask("resources"),
            ),
            metadata=tenant.owner.md,
        )
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "project.resources.ram_mb" in _violations(info.value)


async def test_slug_conflict_is_already_exists_and_leaks_no_allocation(stack: Stack) -> None:
    tenant = await stack.tenant()
    first = await stack.create(tenant, slug="web", ram_mb=128)
    results = await asyncio.gather(
        *(stack.create(tenant, slug="api", ram_mb=128) for _ in range(5)), return_exceptions=True
    )
    created = [r for r in results if isinstance(r, pb.Project)]
    assert len(created) == 1
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() == Code.ALREADY_EXISTS
        for r in results
        if not isinstance(r, pb.Project)
    )
    assert await _code(stack.create(tenant, slug="web")) == Code.ALREADY_EXISTS
    allocations = await stack.allocations(tenant.org_id)
    assert set(allocations) == {first.id, created[0].id}
    assert (await stack.allocated(tenant.org_id)).ram_mb == 256

    # Renaming onto a taken slug is refused too.
    other = created[0]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.project.UpdateProject(
            pb.UpdateProjectRequest(
                project=pb.Project(id=other.id, slug="web"), update_mask=_mask("slug")
            ),
            metadata=tenant.owner.md,
        )
    assert info.value.code() == Code.ALREADY_EXISTS


async def test_bad_input_is_invalid_argument_naming_the_field(stack: Stack) -> None:
    tenant = await stack.tenant()
    for fields, field in (
        ({"slug": "Not_A_Slug"}, "project.slug"),
        ({"slug": "a" * 41}, "project.slug"),
        ({"ram_mb": 10_000_000}, "project.resources.ram_mb"),
        ({"cpu_millis": -5}, "project.resources.cpu_millis"),
        ({"region": "EU WEST"}, "project.region"),
        ({"repository_url": "not a url"}, "project.repository_url"),
        ({"health_check_path": "healthz"}, "project.health_check_path"),
        ({"sleep_after_seconds": 1}, "project.sleep_after_seconds"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.create(tenant, **fields)
        assert info.value.code() == Code.INVALID_ARGUMENT, fields
        assert field in _violations(info.value), fields
    project = await stack.create(tenant)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.project.UpdateProject(
            pb.UpdateProjectRequest(project=pb.Project(id=project.id), update_mask=_mask("id")),
            metadata=tenant.owner.md,
        )
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert _violations(info.value) == ["update_mask"]
    assert (await stack.allocated(tenant.org_id)).ram_mb == project.resources.ram_mb


async def test_list_pages_and_filters_by_sleep_enabled(stack: Stack) -> None:
    tenant = await stack.tenant()
    made = [
        await stack.create(tenant, ram_mb=32, cpu_millis=10, sleep_enabled=i % 2 == 0)
        for i in range(5)
    ]
    seen, token = [], ""
    while True:
        page = await stack.project.ListProjects(
            pb.ListProjectsRequest(organization_id=tenant.org_id, page_size=2, page_token=token),
            metadata=tenant.owner.md,
        )
        seen += [p.id for p in page.projects]
        token = page.next_page_token
        if not token:
            break
    assert seen == [p.id for p in made]
    sleepy = await stack.project.ListProjects(
        pb.ListProjectsRequest(organization_id=tenant.org_id, sleep_enabled=True),
        metadata=tenant.owner.md,
    )
    assert [p.id for p in sleepy.projects] == [p.id for p in made if p.sleep_enabled]


# ------------------------------------------------------------------ access control


async def test_cross_tenant_matrix_on_every_org_scoped_rpc(stack: Stack) -> None:
    tenant = await stack.tenant("viewer", "developer", "admin")
    project = await stack.create(tenant)
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="TOKEN", value="s3cr3t-value"),
        metadata=tenant.owner.md,
    )
    outsider = (await stack.tenant()).owner  # owns another org: a member elsewhere
    missing = new_id()
    p = project.id

    def calls(
        pid: str, org: str
    ) -> list[tuple[str, Callable[[tuple[tuple[str, str], ...]], object]]]:
        s = stack.project
        return [
            (
                "create",
                lambda md: s.CreateProject(
                    pb.CreateProjectRequest(
                        organization_id=org,
                        project=pb.Project(
                            name="x",
                            slug=f"x-{secrets.token_hex(3)}",
                            resources=resources_pb2.Resources(ram_mb=32, cpu_millis=10),
                            region="local",
                        ),
                    ),
                    metadata=md,
                ),
            ),
            (
                "list",
                lambda md: s.ListProjects(pb.ListProjectsRequest(organization_id=org), metadata=md),
            ),
            ("get", lambda md: s.GetProject(pb.GetProjectRequest(id=pid), metadata=md)),
            (
                "update",
                lambda md: s.UpdateProject(
                    pb.UpdateProjectRequest(
                        project=pb.Project(id=pid, name="renamed"), update_mask=_mask("name")
                    ),
                    metadata=md,
                ),
            ),
            (
                "set_secret",
                lambda md: s.SetSecret(
                    pb.SetSecretRequest(project_id=pid, name="OTHER", value="v"), metadata=md
                ),
            ),
            (
                "list_secrets",
                lambda md: s.ListSecrets(pb.ListSecretsRequest(project_id=pid), metadata=md),
            ),
            (
                "reveal",
                lambda md: s.RevealSecret(
                    pb.RevealSecretRequest(project_id=pid, name="TOKEN"), metadata=md
                ),
            ),
            (
                "delete_secret",
                lambda md: s.DeleteSecret(
                    pb.DeleteSecretRequest(project_id=pid, name="NOPE"), metadata=md
                ),
            ),
            ("delete", lambda md: s.DeleteProject(pb.DeleteProjectRequest(id=pid), metadata=md)),
        ]

    # Outsiders: PERMISSION_DENIED whether the project exists or not (AIP-193).
    for pid, org in ((p, tenant.org_id), (missing, new_id())):
        for name, call in calls(pid, org):
            assert await _code(call(outsider.md)) == Code.PERMISSION_DENIED, (name, pid)
    # Anonymous: UNAUTHENTICATED.
    for name, call in calls(p, tenant.org_id):
        assert await _code(call(())) == Code.UNAUTHENTICATED, name

    # Roles inside the org: viewer reads, developer edits, admin deletes and reveals.
    allowed = {
        "viewer": {"list", "get", "list_secrets"},
        "developer": {
            "list",
            "get",
            "list_secrets",
            "create",
            "update",
            "set_secret",
            "delete_secret",
        },
    }
    for role, may in allowed.items():
        md = tenant.members[role].md
        for name, call in calls(p, tenant.org_id):
            if name in may:
                try:
                    await call(md)
                except grpc.aio.AioRpcError as exc:  # allowed, but the secret is missing
                    assert (name, exc.code()) == ("delete_secret", Code.NOT_FOUND)
            else:
                assert await _code(call(md)) == Code.PERMISSION_DENIED, (role, name)
    revealed = await stack.project.RevealSecret(
        pb.RevealSecretRequest(project_id=p, name="TOKEN"), metadata=tenant.members["admin"].md
    )
    assert revealed.value == "s3cr3t-value"
    # A member asking for a project's missing secret gets NOT_FOUND; services see NOT_FOUND
    # for a missing project.
    assert (
        await _code(
            stack.project.RevealSecret(
                pb.RevealSecretRequest(project_id=p, name="NOPE"), metadata=tenant.owner.md
            )
        )
        == Code.NOT_FOUND
    )
    runtime = bearer(await stack.identity.service_token("runtime"))
    assert (
        await _code(stack.project.GetProject(pb.GetProjectRequest(id=missing), metadata=runtime))
        == Code.NOT_FOUND
    )
    await stack.project.DeleteProject(
        pb.DeleteProjectRequest(id=p), metadata=tenant.members["admin"].md
    )


async def test_resolve_secrets_refuses_user_tokens(stack: Stack) -> None:
    tenant = await stack.tenant()
    project = await stack.create(tenant)
    request = pb.ResolveSecretsRequest(project_id=project.id)
    assert (
        await _code(stack.project.ResolveSecrets(request, metadata=tenant.owner.md))
        == Code.PERMISSION_DENIED
    )
    billing = bearer(await stack.identity.service_token("billing"))
    assert (
        await _code(stack.project.ResolveSecrets(request, metadata=billing))
        == Code.PERMISSION_DENIED
    )
    runtime = bearer(await stack.identity.service_token("runtime"))
    assert (await stack.project.ResolveSecrets(request, metadata=runtime)).env == {}


# -------------------------------------------------------------------------- secrets


async def test_secrets_are_set_listed_without_values_revealed_and_resolved(stack: Stack) -> None:
    tenant = await stack.tenant()
    project = await stack.create(tenant)
    md = tenant.owner.md
    runtime = bearer(await stack.identity.service_token("runtime"))
    first = await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="DATABASE_URL", value="postgres://a"),
        metadata=md,
    )
    assert first.version == 1
    before = await stack.project.ResolveSecrets(
        pb.ResolveSecretsRequest(project_id=project.id), metadata=runtime
    )
    second = await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="DATABASE_URL", value="postgres://b"),
        metadata=md,
    )
    assert second.version == 2
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="_UNICODE", value="é✓"), metadata=md
    )
    listed = await stack.project.ListSecrets(
        pb.ListSecretsRequest(project_id=project.id), metadata=md
    )
    assert [(s.name, s.version) for s in listed.secrets] == [("DATABASE_URL", 2), ("_UNICODE", 1)]
    assert b"postgres://" not in listed.SerializeToString()
    resolved = await stack.project.ResolveSecrets(
        pb.ResolveSecretsRequest(project_id=project.id), metadata=runtime
    )
    assert dict(resolved.env) == {"DATABASE_URL": "postgres://b", "_UNICODE": "é✓"}
    assert resolved.version_hash != before.version_hash
    await stack.project.DeleteSecret(
        pb.DeleteSecretRequest(project_id=project.id, name="_UNICODE"), metadata=md
    )
    resolved = await stack.project.ResolveSecrets(
        pb.ResolveSecretsRequest(project_id=project.id), metadata=runtime
    )
    assert dict(resolved.env) == {"DATABASE_URL": "postgres://b"}

    for name, value, field in (
        ("lower", "v", "name"),
        ("9LIVES", "v", "name"),
        ("A" * 129, "v", "name"),
        ("BIG", "x" * (64 * 1024 + 1), "value"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.project.SetSecret(
                pb.SetSecretRequest(project_id=project.id, name=name, value=value), metadata=md
            )
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert _violations(info.value) == [field]
        assert "xxxx" not in (info.value.details() or "")
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="MAX", value="y" * 64 * 1024), metadata=md
    )


def _pg_dump() -> str:
    """pg_dump no older than the server: pgserver's own, else the one on PATH."""
    import pgserver

    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    found = str(bundled) if bundled.exists() else shutil.which("pg_dump")
    assert found, "no pg_dump available"
    return found


async def _admin_connection(project_db: str) -> asyncpg.Connection:
    return await asyncpg.connect(project_db)


async def test_a_dump_of_the_project_schema_never_contains_a_plaintext(
    stack: Stack, project_db: str
) -> None:
    tenant = await stack.tenant("admin")
    project = await stack.create(tenant)
    plaintext = f"plain-{secrets.token_hex(12)}"
    md = tenant.owner.md
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="API_KEY", value=plaintext), metadata=md
    )
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="API_KEY", value=plaintext), metadata=md
    )
    revealed = await stack.project.RevealSecret(
        pb.RevealSecretRequest(project_id=project.id, name="API_KEY"),
        metadata=tenant.members["admin"].md,
    )
    assert revealed.value == plaintext
    runtime = bearer(await stack.identity.service_token("runtime"))
    await stack.project.ResolveSecrets(
        pb.ResolveSecretsRequest(project_id=project.id), metadata=runtime
    )
    await stack.project_app.audit_relay.relay_once()

    conn = await _admin_connection(project_db)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema IN ('project', 'identity') AND table_type = 'BASE TABLE'"
        )
        dump = []
        for t in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{t[0]}"."{t[1]}" t')
            dump += [r["row"] for r in rows]
        audit = await conn.fetch(
            "SELECT action, metadata::text AS metadata FROM identity.audit_logs"
            " WHERE target_id = $1",
            project.id,
        )
    finally:
        await conn.close()
    text = "\n".join(dump)
    assert plaintext not in text
    assert plaintext.encode().hex() not in text  # nor as bytea hex
    # And what an operator's backup holds: a real pg_dump of both schemas.
    proc = await asyncio.create_subprocess_exec(
        _pg_dump(),
        "--dbname",
        project_db,
        "--schema=project",
        "--schema=identity",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    backup, errors = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errors.decode()
    assert project.id.encode() in backup  # the dump holds the project's rows
    assert plaintext.encode() not in backup
    assert plaintext.encode().hex().encode() not in backup
    actions = {r["action"] for r in audit}
    assert {"project.created", "secret.set", "secret.revealed"} <= actions
    assert all(plaintext not in r["metadata"] for r in audit)


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(
    stack: Stack, project_db: str
) -> None:
    tenant = await stack.tenant()
    one, two = await stack.create(tenant), await stack.create(tenant)
    md = tenant.owner.md
    for project in (one, two):
        for name in ("FIRST", "SECOND"):
            await stack.project.SetSecret(
                pb.SetSecretRequest(
                    project_id=project.id, name=name, value=f"{name}-of-{project.id}"
                ),
                metadata=md,
            )
    conn = await _admin_connection(project_db)
    try:
        copy = (
            "UPDATE project.project_secrets d SET ciphertext = s.ciphertext, nonce = s.nonce"
            " FROM project.project_secrets s"
            " WHERE s.project_id = $1 AND s.name = $2 AND d.project_id = $3 AND d.name = $4"
        )
        await conn.execute(copy, one.id, "FIRST", one.id, "SECOND")  # another name
        await conn.execute(copy, one.id, "FIRST", two.id, "FIRST")  # another project
    finally:
        await conn.close()
    for project, name in ((one, "SECOND"), (two, "FIRST")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.project.RevealSecret(
                pb.RevealSecretRequest(project_id=project.id, name=name), metadata=md
            )
        assert info.value.code() == Code.FAILED_PRECONDITION
        assert "of-" not in (info.value.details() or "")
    revealed = await stack.project.RevealSecret(
        pb.RevealSecretRequest(project_id=one.id, name="FIRST"), metadata=md
    )
    assert revealed.value == f"FIRST-of-{one.id}"


@pytest.fixture(scope="module")
def rotation_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    """A database of its own: every data key in it is wrapped by this test's keyring."""
    url = create_database("hangar_rotation")
    migrate(url, db_passwords)
    return url


async def test_rotation_keeps_old_and_new_secrets_readable_and_rewraps_every_data_key(
    rotation_db: str, db_passwords: dict[str, str]
) -> None:
    from tests.support.project import master_keys, project_settings, start_project

    project_db = rotation_db

    keys = master_keys("mk-old", "mk-new")
    async with running_stack(project_db, db_passwords, keys=keys, active_key="mk-old") as stack:
        tenant = await stack.tenant()
        md = tenant.owner.md
        old = await stack.create(tenant)
        await stack.project.SetSecret(
            pb.SetSecretRequest(project_id=old.id, name="OLD", value="old-value"), metadata=md
        )

        # A second replica configured with the new key active: new data keys are wrapped under
        # it, old ones still unwrap with the old key.
        settings = project_settings(
            project_db, db_passwords, stack.identity, stack.billing_address, keys, "mk-new"
        )
        _replica_app, server = await start_project(settings)
        from hangar.project.v1 import project_pb2_grpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        replica = project_pb2_grpc.ProjectServiceStub(channel)
        try:
            new = await replica.CreateProject(
                pb.CreateProjectRequest(
                    organization_id=tenant.org_id,
                    project=pb.Project(
                        name="n",
                        slug="new-one",
                        resources=resources_pb2.Resources(ram_mb=64, cpu_millis=50),
                        region="local",
                    ),
                ),
                metadata=md,
            )
            await replica.SetSecret(
                pb.SetSecretRequest(project_id=new.id, name="NEW", value="new-value"), metadata=md
            )
            conn = await _admin_connection(project_db)
            try:
                ids = dict(
                    await conn.fetch(
                        "SELECT id, data_key_id FROM project.projects WHERE organization_id = $1",
                        tenant.org_id,
                    )
                )
                assert ids == {old.id: "mk-old", new.id: "mk-new"}
                before = await conn.fetch(
                    "SELECT name, ciphertext, nonce FROM project.project_secrets ORDER BY id"
                )

                # Only platform admins rotate.
                assert (
                    await _code(replica.RotateMasterKey(pb.RotateMasterKeyRequest(), metadata=md))
                    == Code.PERMISSION_DENIED
                )
                assert stack.identity.app is not None
                await stack.identity.app.accounts.promote(tenant.owner.email)
                login = await stack.identity.stub.Login(
                    ipb.LoginRequest(email=tenant.owner.email, password=PASSWORD)
                )
                admin_md = bearer(login.access_token)
                assert (
                    await _code(
                        replica.RotateMasterKey(
                            pb.RotateMasterKeyRequest(key_id="mk-nope"), metadata=admin_md
                        )
                    )
                    == Code.INVALID_ARGUMENT
                )
                reply = await replica.RotateMasterKey(
                    pb.RotateMasterKeyRequest(), metadata=admin_md
                )
                assert reply.key_id == "mk-new" and reply.rewrapped_count >= 1
                left = await conn.fetchval(
                    "SELECT count(*) FROM project.projects WHERE data_key_id <> 'mk-new'"
                )
                assert left == 0
                after = await conn.fetch(
                    "SELECT name, ciphertext, nonce FROM project.project_secrets ORDER BY id"
                )
                assert before == after  # secrets untouched: only data keys were re-wrapped
            finally:
                await conn.close()
        finally:
            await channel.close()
            await server.stop()

    # Without the old master key at all, both projects' secrets still decrypt.
    only_new = {"mk-new": keys["mk-new"]}
    async with running_stack(project_db, db_passwords, keys=only_new) as stack2:
        runtime = bearer(await stack2.identity.service_token("runtime"))
        for project, env in ((old, {"OLD": "old-value"}), (new, {"NEW": "new-value"})):
            resolved = await stack2.project.ResolveSecrets(
                pb.ResolveSecretsRequest(project_id=project.id), metadata=runtime
            )
            assert dict(resolved.env) == env


# ------------------------------------------------------- deletes, events, reconciler


async def test_delete_cascades_secrets_and_releases_the_allocation_through_the_outbox(
    stack: Stack, project_db: str
) -> None:
    tenant = await stack.tenant("admin")
    project = await stack.create(tenant, ram_mb=256)
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=project.id, name="A", value="x"), metadata=tenant.owner.md
    )
    await stack.project.DeleteProject(
        pb.DeleteProjectRequest(id=project.id), metadata=tenant.members["admin"].md
    )
    assert (
        await _code(
            stack.project.GetProject(pb.GetProjectRequest(id=project.id), metadata=tenant.owner.md)
        )
        == Code.PERMISSION_DENIED
    )
    conn = await _admin_connection(project_db)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM project.project_secrets WHERE project_id = $1", project.id
            )
            == 0
        )
    finally:
        await conn.close()
    # Released by the outbox loop, not the request: billing still holds it until then.
    assert project.id in await stack.allocations(tenant.org_id)
    while await stack.project_app.releaser.release_once():
        pass
    assert await stack.allocations(tenant.org_id) == {}

    events = []
    token = bearer(await stack.identity.service_token("runtime"))
    async for event in stack.project.WatchEvents(
        events_pb2.WatchEventsRequest(types=["project.created", "project.deleted"]), metadata=token
    ):
        if event.aggregate_id == project.id:
            events.append(event.type)
        if len(events) == 2:
            break
    assert events == ["project.created", "project.deleted"]


async def test_reconciler_releases_leaks_and_restores_missing_allocations(stack: Stack) -> None:
    tenant = await stack.tenant()
    kept = await stack.create(tenant, ram_mb=128, cpu_millis=100)
    token = bearer(await stack.identity.service_token("project"))
    leaked = new_id()
    await stack.billing.ReserveAllocation(
        billing_pb2.ReserveAllocationRequest(
            organization_id=tenant.org_id,
            project_id=leaked,
            resources=resources_pb2.Resources(ram_mb=300, cpu_millis=10),
        ),
        metadata=token,
    )
    await stack.billing.ReleaseAllocation(
        billing_pb2.ReleaseAllocationRequest(organization_id=tenant.org_id, project_id=kept.id),
        metadata=token,
    )
    repairs = await stack.project_app.reconciler.reconcile_once()
    assert repairs is not None and repairs.released >= 1 and repairs.reserved >= 1
    allocations = await stack.allocations(tenant.org_id)
    assert set(allocations) == {kept.id}
    assert allocations[kept.id].resources.ram_mb == 128
    again = await stack.project_app.reconciler.reconcile_once()
    assert again is not None and (again.released, again.reserved) == (0, 0)


async def test_two_reconcilers_do_not_run_at_once(stack: Stack) -> None:
    results = await asyncio.gather(
        stack.project_app.reconciler.reconcile_once(), stack.project_app.reconciler.reconcile_once()
    )
    assert results.count(None) == 1


async def test_organization_deleted_removes_the_tenants_projects_and_releases_allocations(
    stack: Stack, project_db: str
) -> None:
    tenant = await stack.tenant()
    bystander = await stack.tenant()
    projects = [await stack.create(tenant) for _ in range(3)]
    survivor = await stack.create(bystander)
    await stack.project.SetSecret(
        pb.SetSecretRequest(project_id=projects[0].id, name="A", value="x"),
        metadata=tenant.owner.md,
    )
    consumer = asyncio.create_task(stack.project_app.organization_events.run())
    try:
        await stack.identity.stub.DeleteOrganization(
            ipb.DeleteOrganizationRequest(id=tenant.org_id), metadata=tenant.owner.md
        )

        async def gone() -> bool:
            conn = await _admin_connection(project_db)
            try:
                return (
                    await conn.fetchval(
                        "SELECT count(*) FROM project.projects WHERE organization_id = $1",
                        tenant.org_id,
                    )
                    == 0
                )
            finally:
                await conn.close()

        await eventually(gone)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    while await stack.project_app.releaser.release_once():
        pass
    assert await stack.allocations(tenant.org_id) == {}
    assert set(await stack.allocations(bystander.org_id)) == {survivor.id}
    conn = await _admin_connection(project_db)
    try:
        deleted = await conn.fetch(
            "SELECT aggregate_id FROM project.outbox"
            " WHERE type = 'project.deleted' AND organization_id = $1",
            tenant.org_id,
        )
        assert {r[0] for r in deleted} == {p.id for p in projects}
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM project.project_secrets WHERE project_id = $1", projects[0].id
            )
            == 0
        )
    finally:
        await conn.close()
    # Applying the event again changes nothing (idempotent).
    async with stack.project_app.db.transaction() as tx:
        assert await stack.project_app.projects.delete_organization(tx, tenant.org_id) == 0


_ = Tenant  # re-exported type used in helpers' signatures
