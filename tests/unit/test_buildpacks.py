"""Buildpack-style builds: Procfile parsing, detection of the app's kind, the plan's process
types, and the generated build script run for real with /bin/sh on the test apps (first
build, a rebuild from the dependency cache, a failing install)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from services.agent.buildpacks import (
    BuildError,
    BuildPlan,
    default_command,
    detect,
    parse_procfile,
    plan_build,
    run_env,
)
from tests.support import wheels
from tests.support.wheels import APPS, build_wheel, python_app_source

BUILD_TIMEOUT = 300


# Procfile


def test_a_procfile_with_comments_and_blank_lines_parses() -> None:
    text = (
        "# process types\n"
        "\n"
        "web: gunicorn app:app --bind 0.0.0.0:$PORT  # the # stays in the command\n"
        "  worker:python worker.py\n"
        "release_2-x :  ./migrate\n"
    )
    assert parse_procfile(text) == {
        "web": "gunicorn app:app --bind 0.0.0.0:$PORT  # the # stays in the command",
        "worker": "python worker.py",
        "release_2-x": "./migrate",
    }


def test_an_empty_procfile_has_no_process_types() -> None:
    assert parse_procfile("# nothing yet\n\n") == {}


def test_a_repeated_process_type_is_refused() -> None:
    with pytest.raises(BuildError, match=r"line 3 .*'web' again.*line 1"):
        parse_procfile("web: a\nworker: b\nweb: c\n")


@pytest.mark.parametrize(
    ("text", "number", "content"),
    [
        ("web: ok\nthis is not a process\n", 2, "this is not a process"),
        ("\n\nweb server: python app.py\n", 3, "web server: python app.py"),
        ("web: ok\n\n#c\nwörker: x\n", 4, "wörker: x"),
    ],
)
def test_a_malformed_line_is_refused_with_its_number_and_content(
    text: str, number: int, content: str
) -> None:
    with pytest.raises(BuildError) as caught:
        parse_procfile(text)
    assert f"line {number}" in str(caught.value)
    assert content in str(caught.value)


def test_a_process_type_without_a_command_is_refused() -> None:
    with pytest.raises(BuildError, match=r"line 1 .*'web' no command"):
        parse_procfile("web:\n")


# Detection and plans


def test_each_test_app_is_detected_as_its_kind() -> None:
    assert detect(APPS / "python-app") == ("python",)
    assert detect(APPS / "node-app") == ("node",)
    assert detect(APPS / "procfile-only") == ()


def test_pyproject_and_package_json_together_are_both_kinds(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '1'\n")
    (tmp_path / "package.json").write_text("{}")
    assert detect(tmp_path) == ("python", "node")


def test_nothing_to_detect_is_an_error_saying_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(BuildError) as caught:
        detect(tmp_path)
    assert str(caught.value) == (
        "no Procfile, requirements.txt, pyproject.toml or package.json: "
        "nothing says how to build or run this app"
    )
    with pytest.raises(BuildError, match="nothing says how to build"):
        plan_build(tmp_path)


def test_the_plans_carry_the_procfile_process_types() -> None:
    python = plan_build(APPS / "python-app")
    assert python.kinds == ("python",)
    assert python.process_types == {
        "web": "python app.py",
        "release": "python -c \"print('release phase ran')\"",
    }
    assert default_command(python) == "python app.py"
    only = plan_build(APPS / "procfile-only")
    assert only.kinds == ()
    assert set(only.process_types) == {"web", "worker"}
    assert default_command(only) == "python3 -m http.server $PORT"
    assert default_command(BuildPlan(kinds=("python",), process_types={}, script="")) is None


def test_an_app_without_a_procfile_has_no_process_types(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("")
    plan = plan_build(tmp_path)
    assert plan.process_types == {}
    assert default_command(plan) is None


def test_a_malformed_package_json_is_a_build_error(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text("{not json")
    with pytest.raises(BuildError, match=r"package\.json is not valid JSON"):
        plan_build(tmp_path)


def test_paths_in_the_script_are_shell_quoted(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("")
    plan = plan_build(tmp_path, app_root="/srv/my app", cache_root="/c/$(reboot)")
    assert "app_root='/srv/my app'\n" in plan.script
    assert "cache_root='/c/$(reboot)'\n" in plan.script
    assert plan.script.startswith("set -eu\n")


def test_run_env_puts_the_installed_tools_first_on_path() -> None:
    assert run_env() == {
        "PATH": "/app/.venv/bin:/app/node_modules/.bin:/usr/local/bin:/usr/bin:/bin"
    }
    assert run_env("/srv/app/", kinds=("python",), base_path="/bin") == {
        "PATH": "/srv/app/.venv/bin:/bin",
        "VIRTUAL_ENV": "/srv/app/.venv",
    }
    assert run_env(kinds=("node",), base_path="/bin") == {"PATH": "/app/node_modules/.bin:/bin"}


# The script, run for real


def _clean_env() -> dict[str, str]:
    """This process's environment without pip or npm settings, which the sandbox would not
    have either (a host's PIP_FIND_LINKS, say, must not feed the build)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("PIP_", "NPM_CONFIG_"))
    }


