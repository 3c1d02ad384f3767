"""Container images as the agent reasons about them, without running anything: references
(the distribution project's grammar, as `docker pull` reads them), image configs, this
server's platform and the choice of its manifest in a multi-platform index, the mount
points an unpacked root needs, and what skopeo's errors mean for a user. images.py pulls and
unpacks with these.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
IMAGE_REFERENCE_INVALID = "IMAGE_REFERENCE_INVALID"
IMAGE_AUTH_FAILED = "IMAGE_AUTH_FAILED"
IMAGE_ARCHITECTURE = "IMAGE_ARCHITECTURE"
IMAGE_PULL_FAILED = "IMAGE_PULL_FAILED"

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# The reference grammar of the distribution project (what `docker pull` accepts).
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(
    r"^(?:(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
    r"(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_NAME_LENGTH = 255

_INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
_SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
# Directories and files a container's runtime mounts over; they must exist in the root.
MOUNT_DIRECTORIES = ("proc", "dev", "sys", "tmp", "etc")
MOUNT_FILES = ("etc/hosts", "etc/resolv.conf", "etc/hostname")
STREAM_LIMIT = 1024 * 1024
_SKOPEO_PREFIXES = (
    re.compile(r'^Error parsing image name "[^"]*": '),
    re.compile(r"^initializing source \S+: "),
    re.compile(r"^reading manifest \S+ in \S+: "),
)
_SKOPEO_MESSAGE = re.compile(r'level=(\w+) msg="((?:[^"\\]|\\.)*)"')


class ImageFailed(Exception):
    """The image cannot be run. `reason` is what the deployment shows: one of IMAGE_NOT_FOUND,
    IMAGE_REFERENCE_INVALID, IMAGE_AUTH_FAILED, IMAGE_ARCHITECTURE or IMAGE_PULL_FAILED, then
    ': ' and what the user can do about it."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.reason = f"{code}: {message}"
        super().__init__(self.reason)


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for a private registry. The password is never logged nor put on a command
    line: skopeo reads it from a 0600 file that exists only while skopeo runs."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"RegistryAuth(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about running it (its OCI config's `config` section)."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str]  # from the config's Env list ("K=V")
    working_dir: str  # "" when unset
    user: str  # as in the image ("" when unset)
    exposed_ports: tuple[int, ...]  # TCP ports from ExposedPorts ("8080/tcp")
    architecture: str
    os: str

    @classmethod
    def parse(cls, document: Any) -> ImageConfig:
        """From an image config blob (JSON already decoded); missing fields are empty."""
        top = document if isinstance(document, dict) else {}
        section = top.get("config")
        config = section if isinstance(section, dict) else {}
        env: dict[str, str] = {}
        for item in _strings(config.get("Env")):
            name, _, value = item.partition("=")
            if name:
                env[name] = value
        ports: set[int] = set()
        exposed = config.get("ExposedPorts")
        for key in exposed if isinstance(exposed, dict) else ():
            number, _, protocol = str(key).partition("/")
            if protocol.lower() in ("", "tcp") and number.isdigit() and 0 < int(number) < 65536:
                ports.add(int(number))
        return cls(
            entrypoint=tuple(_strings(config.get("Entrypoint"))),
            cmd=tuple(_strings(config.get("Cmd"))),
            env=env,
            working_dir=_string(config.get("WorkingDir")),
            user=_string(config.get("User")),
            exposed_ports=tuple(sorted(ports)),
            architecture=_string(top.get("architecture")),
            os=_string(top.get("os")),
        )


@dataclass(frozen=True)
class PulledImage:
    reference: str  # what was asked
    digest: str  # "sha256:..." of the manifest pulled (of a multi-platform index: this
    # server's platform's manifest)
    pinned: str  # the reference pinned to that digest: "registry/name@sha256:..."
    config: ImageConfig
    rootfs: Path  # the unpacked root filesystem (owned by root, not writable by others)


@dataclass(frozen=True)
class ImageReference:
    """A parsed, normalized image reference."""

    registry: str  # "docker.io", "127.0.0.1:5000", ...
    repository: str  # "library/busybox", "app", ...
    tag: str  # "" when pinned by digest
    digest: str  # "sha256:..." or ""

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"

    def pinned(self, digest: str) -> str:
        return f"{self.name}@{digest}"


def parse_reference(reference: str) -> ImageReference:
    """`reference` normalized the way `docker pull` reads it: no registry means Docker Hub
    (and a one-part name there means "library/"), no tag means "latest"; a digest wins over
    a tag. Raises ImageFailed(IMAGE_REFERENCE_INVALID) for anything else."""

    def invalid(why: str) -> ImageFailed:
        return ImageFailed(
            IMAGE_REFERENCE_INVALID,
            f"{reference!r} is not a valid image reference ({why}); "
            "write it like registry.example.com/team/app:v1 or name@sha256:<64 hex digits>",
        )

    text = reference.strip()
    if not text or len(text) > 1024 or any(c.isspace() or ord(c) < 32 for c in text):
        raise invalid("empty, too long or containing spaces")
    if "://" in text:
        raise invalid("no scheme such as docker:// is needed")
    name, at, digest = text.partition("@")
    if at and not DIGEST.match(digest):
        raise invalid("a digest is sha256: followed by 64 lowercase hex digits")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            raise invalid("a tag is up to 128 letters, digits, '_', '.' and '-'")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise invalid(f"{first!r} is not a registry host name")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    components = path.split("/")
    if not all(_COMPONENT.match(part) for part in components):
        raise invalid(
            "repository names are lowercase letters, digits and single separators "
            "('.', '_', '__' or '-') between '/'"
        )
    if len(f"{registry}/{path}") > MAX_NAME_LENGTH:
        raise invalid(f"longer than {MAX_NAME_LENGTH} characters")
    if digest:
        tag = ""
    elif not tag:
        tag = "latest"
    return ImageReference(registry, path, tag, digest)


def host_platform() -> tuple[str, str]:
    """This server's (architecture, os) as OCI images name them."""
    machine = platform.machine().lower()
    architecture = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "i386": "386",
        "i686": "386",
        "armv7l": "arm",
        "armv6l": "arm",
    }.get(machine, machine)
    return architecture, platform.system().lower()


def choose_manifest(
    manifest: Any, digest: str, ref: ImageReference, architecture: str, os_name: str
) -> str:
    """The digest of the manifest to pull: `digest` itself for a single image, or the entry of
    a multi-platform index for this server's platform (IMAGE_ARCHITECTURE when none is)."""
    if not isinstance(manifest, dict):
        raise ImageFailed(IMAGE_PULL_FAILED, f"{ref}: the registry's manifest is not an object")
    media_type = manifest.get("mediaType", "")
    if media_type in _SCHEMA1_TYPES or manifest.get("schemaVersion") == 1:
        raise ImageFailed(
            IMAGE_PULL_FAILED,
            f"{ref} uses the old Docker schema 1 manifest format, which is not supported: "
            "push it again with a current Docker, Buildah or skopeo",
        )
    if media_type not in _INDEX_TYPES and "manifests" not in manifest:
        return digest
    entries = manifest.get("manifests")
    found: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        entry_platform = entry.get("platform")
        plat = entry_platform if isinstance(entry_platform, dict) else {}
        arch, system = _string(plat.get("architecture")), _string(plat.get("os"))
        if arch == "unknown" or system == "unknown":  # build attestations, not images
            continue
        if arch == architecture and system == os_name:
            candidate = _string(entry.get("digest"))
            if DIGEST.match(candidate):
                return candidate
        if arch or system:
            found.append(
                f"{system}/{arch}" + (f"/{plat['variant']}" if plat.get("variant") else "")
            )
    offered = ", ".join(sorted(set(found))) or "no platform at all"
    raise ImageFailed(
        IMAGE_ARCHITECTURE,
        f"{ref} has no image for this server's {os_name}/{architecture} (it offers "
        f"{offered}): build and push the image for {os_name}/{architecture}",
    )


def prepare_mount_points(rootfs: Path) -> None:
    """Makes sure the directories and files a container mounts over exist in `rootfs`,
    without ever following a symbolic link of the image (one is replaced by the real thing:
    a link could point out of the root)."""
    root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in MOUNT_DIRECTORIES:
            _ensure_directory(root, name)
        # runc gives the tmpfs mounted on /tmp the mode of the directory under it; a real
        # directory now (a link was replaced), so following links cannot leave the root.
        os.chmod("tmp", 0o1777, dir_fd=root)
        for path in MOUNT_FILES:
            parent_name, _, name = path.rpartition("/")
            parent = os.open(parent_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
            try:
                _ensure_file(parent, name)
            finally:
                os.close(parent)
    finally:
        os.close(root)


def _ensure_directory(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        return
    if (st.st_mode & 0o170000) == 0o040000:  # a directory already
        return
    os.unlink(name, dir_fd=dir_fd)
    os.mkdir(name, 0o755, dir_fd=dir_fd)


def _ensure_file(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if (st.st_mode & 0o170000) == 0o100000:  # a regular file already
            return
        if (st.st_mode & 0o170000) == 0o040000:
            shutil.rmtree(f"/proc/self/fd/{dir_fd}/{name}")
        else:
            os.unlink(name, dir_fd=dir_fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    os.close(fd)


def classify(errors: list[str], ref: ImageReference, auth: RegistryAuth | None) -> ImageFailed:
    """What skopeo's error output means for the user."""
    message = last_message(errors) or "skopeo failed without saying why"
    for prefix in _SKOPEO_PREFIXES:  # they repeat the reference, whose words could mislead
        message = prefix.sub("", message)
    text = message.lower()
    if "invalid reference format" in text:
        return ImageFailed(IMAGE_REFERENCE_INVALID, f"{ref} is not a valid reference: {message}")
    if "requested access to the resource is denied" in text or "denied:" in text:
        return ImageFailed(
            IMAGE_AUTH_FAILED,
            f"{ref.registry} refused access to {ref.repository}: it does not exist, or it is "
            "private and needs credentials that may pull it",
        )
    if (
        "unauthorized" in text
        or "authentication required" in text
        or "invalid username/password" in text
        or "incorrect username or password" in text
    ):
        if auth is None:
            return ImageFailed(
                IMAGE_AUTH_FAILED,
                f"{ref.registry} needs credentials to pull {ref.repository}: "
                "give the registry's username and password (or token)",
            )
        return ImageFailed(
            IMAGE_AUTH_FAILED,
            f"{ref.registry} refused the credentials of user {auth.username!r} for "
            f"{ref.repository}: check the username and password (or token) and that this "
            "user may pull it",
        )
    if (
        "manifest unknown" in text
        or "name unknown" in text
        or "not found" in text
        or "repository name not known" in text
    ):
        what = f"digest {ref.digest}" if ref.digest else f"tag {ref.tag!r}"
        return ImageFailed(
            IMAGE_NOT_FOUND,
            f"{ref.registry} has no image {ref.repository} with {what}: check the "
            "repository's name and the tag (or digest), and that the image was pushed",
        )
    if "no image found in manifest list" in text or "no matching manifest" in text:
        return ImageFailed(
            IMAGE_ARCHITECTURE, f"{ref} has no image for this server's platform: {message}"
        )
    if "toomanyrequests" in text or "too many requests" in text:
        return ImageFailed(
            IMAGE_PULL_FAILED,
            f"{ref.registry} refused more pulls for now (rate limit): deploy again later, or "
            "give credentials with a higher limit",
        )
    if (
        "connection refused" in text
        or "no such host" in text
        or "i/o timeout" in text
        or "network is unreachable" in text
        or "no route to host" in text
        or "connection reset" in text
    ):
        return ImageFailed(
            IMAGE_PULL_FAILED,
            f"cannot reach the registry {ref.registry}: {message}; check the registry's "
            "address and that it is up, then deploy again",
        )
    if "http response to https client" in text or "x509" in text or "tls:" in text:
        return ImageFailed(
            IMAGE_PULL_FAILED,
            f"no secure (HTTPS) connection to {ref.registry}: {message}; the registry needs "
            "a valid TLS certificate (or must be listed as insecure on the servers)",
        )
    return ImageFailed(IMAGE_PULL_FAILED, f"pulling {ref} failed: {message}")


def last_message(errors: list[str]) -> str:
    """The last error skopeo or umoci wrote, without its log decorations."""
    for line in reversed(errors):
        text = readable(line).strip()
        if text:
            return text
    return ""


def readable(line: str) -> str:
    match = _SKOPEO_MESSAGE.search(line)
    if match is None:
        return line.strip().lstrip("\u2a2f\u2022").strip()  # umoci's "x" and bullet marks
    return match.group(2).replace('\\"', '"').replace("\\\\", "\\")


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with partial.open("wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
