"""The default seccomp profile (moby's) turned into the OCI `linux.seccomp` the runc driver
writes: what a capability-less container may and may not call, and (with runc, as root) that
the kernel enforces it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.agent import seccomp
from services.agent.seccomp import default_profile

CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _allowed(profile: dict[str, Any]) -> set[str]:
    """Names some rule allows (with or without an argument filter)."""
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }


def _rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [rule for rule in profile["syscalls"] if name in rule["names"]]


def test_shape_is_the_oci_linux_seccomp_object() -> None:
    profile = default_profile("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1  # EPERM
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for rule in profile["syscalls"]:
        assert set(rule) <= {"names", "action", "errnoRet", "args"}, rule
        assert rule["names"] and rule["action"].startswith("SCMP_ACT_")
    json.dumps(profile)  # plain JSON for config.json


def test_everyday_syscalls_are_allowed_unconditionally() -> None:
    profile = default_profile("x86_64")
    unconditional = {
        name for rule in profile["syscalls"] if "args" not in rule for name in rule["names"]
    }
    for name in ("read", "write", "openat", "execve", "mmap", "futex", "exit_group", "wait4"):
        assert name in unconditional, name
    assert "arch_prctl" in unconditional  # an x86_64 rule


def test_privileged_syscalls_are_left_to_the_default_eperm() -> None:
    allowed = _allowed(default_profile("x86_64"))
    for name in (
        "mount",
        "umount2",
        "unshare",
        "setns",
        "reboot",
        "kexec_load",
        "init_module",
        "finit_module",
        "delete_module",
        "bpf",
        "perf_event_open",
        "chroot",
        "open_by_handle_at",
        "clock_settime",
        "swapon",
        "pivot_root",
        "kcmp",
        "pidfd_getfd",
    ):
        assert name not in allowed, name


def test_clone_keeps_its_namespace_flag_filter_and_clone3_answers_enosys() -> None:
    profile = default_profile("x86_64")
    clone = _rules_for(profile, "clone")
    assert clone == [
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "op": "SCMP_CMP_MASKED_EQ"}],
        }
    ]
    # clone3's flags live in memory seccomp cannot read: ENOSYS makes libc fall back to clone.
    assert _rules_for(profile, "clone3") == [
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    ]


def test_s390x_filters_clone_on_its_second_argument() -> None:
    clone = _rules_for(default_profile("s390x"), "clone")
    assert [rule["args"][0]["index"] for rule in clone] == [1]


def test_socket_rules_keep_af_alg_out() -> None:
    rules = _rules_for(default_profile("x86_64"), "socket")
    assert [(r["args"][0]["op"], r["args"][0]["value"]) for r in rules] == [
        ("SCMP_CMP_LT", 38),  # AF_ALG (38) itself is refused
        ("SCMP_CMP_EQ", 39),
        ("SCMP_CMP_GT", 40),  # AF_VSOCK (40) too
    ]


def test_ptrace_follows_the_kernel_version_as_the_profile_says() -> None:
    # Since 4.8, seccomp is checked again after a tracer changes a syscall, so the profile allows
    # ptrace (and process_vm_*) without CAP_SYS_PTRACE; before 4.8 it is left out.
    assert "ptrace" in _allowed(default_profile("x86_64", kernel_release="6.1.0-18-amd64"))
    assert "ptrace" in _allowed(default_profile("x86_64", kernel_release="4.8.0"))
    assert "ptrace" not in _allowed(default_profile("x86_64", kernel_release="4.4.0-210-generic"))
    assert "ptrace" in _allowed(default_profile("x86_64", kernel_release="5.10+"))
    with pytest.raises(ValueError):
        default_profile("x86_64", kernel_release="unknown")


def test_capabilities_bring_their_rules_back() -> None:
    none = default_profile("x86_64")
    admin = default_profile("x86_64", ["CAP_SYS_ADMIN"])
    assert {"mount", "unshare", "setns", "bpf"} <= _allowed(admin)
    # With CAP_SYS_ADMIN clone is allowed outright, and the no-admin rules go away.
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} not in admin[
        "syscalls"
    ]
    assert all("args" not in rule for rule in _rules_for(admin, "clone"))
    assert "reboot" not in _allowed(admin)
    assert "reboot" in _allowed(default_profile("x86_64", ["sys_boot"]))  # "CAP_" optional
    assert _allowed(none) < _allowed(admin)


def test_architectures_and_arch_specific_rules() -> None:
    arm = default_profile("aarch64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert {"cacheflush", "set_tls"} <= _allowed(arm)
    assert "arch_prctl" not in _allowed(arm) and "modify_ldt" not in _allowed(arm)
    assert default_profile("SCMP_ARCH_X86_64") == default_profile("x86_64")
    assert default_profile("riscv64")["architectures"] == ["SCMP_ARCH_RISCV64"]
    with pytest.raises(ValueError):
        default_profile("pdp11")


def test_default_architecture_is_this_machines() -> None:
    assert default_profile() == default_profile(os.uname().machine)


def test_each_call_returns_a_fresh_object_and_the_file_is_read_once() -> None:
    first = default_profile("x86_64")
    first["syscalls"].clear()
    first["architectures"].append("SCMP_ARCH_PPC")
    assert default_profile("x86_64")["syscalls"]
    assert seccomp._docker_profile.cache_info().hits >= 1
    assert seccomp.PROFILE_PATH.is_file()


# --- runc, as root: the kernel enforces the profile ------------------------------------------

PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(result):
    return 0 if result == 0 else ctypes.get_errno()
out = {"mount_tmpfs": errno_of(libc.mount(b"x", b"/tmp", b"tmpfs", 0, None))}
pid = os.fork()  # clone without namespace flags; the child reports unshare's errno
if pid == 0:
    os._exit(errno_of(libc.unshare(0x10000000)))  # CLONE_NEWUSER: needs no capability
out["unshare_user"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(out))
"""


