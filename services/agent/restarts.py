"""When and how soon the agent starts a crashed app again, as plain Python (no I/O).

Like kubelet's restart back-off: the first restart waits `backoff_seconds`, each further
crash doubles the wait up to `max_backoff_seconds`, and a run that stays healthy for
`stable_seconds` starts the count over. A crash is *quick* when its run never became healthy
or ended before it was stable; `crash_loop_after` quick crashes in a row make the container
crash-looping (still restarted with back-off; runtime shows its deployment CRASH_LOOP).

Only an app that has been healthy once is restarted: a new release that crashes or never
answers during its first start-up fails as before, so runtime never supersedes the release
that serves with one that never worked (see services/runtime/deployer.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.agent.domain import AGENT_NOTICE, LogLine, RestartPolicy

LAST_LINES = 5  # app log lines kept with a crash (the deployment's status_reason shows them)
MAX_LINE_CHARS = 200


@dataclass(frozen=True)
class RestartRules:
    """The agent's back-off settings (HANGAR_AGENT_RESTART_*)."""

    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    stable_seconds: float = 30.0  # healthy this long: back-off and crash count start over
    crash_loop_after: int = 5  # quick crashes in a row that make a crash loop
    hold_seconds: float = 10.0  # a connection waits for a restart due within this long

    def delay(self, streak: int) -> float:
        """The wait before the start that follows the `streak`+1-th crash in a row."""
        factor: int = 2 ** min(streak, 32)  # typeshed: int ** int is Any (negative exponents)
        return min(self.max_backoff_seconds, self.backoff_seconds * factor)


def restarts_after(policy: RestartPolicy, returncode: int, *, killed_by_agent: bool) -> bool:
    """Whether a run that ended on its own (or was killed by a failed liveness check, or for
    not answering in time: `killed_by_agent`) is followed by another, per `policy`."""
    if policy is RestartPolicy.NEVER:
        return False
    if policy is RestartPolicy.ALWAYS:
        return True
    return returncode != 0 or killed_by_agent


@dataclass
class CrashCount:
    """One container's crashes since it last ran stable (the driver's, mutable)."""

    streak: int = 0  # crashes since the app last ran stable
    quick: int = 0  # of those, the quick ones

    def crashed(self, rules: RestartRules, *, quick: bool) -> float:
        """Count a crash; the back-off before the next start."""
        delay = rules.delay(self.streak)
        self.streak += 1
        self.quick += int(quick)
        return delay

    def stable(self) -> None:
        """The app has stayed healthy for `stable_seconds`: everything starts over."""
        self.streak = self.quick = 0

    def crash_loop(self, rules: RestartRules) -> bool:
        return self.quick >= rules.crash_loop_after


def last_app_lines(lines: Iterable[LogLine], count: int = LAST_LINES) -> tuple[str, ...]:
    """The app's own last `count` lines (the agent's notices left out), each shortened."""
    own = [line.text for line in lines if not line.text.startswith(AGENT_NOTICE)]
    return tuple(_shorten(text) for text in own[-count:])


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_LINE_CHARS else text[: MAX_LINE_CHARS - 1] + "…"
