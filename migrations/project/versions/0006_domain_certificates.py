"""project: uploaded certificates of custom domains

- domain_certificates: a verified custom domain's uploaded certificate, which the edge
  serves for that name instead of one it obtains on demand. The chain (public) is kept as
  PEM with the leaf's facts; the private key is AES-256-GCM under the project's data key
  (key_ciphertext, key_nonce, key_version), its AAD binding project and hostname, as
  secrets are. One per domain; gone with the domain (or its project).

Revision ID: project_0006
Revises: project_0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "project_0006"
down_revision = "project_0005"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE project.domains
        ADD CONSTRAINT uq_domains_hostname_project_id UNIQUE (hostname, project_id)""",
    """CREATE TABLE project.domain_certificates (
        hostname               text PRIMARY KEY,
        project_id             text NOT NULL,
        certificate_chain_pem  text NOT NULL,
        key_ciphertext         bytea NOT NULL,
        key_nonce              bytea NOT NULL,
        key_version            integer NOT NULL,
        not_before             timestamptz NOT NULL,
        not_after              timestamptz NOT NULL,
        issuer                 text NOT NULL,
        subject                text NOT NULL,
        dns_names              text[] NOT NULL,
        sha256_fingerprint     text NOT NULL,
        created_at             timestamptz NOT NULL DEFAULT now(),
        updated_at             timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT fk_domain_certificates_domain FOREIGN KEY (hostname, project_id)
            REFERENCES project.domains (hostname, project_id) ON DELETE CASCADE,
        CONSTRAINT ck_domain_certificates_nonce CHECK (length(key_nonce) = 12)
    )""",
    "CREATE INDEX ix_domain_certificates_project_id ON project.domain_certificates (project_id)",
]

DOWNGRADE = [
    "DROP TABLE project.domain_certificates",
    "ALTER TABLE project.domains DROP CONSTRAINT uq_domains_hostname_project_id",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
