"""Generate the `hangar` Python package from protos/ (`make protos`).

The one way stubs are made: grpc_tools.protoc writes *_pb2.py, *_pb2.pyi and
*_pb2_grpc.py for every protos/hangar/**/*.proto into <out>/hangar/, with an empty
__init__.py in every package directory. Because protos/ mirrors the proto packages,
generated imports read `from hangar.identity.v1 import identity_pb2` and need no rewriting.
The generated tree is committed and never edited by hand; tests/unit/test_protos.py
regenerates it into a temp dir and fails on any difference.

google/api and google/rpc imports resolve against the installed googleapis-common-protos,
google/protobuf against grpc_tools' bundled includes.

Usage: python scripts/gen_protos.py [--out DIR]   (default DIR: the repo root)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.api import annotations_pb2
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
PACKAGE = "hangar"


def googleapis_include() -> Path:
    """Directory holding google/api/*.proto from googleapis-common-protos."""
    return Path(annotations_pb2.__file__).resolve().parents[2]


def protobuf_include() -> Path:
    """grpc_tools' copy of google/protobuf/*.proto (well-known types)."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def proto_sources() -> list[Path]:
    """Our .proto files, relative to PROTO_DIR, in a stable order."""
    return sorted(p.relative_to(PROTO_DIR) for p in (PROTO_DIR / PACKAGE).rglob("*.proto"))


def run_protoc(sources: list[Path], out_dir: Path) -> None:
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{googleapis_include()}",
        f"-I{protobuf_include()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def drop_empty_grpc_modules(sources: list[Path], out_dir: Path) -> None:
    """A proto without a service (events.proto) would get an import-only *_pb2_grpc.py."""
    for source in sources:
        if "\nservice " not in (PROTO_DIR / source).read_text(encoding="utf-8"):
            out_dir.joinpath(source.parent, f"{source.stem}_pb2_grpc.py").unlink()


def write_package_inits(package_dir: Path) -> None:
    for directory in [package_dir, *(p for p in package_dir.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_bytes(b"")


def generate(out_root: Path) -> Path:
    """Regenerate <out_root>/hangar from scratch; returns that directory."""
    sources = proto_sources()
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_DIR / PACKAGE}")
    target = out_root / PACKAGE
    # Generate aside first, so a protoc error never leaves a half-deleted package behind.
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        run_protoc(sources, staging)
        drop_empty_grpc_modules(sources, staging)
        write_package_inits(staging / PACKAGE)
        # Whole-tree replace: removes stubs of protos that were deleted or renamed.
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging / PACKAGE, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="directory that receives the hangar/ package (default: repo root)",
    )
    args = parser.parse_args(argv)
    target = generate(args.out.resolve())
    print(f"generated {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
