"""PostgreSQL access for a service: an asyncpg pool on the service's own role, SQLAlchemy Core
for building queries, and a unit of work that rolls back unless committed.

SQLAlchemy compiles statements (cached per statement shape) to asyncpg's `$n` SQL; asyncpg
runs them. JSON/JSONB columns take and return plain Python values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

# SQLAlchemy's dialect constructors are unannotated.
_dialect = PGDialect_asyncpg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
_compiled: dict[Any, SQLCompiler | None] = {}
_CACHE_LIMIT = 2000
_MISSING = object()


def _compile(statement: ClauseElement, cache_key: Any = None) -> SQLCompiler:
    compiled = _dialect.statement_compiler(
        _dialect,
        statement,
        cache_key=cache_key,
        compile_kwargs={"render_postcompile": cache_key is None},
    )
    assert isinstance(compiled, SQLCompiler)
    return compiled


def compile_query(statement: ClauseElement) -> tuple[str, list[Any]]:
    """SQL text with $n placeholders and its arguments, in order.

    Compiling is the costly part of SQLAlchemy Core (~100 µs), so the SQL of each statement
    shape is compiled once and reused with the new statement's values (SQLAlchemy's own cache
    key mechanism). Shapes whose SQL depends on values (expanding IN lists) compile each time.
    """
    cache_key = statement._generate_cache_key()
    if cache_key is not None:
        found = _compiled.get(cache_key.key, _MISSING)
        if found is _MISSING:
            compiled = _compile(statement, cache_key)
            expanding = any(getattr(b, "expanding", False) for b in compiled.binds.values())
            if len(_compiled) >= _CACHE_LIMIT:
                _compiled.clear()
            _compiled[cache_key.key] = found = None if expanding else compiled
        cached = found if isinstance(found, SQLCompiler) else None
        if cached is not None:
            params = cached.construct_params(extracted_parameters=cache_key.bindparams)
            return cached.string, [params[name] for name in cached.positiontup or ()]
    compiled = _compile(statement)
    params = compiled.construct_params()
    return compiled.string, [params[name] for name in compiled.positiontup or ()]


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    url: str, *, min_size: int = 2, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool


Query = ClauseElement | str


class Session:
    """One connection: run Core statements or plain SQL."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.wrote_events = False  # set by whoever writes outbox rows (note_events)

    def note_events(self) -> None:
        """This unit of work wrote outbox rows: the Database announces them once it commits."""
        self.wrote_events = True

    @staticmethod
    def _prepare(query: Query, args: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        if isinstance(query, str):
            return query, args
        return compile_query(query)

    async def execute(self, query: Query, *args: Any) -> str:
        sql, params = self._prepare(query, args)
        status: str = await self.conn.execute(sql, *params)
        return status

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        sql, params = self._prepare(query, args)
        rows: list[asyncpg.Record] = await self.conn.fetch(sql, *params)
        return rows

    async def fetchrow(self, query: Query, *args: Any) -> asyncpg.Record | None:
        sql, params = self._prepare(query, args)
        return await self.conn.fetchrow(sql, *params)

    async def fetchval(self, query: Query, *args: Any) -> Any:
        sql, params = self._prepare(query, args)
        return await self.conn.fetchval(sql, *params)


class Database:
    """A service's pool. `async with db.transaction() as tx:` is the unit of work."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # Called after a unit of work that wrote outbox rows has committed (the process's
        # OutboxFeed: wake its watchers, NOTIFY the other replicas', coalesced).
        self.on_events: Callable[[], None] | None = None

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Database:
        return cls(await create_pool(url, **kwargs))

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Close gracefully; connections still busy after `grace_seconds` are cut, so a
        stuck query cannot hold a shutting-down process past its grace period."""
        try:
            await asyncio.wait_for(self.pool.close(), grace_seconds)
        except TimeoutError:
            self.pool.terminate()

    @asynccontextmanager
    async def transaction(self, *, isolation: str = "read_committed") -> AsyncIterator[Session]:
        """Commits when the block ends normally, rolls back on any exception."""
        async with self.pool.acquire() as conn:
            session = Session(conn)
            async with conn.transaction(isolation=isolation):
                yield session
        self._committed(session)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """A connection in autocommit, for single statements that need no transaction."""
        async with self.pool.acquire() as conn:
            session = Session(conn)
            try:
                yield session
            finally:  # each statement committed on its own, even if a later one failed
                self._committed(session)

    @asynccontextmanager
    async def advisory_lock(self, key: str) -> AsyncIterator[Session | None]:
        """A session-level advisory lock on `key` for the block if no other replica holds it:
        the session holding it (autocommit, usable for queries), or None when it is taken.
        Released when the block ends, even on error."""
        async with self.session() as session:
            if not await session.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                yield None
                return
            try:
                yield session
            finally:
                await session.execute("SELECT pg_advisory_unlock(hashtext($1))", key)

    def _committed(self, session: Session) -> None:
        if session.wrote_events and self.on_events is not None:
            self.on_events()


R = TypeVar("R")


def from_row(cls: type[R], row: Mapping[str, Any], **computed: Any) -> R:
    """A record (a dataclass) from a row: each field takes `computed[name]` when given, else
    the column of its name; a NULL in a field declared plain `str` reads as "" (how records
    say "none" in text). A field with a default whose column the query did not select keeps
    its default."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not field.init:
            continue
        if field.name in computed:
            values[field.name] = computed[field.name]
            continue
        try:
            value = row[field.name]
        except KeyError:
            continue  # not selected: the field's default (or a TypeError naming it)
        values[field.name] = "" if value is None and field.type in ("str", str) else value
    return cls(**values)
