"""Make pure-Python wheels on the fly, so build tests can install packages offline without
committing binary files.

A wheel is a zip archive holding the package's modules plus a ``<dist>-<version>.dist-info``
directory with ``METADATA`` (name and version), ``WHEEL`` (format version, purelib, tag) and
``RECORD`` (every file with its SHA-256 as unpadded urlsafe base64, and its size)."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import zipfile
from pathlib import Path

APPS = Path(__file__).resolve().parents[1] / "data" / "apps"

GREETING_MODULES = {
    "hangar_greeting/__init__.py": (
        '"""A dependency for build tests."""\n\n\n'
        "def greet() -> str:\n"
        '    """The greeting the test app serves."""\n'
        '    return "hello from hangar_greeting"\n'
    ),
}


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def build_wheel(directory: Path, name: str, version: str, modules: dict[str, str]) -> Path:
    """Write a ``py3-none-any`` wheel of distribution ``name`` at ``version`` into
    ``directory`` and return its path.

    ``modules`` maps paths inside the wheel (``"pkg/__init__.py"``) to their source text.
    """
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {path: text.encode() for path, text in modules.items()}
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        f"Summary: {name}, built for tests\n"
    ).encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests.support.wheels\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in files.items()]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def python_app_source(tmp: Path) -> Path:
    """Copy the ``python-app`` test app to ``tmp/app`` (which must not exist yet) and build
    the ``hangar-greeting`` wheel its ``requirements.txt`` installs into its ``wheels/``
    directory; return the copy. Always the same path for one ``tmp``, as ``/app`` is for
    every build on the platform."""
    app = tmp / "app"
    shutil.copytree(APPS / "python-app", app)
    build_wheel(app / "wheels", "hangar-greeting", "1.0", GREETING_MODULES)
    return app
