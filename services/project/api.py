"""ProjectService servicer: proto in -> use case (service.Projects) -> proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from google.protobuf import empty_pb2

from hangar.events.v1 import events_pb2
from hangar.project.v1 import project_pb2 as pb
from hangar.project.v1 import project_pb2_grpc
from services.project import custom_domains
from services.project.certificate_store import StoredCertificate
from services.project.certificates import DomainCertificates
from services.project.custom_domains import Domains
from services.project.domain import RESOURCES, Project, ProjectSpec, PublicAddress
from services.project.service import Projects
from services.project.store import StoredSecret
from shared.auth import require_service
from shared.outbox import OutboxFeed
from shared.proto import optional_timestamp, timestamp
from shared.resources import Resources

Context: TypeAlias = grpc.aio.ServicerContext

# Fields that are the same in the proto and the domain (restart_policy is an enum there, and
# resources a message).
_SPEC_FIELDS = tuple(
    name for name in ProjectSpec.__dataclass_fields__ if name not in ("restart_policy", RESOURCES)
)
_RESTART_POLICY: dict[str, pb.RestartPolicy] = {
    "on-failure": pb.RESTART_POLICY_ON_FAILURE,
    "always": pb.RESTART_POLICY_ALWAYS,
    "never": pb.RESTART_POLICY_NEVER,
}
_RESTART_POLICY_NAME: dict[int, str] = {v: k for k, v in _RESTART_POLICY.items()}


def project_to_proto(p: Project, address: PublicAddress) -> pb.Project:
    spec = p.spec
    return pb.Project(
        id=p.id,
        organization_id=p.organization_id,
        **{name: getattr(spec, name) for name in _SPEC_FIELDS},
        resources=spec.resources.to_proto(),
        restart_policy=_RESTART_POLICY.get(spec.restart_policy, pb.RESTART_POLICY_UNSPECIFIED),
        created_at=timestamp(p.created_at),
        updated_at=timestamp(p.updated_at),
        hostname=address.hostname(p),
        url=address.url(p),
    )


def spec_from_proto(p: pb.Project) -> ProjectSpec:
    # Unspecified: "" (the create default applies; an update naming it is refused); an
    # unknown number stays unknown, so validation names the field.
    policy = _RESTART_POLICY_NAME.get(p.restart_policy, "" if not p.restart_policy else "?")
    return ProjectSpec(
        **{name: getattr(p, name) for name in _SPEC_FIELDS},
        resources=Resources.from_proto(p.resources),
        restart_policy=policy,
    )


def set_fields(p: pb.Project) -> list[str]:
    """The update paths a project message sets (with no update_mask): each resource
    dimension set counts on its own."""
    paths = []
    for field, value in p.ListFields():
        if field.name == RESOURCES:
            paths += [f"{RESOURCES}.{f.name}" for f, _ in value.ListFields()]
        else:
            paths.append(field.name)
    return paths


def certificate_to_proto(c: StoredCertificate) -> pb.DomainCertificate:
    return pb.DomainCertificate(
        not_before=timestamp(c.not_before),
        not_after=timestamp(c.not_after),
        issuer=c.issuer,
        subject=c.subject,
        dns_names=c.dns_names,
        sha256_fingerprint=c.sha256_fingerprint,
        uploaded_at=timestamp(c.updated_at),
    )


def domain_to_proto(
    d: custom_domains.DomainView, certificate: StoredCertificate | None = None
) -> pb.Domain:
    stored = d.stored
    return pb.Domain(
        certificate=certificate_to_proto(certificate) if certificate else None,
        hostname=d.hostname,
        status=pb.DOMAIN_STATUS_VERIFIED if d.verified else pb.DOMAIN_STATUS_PENDING,
        verification_path="" if d.verified else custom_domains.CHALLENGE_PATH + d.token,
        verification_token="" if d.verified else d.token,
        verified_at=optional_timestamp(stored.verified_at),
        created_at=timestamp(stored.created_at),
    )


def secret_to_proto(s: StoredSecret) -> pb.Secret:
    return pb.Secret(name=s.name, version=s.version, updated_at=timestamp(s.updated_at))


class ProjectApi(project_pb2_grpc.ProjectServiceServicer):
    def __init__(
        self,
        projects: Projects,
        feed: OutboxFeed,
        domains: Domains,
        certificates: DomainCertificates,
    ) -> None:
        self.projects = projects
        self.feed = feed
        self.domains = domains
        self.certificates = certificates
        self.address = projects.address

    async def CreateProject(self, request: pb.CreateProjectRequest, context: Context) -> pb.Project:
        project = await self.projects.create_project(
            request.organization_id, spec_from_proto(request.project)
        )
        return project_to_proto(project, self.address)

    async def GetProject(self, request: pb.GetProjectRequest, context: Context) -> pb.Project:
        return project_to_proto(await self.projects.get_project(request.id), self.address)

    async def ListProjects(
        self, request: pb.ListProjectsRequest, context: Context
    ) -> pb.ListProjectsResponse:
        page = await self.projects.list_projects(
            request.organization_id,
            request.page_size,
            request.page_token,
            request.sleep_enabled if request.HasField("sleep_enabled") else None,
        )
        return pb.ListProjectsResponse(
            projects=[project_to_proto(p, self.address) for p in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateProject(self, request: pb.UpdateProjectRequest, context: Context) -> pb.Project:
        project = await self.projects.update_project(
            request.project.id,
            spec_from_proto(request.project),
            list(request.update_mask.paths),
            set_fields(request.project),
        )
        return project_to_proto(project, self.address)

    async def DeleteProject(
        self, request: pb.DeleteProjectRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.projects.delete_project(request.id)
        return empty_pb2.Empty()

    async def SetSecret(self, request: pb.SetSecretRequest, context: Context) -> pb.Secret:
        restart = request.restart if request.HasField("restart") else True
        secret = await self.projects.set_secret(
            request.project_id, request.name, request.value, restart=restart
        )
        return secret_to_proto(secret)

    async def ListSecrets(
        self, request: pb.ListSecretsRequest, context: Context
    ) -> pb.ListSecretsResponse:
        page = await self.projects.list_secrets(
            request.project_id, request.page_size, request.page_token
        )
        return pb.ListSecretsResponse(
            secrets=[secret_to_proto(s) for s in page.items], next_page_token=page.next_page_token
        )

    async def DeleteSecret(
        self, request: pb.DeleteSecretRequest, context: Context
    ) -> empty_pb2.Empty:
        restart = request.restart if request.HasField("restart") else True
        await self.projects.delete_secret(request.project_id, request.name, restart=restart)
        return empty_pb2.Empty()

    async def RevealSecret(
        self, request: pb.RevealSecretRequest, context: Context
    ) -> pb.RevealSecretResponse:
        secret, value = await self.projects.reveal_secret(request.project_id, request.name)
        return pb.RevealSecretResponse(name=secret.name, version=secret.version, value=value)

    async def AddDomain(self, request: pb.AddDomainRequest, context: Context) -> pb.Domain:
        project = await self.projects.authorized(request.project_id, custom_domains.PERM_MANAGE)
        return domain_to_proto(await self.domains.add(project, request.domain.hostname))

    async def ListDomains(
        self, request: pb.ListDomainsRequest, context: Context
    ) -> pb.ListDomainsResponse:
        project = await self.projects.authorized(request.project_id, custom_domains.PERM_LIST)
        listed = await self.domains.list(project)
        facts = await self.certificates.facts(project)
        return pb.ListDomainsResponse(
            domains=[domain_to_proto(d, facts.get(d.hostname)) for d in listed]
        )

    async def VerifyDomain(self, request: pb.VerifyDomainRequest, context: Context) -> pb.Domain:
        project = await self.projects.authorized(request.project_id, custom_domains.PERM_MANAGE)
        verified = await self.domains.verify(project, request.hostname)
        facts = await self.certificates.facts(project)
        return domain_to_proto(verified, facts.get(verified.hostname))

    async def SetDomainCertificate(
        self, request: pb.SetDomainCertificateRequest, context: Context
    ) -> pb.Domain:
        project = await self.projects.authorized(request.project_id, custom_domains.PERM_MANAGE)
        domain, certificate = await self.certificates.set(
            project, request.hostname, request.certificate_chain_pem, request.private_key_pem
        )
        return domain_to_proto(custom_domains.view(domain), certificate)

    async def DeleteDomainCertificate(
        self, request: pb.DeleteDomainCertificateRequest, context: Context
    ) -> pb.Domain:
        project = await self.projects.authorized(request.project_id, custom_domains.PERM_MANAGE)
        stored = await self.certificates.delete(project, request.hostname)
        return domain_to_proto(custom_domains.view(stored))

    async def ListDomainCertificates(
        self, request: pb.ListDomainCertificatesRequest, context: Context
    ) -> pb.ListDomainCertificatesResponse:
        return pb.ListDomainCertificatesResponse(
            certificates=[
                pb.EdgeCertificate(
                    project_id=c.project_id,
                    hostname=c.hostname,
                    certificate_chain_pem=c.chain_pem,
                    private_key_pem=c.key_pem,
                    not_after=timestamp(c.not_after),
                    sha256_fingerprint=c.sha256_fingerprint,
                    dns_names=c.dns_names,
                )
                for c in await self.certificates.for_edge()
            ]
        )

    async def RemoveDomain(
        self, request: pb.RemoveDomainRequest, context: Context
    ) -> empty_pb2.Empty:
        project = await self.projects.authorized(request.project_id, custom_domains.PERM_MANAGE)
        await self.domains.remove(project, request.hostname)
        return empty_pb2.Empty()

    async def ResolveSecrets(
        self, request: pb.ResolveSecretsRequest, context: Context
    ) -> pb.ResolveSecretsResponse:
        resolved = await self.projects.resolve_secrets(request.project_id)
        return pb.ResolveSecretsResponse(env=resolved.env, version_hash=resolved.version_hash)

    async def RotateMasterKey(
        self, request: pb.RotateMasterKeyRequest, context: Context
    ) -> pb.RotateMasterKeyResponse:
        key_id, count = await self.projects.rotate_master_key(request.key_id)
        return pb.RotateMasterKeyResponse(key_id=key_id, rewrapped_count=count)

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.feed.watch(request, context):
            yield event
