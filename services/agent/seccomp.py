"""The default seccomp profile container engines ship, as an OCI runtime spec `linux.seccomp`.

The profile is moby's (`third_party/seccomp/default.json`, Apache-2.0): a Docker-format profile
whose rules carry `includes` / `excludes` conditions on the container's capabilities, the CPU
architecture and the running kernel. An OCI runtime knows nothing of those conditions, so an
engine resolves them when it writes the container's config.json; this module does the same:

- `architectures`: the profile's `archMap` entry for the architecture, i.e. the native one and
  its sub-architectures (x86_64 also lists x86 and x32, so 32-bit binaries are filtered too);
- a rule is kept when every `includes` condition holds (each listed capability is in the
  container's set, the architecture is one of the listed `arches`, the kernel is at least
  `minKernel`) and no `excludes` condition does (any listed capability present, architecture
  listed, kernel at least `minKernel`);
- what remains is `{names, action, errnoRet?, args?}`, in the profile's order.

Our containers run with no capabilities at all, so every rule gated on one (mount, unshare,
setns, bpf, reboot, module loading, ...) is dropped and the default action (EPERM) applies, while
the rules for capability-less containers stay (clone without namespace flags, clone3 answering
ENOSYS so libc falls back to clone, whose flags seccomp can inspect).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

PROFILE_PATH = Path(__file__).resolve().parents[2] / "third_party" / "seccomp" / "default.json"

# `uname -m` (and the Go / Debian spellings) -> libseccomp's architecture token, the one the
# profile's `arches` conditions use.
_MACHINE_TO_NATIVE = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "x86": "x86",
    "x32": "x32",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "arm": "arm",
    "mips": "mips",
    "mips64": "mips64",
    "mips64n32": "mips64n32",
    "mipsel": "mipsel",
    "mipsel64": "mipsel64",
    "mipsel64n32": "mipsel64n32",
    "ppc": "ppc",
    "ppc64": "ppc64",
    "ppc64le": "ppc64le",
    "riscv64": "riscv64",
    "s390": "s390",
    "s390x": "s390x",
    "loongarch64": "loong64",
    "loong64": "loong64",
}

# libseccomp token -> the runtime spec's SCMP_ARCH_* name.
_NATIVE_TO_SCMP = {
    "x86": "SCMP_ARCH_X86",
    "amd64": "SCMP_ARCH_X86_64",
    "x32": "SCMP_ARCH_X32",
    "arm": "SCMP_ARCH_ARM",
    "arm64": "SCMP_ARCH_AARCH64",
    "mips": "SCMP_ARCH_MIPS",
    "mips64": "SCMP_ARCH_MIPS64",
    "mips64n32": "SCMP_ARCH_MIPS64N32",
    "mipsel": "SCMP_ARCH_MIPSEL",
    "mipsel64": "SCMP_ARCH_MIPSEL64",
    "mipsel64n32": "SCMP_ARCH_MIPSEL64N32",
    "ppc": "SCMP_ARCH_PPC",
    "ppc64": "SCMP_ARCH_PPC64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "riscv64": "SCMP_ARCH_RISCV64",
    "s390": "SCMP_ARCH_S390",
    "s390x": "SCMP_ARCH_S390X",
    "loong64": "SCMP_ARCH_LOONGARCH64",
}
_SCMP_TO_NATIVE = {scmp: native for native, scmp in _NATIVE_TO_SCMP.items()}


@functools.cache
def _docker_profile() -> dict[str, Any]:
    profile: dict[str, Any] = json.loads(PROFILE_PATH.read_text())
    return profile


def _native_arch(arch: str | None) -> str:
    """libseccomp's token for `arch` (a `uname -m` name, a SCMP_ARCH_* name or the token)."""
    name = os.uname().machine if arch is None else arch
    if name in _SCMP_TO_NATIVE:
        return _SCMP_TO_NATIVE[name]
    native = _MACHINE_TO_NATIVE.get(name) or _MACHINE_TO_NATIVE.get(name.lower())
    if native is None:
        raise ValueError(f"unknown architecture {name!r} for the seccomp profile")
    return native


def _kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as "6.1.0-18-amd64" or "3.12-1-amd64"; like the
    engines, only those two count."""
    match = re.match(r"\s*(\d+)\.(\d+)", release)
    if match is None:
        raise ValueError(f"cannot parse kernel version {release!r}")
    return int(match[1]), int(match[2])


def _normalize_cap(cap: str) -> str:
    cap = cap.strip().upper()
    return cap if cap.startswith("CAP_") else f"CAP_{cap}"


def _kernel_at_least(kernel: tuple[int, int], minimum: str) -> bool:
    return kernel >= _kernel_version(minimum)


def _applies(
    rule: Mapping[str, Any], native: str, caps: frozenset[str], kernel: tuple[int, int]
) -> bool:
    excludes = rule.get("excludes") or {}
    if native in (excludes.get("arches") or ()):
        return False
    if any(_normalize_cap(c) in caps for c in excludes.get("caps") or ()):
        return False
    if excludes.get("minKernel") and _kernel_at_least(kernel, excludes["minKernel"]):
        return False
    includes = rule.get("includes") or {}
    if includes.get("arches") and native not in includes["arches"]:
        return False
    if not all(_normalize_cap(c) in caps for c in includes.get("caps") or ()):
        return False
    return not (includes.get("minKernel") and not _kernel_at_least(kernel, includes["minKernel"]))


def default_profile(
    arch: str | None = None,
    capabilities: Collection[str] = (),
    *,
    kernel_release: str | None = None,
) -> dict[str, Any]:
    """The default profile as an OCI `linux.seccomp` object for a container on `arch` (default:
    this machine's) holding `capabilities` (default: none, as ours do), with the kernel's
    version from `kernel_release` (default: the running kernel's, `os.uname().release`).

    A fresh dict each call: callers may change it.
    """
    profile = _docker_profile()
    native = _native_arch(arch)
    caps = frozenset(_normalize_cap(c) for c in capabilities)
    kernel = _kernel_version(os.uname().release if kernel_release is None else kernel_release)

    scmp = _NATIVE_TO_SCMP[native]
    architectures: list[str] = []
    for entry in profile.get("archMap") or ():
        if entry["architecture"] == scmp:
            architectures = [scmp, *(entry.get("subArchitectures") or ())]
            break
    if not architectures:
        architectures = list(profile.get("architectures") or ()) or [scmp]

    syscalls: list[dict[str, Any]] = []
    for rule in profile["syscalls"]:
        if not _applies(rule, native, caps, kernel):
            continue
        names = list(rule.get("names") or ([rule["name"]] if rule.get("name") else []))
        if not names:
            continue
        out: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            out["args"] = copy.deepcopy(rule["args"])
        syscalls.append(out)

    seccomp: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if profile.get("defaultErrnoRet") is not None:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    seccomp["architectures"] = architectures
    if profile.get("flags"):
        seccomp["flags"] = list(profile["flags"])
    seccomp["syscalls"] = syscalls
    return seccomp
