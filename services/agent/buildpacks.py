"""Turn an uploaded app's source into a runnable slug, the way buildpacks do.

The agent builds an app inside a sandbox: a read-only root holding the host's tools, the
app's directory mounted read-write (by default at ``/app``), a per-project dependency cache
mounted read-write (by default at ``/cache``), a tiny ``$HOME``, no privileges and perhaps no
network. This module decides *what* to run there and writes it as one POSIX ``sh`` script;
the agent runs that script with ``/bin/sh -c`` and the app directory as the working
directory, and shows its output to the user as the build log. Whatever the app directory
holds afterwards is the slug, which later runs read-only from the same path.

Detection looks at marker files only:

* ``requirements.txt`` or ``pyproject.toml`` means a Python app: a virtualenv is made at
  ``<app_root>/.venv`` with the ``python3`` found on ``PATH`` and the dependencies are
  installed into it with pip;
* ``package.json`` means a Node.js app: ``npm ci`` (when ``package-lock.json`` exists) or
  ``npm install`` fills ``node_modules``, then ``npm run build`` runs if the package defines
  a ``build`` script;
* a ``Procfile`` names the app's process types (``web``, ``worker``, ...). An app with only
  a Procfile is valid: nothing is installed and its commands run as written.

Installed dependencies are cached in the cache mount as one tar archive per key, where the
key is a SHA-256 over the dependency manifest, the toolchain's version and the app root (a
virtualenv records absolute paths, so it is only reusable at the path it was made at). A
build whose key matches an archive restores it instead of installing anything, which also
lets a rebuild succeed without network. Saving to the cache is best effort: a full or
unwritable cache warns but does not fail the build.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The ``PATH`` that :func:`run_env` extends when the caller gives none."""

PROCFILE = "Procfile"
_PROCESS_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)[ \t]*:[ \t]*(?P<command>.*?)[ \t]*$")
_NOTHING_TO_BUILD = (
    "no Procfile, requirements.txt, pyproject.toml or package.json: "
    "nothing says how to build or run this app"
)


class BuildError(Exception):
    """The app cannot be built as uploaded; the message says what to change."""


@dataclass(frozen=True)
class BuildPlan:
    """What a build of one app will do.

    ``kinds`` names the detected app types in build order (``"python"``, ``"node"``), empty
    for an app described by its Procfile alone. ``process_types`` maps each Procfile process
    type to its command (empty without a Procfile). ``script`` is the POSIX ``sh`` script
    that performs the build inside the sandbox.
    """

    kinds: tuple[str, ...]
    process_types: dict[str, str] = field(default_factory=dict)
    script: str = ""


def parse_procfile(text: str) -> dict[str, str]:
    """Read a Procfile: one ``name: command`` per line.

    Names are made of ASCII letters, digits, ``_`` and ``-`` and are kept as written; each
    may appear once. Blank lines and lines starting with ``#`` are ignored. A ``#`` later in
    a line belongs to the command (commands are shell text). Any other line, a missing
    command or a repeated name raises :class:`BuildError` naming the line.
    """
    processes: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PROCESS_LINE.match(line)
        if match is None:
            raise BuildError(
                f"Procfile line {number} is not 'name: command' (names use letters, digits, "
                f"'_' and '-'): {raw!r}"
            )
        name, command = match["name"], match["command"]
        if not command:
            raise BuildError(f"Procfile line {number} gives process type {name!r} no command")
        if name in processes:
            raise BuildError(
                f"Procfile line {number} defines process type {name!r} again "
                f"(first defined on line {first_seen[name]}); each name may appear once"
            )
        processes[name] = command
        first_seen[name] = number
    return processes


def detect(app_dir: Path) -> tuple[str, ...]:
    """The app types found in ``app_dir``, in build order.

    ``"python"`` when ``requirements.txt`` or ``pyproject.toml`` exists, ``"node"`` when
    ``package.json`` exists; both may apply. An empty tuple means only a Procfile was found.
    With neither marker files nor a Procfile, raises :class:`BuildError`.
    """
    kinds: list[str] = []
    if (app_dir / "requirements.txt").is_file() or (app_dir / "pyproject.toml").is_file():
        kinds.append("python")
    if (app_dir / "package.json").is_file():
        kinds.append("node")
    if not kinds and not (app_dir / PROCFILE).is_file():
        raise BuildError(_NOTHING_TO_BUILD)
    return tuple(kinds)