def _runc_or_skip() -> str:
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    if os.geteuid() != 0:
        pytest.skip("running containers with runc needs root")
    return runc


def _run_container(
    runc: str,
    tmp: Path,
    args: list[str],
    profile: dict[str, Any] | None,
    capabilities: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    bundle = tmp / f"bundle-{uuid.uuid4().hex[:8]}"
    rootfs = bundle / "rootfs"
    for directory in ("usr", "proc", "dev", "sys", "tmp"):
        (rootfs / directory).mkdir(parents=True)
    for link in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        if (Path("/usr") / link).exists():
            (rootfs / link).symlink_to(f"usr/{link}")
    subprocess.run([runc, "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    caps = capabilities or []
    spec["process"]["capabilities"] = {
        kind: caps for kind in ("bounding", "effective", "permitted")
    }
    spec["hostname"] = "seccomp-test"
    spec["mounts"] = [
        m for m in spec["mounts"] if m["destination"] in ("/proc", "/dev", "/sys")
    ] + [
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
    ]
    spec["linux"]["namespaces"] = [
        {"type": kind} for kind in ("pid", "network", "ipc", "uts", "mount")
    ]
    if profile is not None:
        spec["linux"]["seccomp"] = profile
    (bundle / "config.json").write_text(json.dumps(spec))
    state = tmp / "runc-state"
    return subprocess.run(
        [
            runc,
            "--root",
            str(state),
            "run",
            "--bundle",
            str(bundle),
            f"hangar-sc-{uuid.uuid4().hex}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _probe(runc: str, tmp: Path, profile: dict[str, Any] | None, caps: list[str]) -> dict[str, int]:
    result = _run_container(runc, tmp, ["python3", "-c", PROBE], profile, caps)
    assert result.returncode == 0, result.stderr
    probe: dict[str, int] = json.loads(result.stdout)
    return probe


def test_runc_enforces_the_profile(tmp_path: Path) -> None:
    runc = _runc_or_skip()
    profile = default_profile()
    EPERM = 1

    hello = _run_container(runc, tmp_path, ["python3", "-c", "print(1)"], profile)
    assert (hello.returncode, hello.stdout) == (0, "1\n"), hello.stderr

    unshare = _run_container(runc, tmp_path, ["unshare", "-U", "true"], profile)
    assert unshare.returncode != 0
    assert "Operation not permitted" in unshare.stderr

    # No capabilities, as our containers: the profile refuses a user namespace (which needs
    # none) and mount; fork (clone without namespace flags) works.
    confined = _probe(runc, tmp_path, profile, [])
    assert confined == {"unshare_user": EPERM, "mount_tmpfs": EPERM}
    # Even holding CAP_SYS_ADMIN, a container under the no-capability profile cannot mount.
    admin_confined = _probe(runc, tmp_path, profile, ["CAP_SYS_ADMIN"])
    assert admin_confined["mount_tmpfs"] == EPERM

    # The control: without seccomp the same container may mount with CAP_SYS_ADMIN (and, where
    # the kernel allows unprivileged user namespaces, unshare one): the refusals above are the
    # profile's.
    unconfined = _probe(runc, tmp_path, None, ["CAP_SYS_ADMIN"])
    assert unconfined["mount_tmpfs"] == 0
    if Path("/proc/sys/user/max_user_namespaces").read_text().strip() != "0":
        assert _probe(runc, tmp_path, None, [])["unshare_user"] == 0
