"""The shim that owns one run of an app, so that the app outlives the agent.

    python -I -S shim.py RUN_DIR READY_FD -- ARGV...

The agent starts it in a session of its own, with the app's environment, working directory
and output (stdout and stderr are the container's log files, which the agent tails). The
shim starts ARGV in a process group of its own (the agent signals that group, or the
container through runc), writes `shim.json` in RUN_DIR (its pid and the app's, each with
its start time, so a later agent can tell them from a recycled pid), tells the agent on
READY_FD, waits for the app, kills whatever is left in the app's group, and writes the
app's exit status and resource usage (wait4's) to `exit.json` atomically. Then it ends.

Standard library only, and no import of Hangar: it runs with `-I -S` (no site, no
environment variables of Python's), so a running shim never depends on the agent's virtual
environment staying as it was.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

SHIM_FILE = "shim.json"
EXIT_FILE = "exit.json"


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (field 22 of /proc/PID/stat);
    0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 and fields[0] != b"Z" else 0


def write_atomically(path: str, content: dict[str, object]) -> None:
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(content, f)
    os.replace(temporary, path)


def given_environment() -> dict[bytes, bytes]:
    """The environment the shim was started with, as the app must get it: Python adds to
    its own (LC_CTYPE, coercing a C locale: PEP 538), the kernel's copy stays as given."""
    with open("/proc/self/environ", "rb") as f:
        pairs = [entry.partition(b"=") for entry in f.read().split(b"\0") if entry]
    return {name: value for name, _, value in pairs}


def tell(ready: int, message: dict[str, object]) -> None:
    try:
        os.write(ready, json.dumps(message).encode() + b"\n")
    finally:
        os.close(ready)


def main(argv: list[str]) -> int:
    run_dir, ready = argv[1], int(argv[2])
    command = argv[4:]
    os.set_inheritable(ready, False)  # the app must not hold the agent's pipe
    try:
        child = os.posix_spawnp(
            command[0],
            command,
            given_environment(),
            setpgroup=0,  # its own process group: signals reach the whole app
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them; apps do not
        )
    except OSError as exc:
        tell(ready, {"error": exc.strerror or str(exc)})
        return 127
    # The shim outlives signals meant for others (a terminal's, a host shutting down): it
    # must be there to record how the app ended. Set after the spawn: an ignored signal
    # would be inherited by the app.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    me = os.getpid()
    write_atomically(
        os.path.join(run_dir, SHIM_FILE),
        {
            "shim": me,
            "shim_start": start_ticks(me),
            "child": child,
            "child_start": start_ticks(child),
        },
    )
    tell(ready, {"child": child})
    # Ended, not reaped yet: while it is a zombie its pid (the group's id) cannot be reused,
    # so what is left of its group (background children) is killed with certainty.
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    try:
        os.killpg(child, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status, usage = os.wait4(child, 0)
    write_atomically(
        os.path.join(run_dir, EXIT_FILE),
        {
            "returncode": os.waitstatus_to_exitcode(status),
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "ended_at": time.time(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