def plan_build(app_dir: Path, app_root: str = "/app", cache_root: str = "/cache") -> BuildPlan:
    """Plan the build of the source in ``app_dir``.

    ``app_dir`` is where this process can read the source now; ``app_root`` and
    ``cache_root`` are where the sandbox will see the app directory and the dependency
    cache, and are the paths written into the script. Raises :class:`BuildError` when the
    app cannot be built (nothing detected, a malformed Procfile or ``package.json``).
    """
    kinds = detect(app_dir)
    process_types: dict[str, str] = {}
    procfile = app_dir / PROCFILE
    if procfile.is_file():
        process_types = parse_procfile(_read_text(procfile))
    parts = [_prelude(app_root, cache_root)]
    if "python" in kinds:
        parts.append(_python_steps(app_dir))
    if "node" in kinds:
        parts.append(_node_steps(app_dir))
    if not kinds:
        parts.append('say "No language detected: the Procfile\'s commands run as written"\n')
    if process_types:
        listed = ", ".join(sorted(process_types))
        parts.append(f"say {shlex.quote(f'Process types: {listed}')}\n")
    parts.append('say "Build succeeded"\n')
    return BuildPlan(kinds=kinds, process_types=process_types, script="".join(parts))


def default_command(plan: BuildPlan) -> str | None:
    """The command of the plan's ``web`` process type, or None when there is none."""
    return plan.process_types.get("web")