def _build(app: Path, cache: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the app's build script the way the agent does (sh -c, cwd = the app directory,
    the paths the sandbox would see being these real ones); return the result and seconds."""
    plan = plan_build(app, app_root=str(app), cache_root=str(cache))
    started = time.monotonic()
    result = subprocess.run(
        ["/bin/sh", "-c", plan.script],
        cwd=app,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
        env=_clean_env(),
    )
    return result, time.monotonic() - started


def _imports_greeting(app: Path) -> str:
    result = subprocess.run(
        [
            str(app / ".venv" / "bin" / "python"),
            "-c",
            "import hangar_greeting; print(hangar_greeting.greet())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_a_python_app_builds_and_a_rebuild_uses_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    app = python_app_source(tmp_path)
    first, first_seconds = _build(app, cache)
    assert first.returncode == 0, first.stdout
    assert "-----> Python app detected" in first.stdout
    assert "-----> Installing dependencies with pip" in first.stdout
    assert "hangar-greeting" in first.stdout.lower()  # pip's own output is shown
    assert "-----> Build succeeded" in first.stdout
    assert _imports_greeting(app) == "hello from hangar_greeting"
    assert len(list((cache / "python").glob("*.tar"))) == 1
    assert (cache / "tmp").is_dir()

    # A fresh upload of the same app at the same path, as every build is at /app.
    shutil.rmtree(app)
    app = python_app_source(tmp_path)
    shutil.rmtree(app / "wheels")  # the cache alone must be enough
    second, second_seconds = _build(app, cache)
    assert second.returncode == 0, second.stdout
    assert "-----> Using cached dependencies" in second.stdout
    assert "Installing dependencies" not in second.stdout
    assert _imports_greeting(app) == "hello from hangar_greeting"
    print(f"python build: first {first_seconds:.2f}s, from cache {second_seconds:.2f}s")


def test_a_changed_requirements_file_installs_again_and_replaces_the_cache(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    app = python_app_source(tmp_path)
    assert _build(app, cache)[0].returncode == 0
    old = {p.name for p in (cache / "python").glob("*.tar")}
    build_wheel(app / "wheels", "hangar-extra", "2.0", {"hangar_extra.py": "VALUE = 2\n"})
    with (app / "requirements.txt").open("a") as requirements:
        requirements.write("hangar-extra==2.0\n")
    result, _ = _build(app, cache)
    assert result.returncode == 0, result.stdout
    assert "-----> Installing dependencies with pip" in result.stdout
    new = {p.name for p in (cache / "python").glob("*.tar")}
    assert len(new) == 1 and new != old


def test_a_failing_install_fails_the_build_saying_what_failed(tmp_path: Path) -> None:
    app = python_app_source(tmp_path)
    (app / "requirements.txt").write_text(
        "--no-index\n--find-links wheels\nhangar-no-such-package==9.9\n"
    )
    result, _ = _build(app, tmp_path / "cache")
    assert result.returncode != 0
    assert "hangar-no-such-package" in result.stdout  # pip's error is in the log
    assert "pip could not install the packages listed in requirements.txt" in result.stdout
    assert "Build failed" in result.stdout
    assert "Build succeeded" not in result.stdout
    assert not list((tmp_path / "cache" / "python").glob("*.tar"))


def test_a_procfile_only_app_builds_without_installing_anything(tmp_path: Path) -> None:
    app = tmp_path / "app"
    shutil.copytree(APPS / "procfile-only", app)
    result, _ = _build(app, tmp_path / "cache")
    assert result.returncode == 0, result.stdout
    assert "-----> Build succeeded" in result.stdout
    assert sorted(p.name for p in app.iterdir()) == ["Procfile"]


def test_a_node_app_builds_with_npm_ci_and_a_rebuild_uses_the_cache(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip(f"npm is not installed: no npm/node on PATH ({os.environ.get('PATH', '')})")
    cache = tmp_path / "cache"
    app = tmp_path / "app"
    shutil.copytree(APPS / "node-app", app)
    first, first_seconds = _build(app, cache)
    assert first.returncode == 0, first.stdout
    assert "-----> Node.js app detected" in first.stdout
    assert "-----> Installing dependencies with npm ci" in first.stdout
    assert "-----> Build succeeded" in first.stdout
    assert (app / "node_modules").is_dir()
    assert (cache / "npm").is_dir()  # npm's cache went to the cache mount, not $HOME

    shutil.rmtree(app)
    shutil.copytree(APPS / "node-app", app)
    second, second_seconds = _build(app, cache)
    assert second.returncode == 0, second.stdout
    assert "-----> Using cached dependencies" in second.stdout
    assert (app / "node_modules").is_dir()
    print(f"node build: first {first_seconds:.2f}s, from cache {second_seconds:.2f}s")


def test_a_node_build_script_runs(tmp_path: Path) -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm is not installed: no npm/node on PATH")
    app = tmp_path / "app"
    app.mkdir()
    build = "node -e \"require('fs').writeFileSync('built.txt', 'ok')\""
    package = {"name": "b", "version": "1.0.0", "scripts": {"build": build}}
    (app / "package.json").write_text(json.dumps(package))
    result, _ = _build(app, tmp_path / "cache")
    assert result.returncode == 0, result.stdout
    assert "-----> Installing dependencies with npm install" in result.stdout
    assert "-----> Running npm run build" in result.stdout
    assert (app / "built.txt").read_text() == "ok"


def test_a_pyproject_app_is_installed_and_reinstalled_over_a_cache_hit(tmp_path: Path) -> None:
    """``pip install .`` of a project whose build backend lives in the app itself (so no
    index is needed); a rebuild with changed code but the same pyproject.toml restores the
    cached virtualenv and still installs the new code."""
    app = tmp_path / "app"
    (app / "greeter").mkdir(parents=True)
    shutil.copy(Path(wheels.__file__), app / "wheelmaker.py")
    (app / "backend.py").write_text(
        "from pathlib import Path\n"
        "from wheelmaker import build_wheel as make\n\n\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        "    source = {'greeter/__init__.py': Path('greeter/__init__.py').read_text()}\n"
        "    return make(Path(wheel_directory), 'greeter', '1.0', source).name\n"
    )
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    )
    (app / "greeter" / "__init__.py").write_text("VERSION = 1\n")
    cache = tmp_path / "cache"

    def built_version() -> str:
        result = subprocess.run(
            [str(app / ".venv" / "bin" / "python"), "-c", "import greeter; print(greeter.VERSION)"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.strip()

    first, _ = _build(app, cache)
    assert first.returncode == 0, first.stdout
    assert "-----> Installing dependencies with pip" in first.stdout
    assert built_version() == "1"
    (app / "greeter" / "__init__.py").write_text("VERSION = 2\n")
    second, _ = _build(app, cache)
    assert second.returncode == 0, second.stdout
    assert "-----> Using cached dependencies" in second.stdout
    assert "-----> Installing the project itself with pip" in second.stdout
    assert built_version() == "2"
