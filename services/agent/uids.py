"""One host uid per project, never shared between projects: a container runs as its
project's uid, so two tenants' processes never hold the same credentials.

The table is a small JSON file in the agent's state directory, read and written under an
exclusive `flock`, so agents sharing the directory (or a restarted agent) keep each
project's uid and never hand one uid to two projects.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

# Far above the host's own users (Debian: system < 1000, people < 60000, nobody 65534) and
# the ranges distributions give to subuids (100000 + 65536 per user).
FIRST_UID = 2_000_000
MAX_PROJECTS = 1_000_000


class UidTable:
    def __init__(self, path: Path, first_uid: int = FIRST_UID) -> None:
        self.path = path
        self.first_uid = first_uid
        self._cache: dict[str, int] = {}

    def uid_of(self, project_id: str) -> int:
        """The project's uid, allocated the first time the project is seen."""
        if not project_id:
            raise ValueError("a container belongs to a project")
        if (uid := self._cache.get(project_id)) is not None:
            return uid
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "r+", encoding="utf-8") as file:
                text = file.read()
                table: dict[str, int] = json.loads(text) if text.strip() else {}
                uid = table.get(project_id)
                if uid is None:
                    if len(table) >= MAX_PROJECTS:
                        raise RuntimeError("the uid table is full")
                    uid = self.first_uid + len(table)
                    table[project_id] = uid
                    file.seek(0)
                    file.truncate()
                    json.dump(table, file)
                    file.flush()
                    os.fsync(file.fileno())
        finally:
            os.close(fd)  # releases the lock
        self._cache[project_id] = uid
        return uid