def run_env(
    app_root: str = "/app",
    kinds: Iterable[str] | None = None,
    base_path: str = DEFAULT_PATH,
) -> dict[str, str]:
    """Environment variables to set when running a built app.

    ``PATH`` becomes ``base_path`` prefixed with the virtualenv's ``bin`` (Python apps) and
    ``node_modules/.bin`` (Node.js apps), so ``python``, ``gunicorn`` or a package's
    executables resolve to what the build installed. Python apps also get ``VIRTUAL_ENV``.
    With ``kinds`` None both prefixes are added: a directory that the build did not create
    simply holds nothing.
    """
    wanted = {"python", "node"} if kinds is None else set(kinds)
    root = app_root.rstrip("/") or "/"
    prefixes: list[str] = []
    env: dict[str, str] = {}
    if "python" in wanted:
        prefixes.append(f"{root}/.venv/bin")
        if kinds is not None:
            env["VIRTUAL_ENV"] = f"{root}/.venv"
    if "node" in wanted:
        prefixes.append(f"{root}/node_modules/.bin")
    env["PATH"] = ":".join([*prefixes, base_path]) if base_path else ":".join(prefixes)
    return env


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BuildError(f"{path.name} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise BuildError(f"cannot read {path.name}: {exc.strerror}") from None


def _prelude(app_root: str, cache_root: str) -> str:
    """Shell helpers and environment shared by every build: where caches and temporary
    files go (the cache mount, not the tiny ``$HOME``), and the progress/failure/caching
    functions the language steps call."""
    app, cache = shlex.quote(app_root), shlex.quote(cache_root)
    return f"""set -eu
app_root={app}
cache_root={cache}
say() {{ printf '%s\\n' "-----> $*"; }}
note() {{ printf '       %s\\n' "$*"; }}
warn() {{ printf ' !     %s\\n' "$*" >&2; }}
fail() {{ printf ' !     %s\\n' "$*" >&2; printf ' !     Build failed\\n' >&2; exit 1; }}
need() {{ command -v "$1" >/dev/null 2>&1 || fail "$1 is not installed in the build image: $2"; }}
# cache_key TEXT FILE...: SHA-256 of the files' contents followed by TEXT.
cache_key() {{
  _text=$1; shift
  {{ cat -- "$@"; printf '\\n%s\\n' "$_text"; }} | sha256sum | cut -d ' ' -f 1
}}
# restore_cache DIR KEY: unpack DIR/KEY.tar into the app directory; false if absent or bad.
restore_cache() {{
  [ -f "$1/$2.tar" ] || return 1
  tar -xf "$1/$2.tar" -C "$app_root" 2>&1 && return 0
  warn "the cached archive $1/$2.tar could not be unpacked; installing afresh"
  return 1
}}
# save_cache DIR KEY NAME: archive the app directory's NAME as DIR/KEY.tar, drop older keys.
save_cache() {{
  _tmp="$1/.$2.tar.$$"
  if tar -cf "$_tmp" -C "$app_root" "$3" && mv -f "$_tmp" "$1/$2.tar"; then
    for _old in "$1"/*.tar; do
      [ "$_old" = "$1/$2.tar" ] || rm -f -- "$_old"
    done
    note "Saved $3 to the dependency cache"
  else
    rm -f -- "$_tmp"
    warn "could not save $3 to the dependency cache; the next build installs it again"
  fi
}}
cd "$app_root"
mkdir -p "$cache_root/tmp" || fail "the dependency cache $cache_root is not writable"
export TMPDIR="$cache_root/tmp"
export XDG_CACHE_HOME="$cache_root/xdg"
"""


def _python_steps(app_dir: Path) -> str:
    """Create ``$app_root/.venv`` and install the app's Python dependencies into it, or
    restore it from the cache. With ``requirements.txt`` it is installed with ``-r`` (pip
    options in it, like ``--find-links wheels``, resolve against the app directory); with only
    ``pyproject.toml`` the app itself is installed (``pip install .``), and re-installed on a
    cache hit so the slug never carries a stale copy of its own code. The cache key covers
    the interpreter's version and installation prefix, since the virtualenv links to it."""
    pip = "venv_pip install --disable-pip-version-check --no-input"
    if (app_dir / "requirements.txt").is_file():
        manifest = "requirements.txt"
        install = f"""  {pip} -r requirements.txt \\
    || fail "pip could not install the packages listed in requirements.txt (see pip's output above)"
"""
        refresh = ""
    else:
        manifest = "pyproject.toml"
        install = f"""  {pip} . \\
    || fail "pip could not install the project described by pyproject.toml (see pip's output above)"
"""
        refresh = f"""  say "Installing the project itself with pip"
  {pip} --no-deps --force-reinstall . \\
    || fail "pip could not install the project described by pyproject.toml (see pip's output above)"
"""
    return f"""say "Python app detected"
need python3 "Python apps are built with the python3 found on PATH"
py_version=$(python3 -c 'import sys;print(sys.version);print(sys.base_prefix)') \\
  || fail "python3 does not run"
note "Using Python $(python3 -c 'import platform;print(platform.python_version())')"
export PIP_CACHE_DIR="$cache_root/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$cache_root/python"
# The stack's own pip installs into a virtualenv made without one (seconds faster, and a
# smaller slug); without it, the virtualenv gets its own pip (ensurepip).
if python3 -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pip") is None)' \\
  2>/dev/null; then host_pip=1; else host_pip=; fi
venv_pip() {{
  if [ -n "$host_pip" ]; then
    python3 -m pip --python "$app_root/.venv/bin/python" "$@"
  else
    "$app_root/.venv/bin/pip" "$@"
  fi
}}
py_key=$(cache_key "$py_version $app_root pip:${{host_pip:-venv}}" {manifest})
rm -rf "$app_root/.venv"
if restore_cache "$cache_root/python" "$py_key"; then
  say "Using cached dependencies"
  note "{manifest} and the Python version are unchanged since the cached build"
{refresh}else
  say "Installing dependencies with pip"
  rm -rf "$app_root/.venv"
  if [ -n "$host_pip" ]; then
    python3 -m venv --without-pip "$app_root/.venv" || fail "python3 -m venv failed"
  else
    python3 -m venv "$app_root/.venv" \\
      || fail "python3 -m venv failed: the build image's Python lacks the venv module (ensurepip)"
  fi
{install}  save_cache "$cache_root/python" "$py_key" .venv
fi
"""


def _node_steps(app_dir: Path) -> str:
    """Fill ``node_modules`` with ``npm ci`` (``package-lock.json`` present) or ``npm
    install``, or restore it from the cache, then run the package's ``build`` script if it
    has one (on every build, since its output depends on the app's code)."""
    try:
        package = json.loads(_read_text(app_dir / "package.json"))
    except json.JSONDecodeError as exc:
        raise BuildError(f"package.json is not valid JSON: {exc}") from None
    if not isinstance(package, dict):
        raise BuildError("package.json must hold a JSON object")
    scripts = package.get("scripts")
    has_build = isinstance(scripts, dict) and isinstance(scripts.get("build"), str)
    locked = (app_dir / "package-lock.json").is_file()
    manifest = "package-lock.json" if locked else "package.json"
    command = "npm ci" if locked else "npm install"
    steps = f"""say "Node.js app detected"
need node "Node.js apps are built with the node found on PATH"
need npm "Node.js apps are installed with npm"
node_version=$(node --version) || fail "node does not run"
note "Using Node.js $node_version, npm $(npm --version)"
export npm_config_cache="$cache_root/npm"
export npm_config_update_notifier=false
export npm_config_fund=false
export npm_config_audit=false
mkdir -p "$cache_root/node"
node_key=$(cache_key "$node_version {command} $app_root" {manifest})
rm -rf node_modules
if restore_cache "$cache_root/node" "$node_key"; then
  say "Using cached dependencies"
  note "{manifest} and the Node.js version are unchanged since the cached build"
else
  say "Installing dependencies with {command}"
  {command} || fail "{command} failed (see npm's output above)"
  mkdir -p node_modules
  save_cache "$cache_root/node" "$node_key" node_modules
fi
"""
    if has_build:
        steps += """say "Running npm run build"
npm run build || fail "the package's build script failed (npm run build, output above)"
"""
    return steps
