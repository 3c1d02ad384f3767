"""Agent enrolment: one-time join tokens and each server's agent certificate serials."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import asyncpg

from services.runtime.store.records import S
from shared.db import Session


@dataclass(frozen=True)
class JoinTokenRow:
    id: str
    server_id: str
    public_key: bytes
    expires_at: datetime.datetime
    used_at: datetime.datetime | None


@dataclass(frozen=True)
class AgentCertificateRow:
    server_id: str
    serial: str | None
    previous_serial: str | None
    not_after: datetime.datetime | None
    revoked_at: datetime.datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> AgentCertificateRow:
        return cls(
            row["server_id"],
            row["serial"],
            row["previous_serial"],
            row["not_after"],
            row["revoked_at"],
        )

    def accepts(self, serial: str) -> bool:
        """Whether a certificate of this serial may still act as the server."""
        return self.revoked_at is None and serial in (self.serial, self.previous_serial)


async def insert_join_token(
    tx: Session,
    *,
    token_id: str,
    server_id: str,
    public_key: bytes,
    created_by: str,
    ttl_seconds: float,
) -> datetime.datetime:
    """The token's row; its expiry (the database's clock, as the spending check's)."""
    expires = await tx.fetchval(
        f"""INSERT INTO {S}.agent_join_tokens (id, server_id, public_key, created_by, expires_at)
            VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at""",
        token_id,
        server_id,
        public_key,
        created_by,
        ttl_seconds,
    )
    assert isinstance(expires, datetime.datetime)
    return expires


async def find_join_token(s: Session, token_id: str) -> JoinTokenRow | None:
    row = await s.fetchrow(
        f"""SELECT id, server_id, public_key, expires_at, used_at
              FROM {S}.agent_join_tokens WHERE id = $1""",
        token_id,
    )
    if row is None:
        return None
    return JoinTokenRow(
        row["id"], row["server_id"], bytes(row["public_key"]), row["expires_at"], row["used_at"]
    )


async def spend_join_token(tx: Session, token_id: str) -> str | None:
    """Marks the token used if it is unused and unexpired: its server id; None otherwise.
    One conditional UPDATE, so of two concurrent joins with one token exactly one wins."""
    server_id = await tx.fetchval(
        f"""UPDATE {S}.agent_join_tokens SET used_at = now()
             WHERE id = $1 AND used_at IS NULL AND expires_at > now()
            RETURNING server_id""",
        token_id,
    )
    return str(server_id) if server_id is not None else None


async def enrolled_server_at(s: Session, agent_address: str) -> str | None:
    """The enrolled server (one that ever joined) whose agent listens at this address."""
    value = await s.fetchval(
        f"""SELECT v.id FROM {S}.servers v
              JOIN {S}.agent_certificates c ON c.server_id = v.id
             WHERE v.agent_address = $1 ORDER BY v.id LIMIT 1""",
        agent_address,
    )
    return str(value) if value is not None else None


async def agent_certificate(s: Session, server_id: str) -> AgentCertificateRow | None:
    row = await s.fetchrow(f"SELECT * FROM {S}.agent_certificates WHERE server_id = $1", server_id)
    return AgentCertificateRow.from_row(row) if row else None


async def enrol_agent_certificate(
    tx: Session, server_id: str, serial: str, not_after: datetime.datetime
) -> AgentCertificateRow:
    """A newly joined agent's certificate: the server's only valid one (a join replaces
    whatever the server had, a revocation included)."""
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.agent_certificates (server_id, serial, not_after)
            VALUES ($1, $2, $3)
            ON CONFLICT (server_id) DO UPDATE
               SET serial = EXCLUDED.serial, previous_serial = NULL,
                   not_after = EXCLUDED.not_after, revoked_at = NULL, updated_at = now()
            RETURNING *""",
        server_id,
        serial,
        not_after,
    )
    assert row is not None
    return AgentCertificateRow.from_row(row)


async def renew_agent_certificate(
    tx: Session, server_id: str, old_serial: str, serial: str, not_after: datetime.datetime
) -> AgentCertificateRow | None:
    """The renewing certificate (current or previous, unrevoked) becomes the previous one
    and the new one current; None if the old one is no longer good (revoked meanwhile)."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.agent_certificates
               SET previous_serial = $2, serial = $3, not_after = $4, updated_at = now()
             WHERE server_id = $1 AND revoked_at IS NULL
               AND $2 IN (serial, previous_serial)
            RETURNING *""",
        server_id,
        old_serial,
        serial,
        not_after,
    )
    return AgentCertificateRow.from_row(row) if row else None


async def revoke_agent_certificates(tx: Session, server_id: str) -> AgentCertificateRow:
    """Every certificate of the server's agent refused from now on (a row even for a
    server that never enrolled: its unbound platform certificate is refused too)."""
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.agent_certificates (server_id, revoked_at) VALUES ($1, now())
            ON CONFLICT (server_id) DO UPDATE
               SET serial = NULL, previous_serial = NULL, revoked_at = now(), updated_at = now()
            RETURNING *""",
        server_id,
    )
    assert row is not None
    return AgentCertificateRow.from_row(row)
