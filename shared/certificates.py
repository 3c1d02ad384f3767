"""What project and the edge agree on about TLS certificates' names."""

from __future__ import annotations


def covers(pattern: str, hostname: str) -> bool:
    """Whether a certificate's DNS name covers `hostname` (RFC 6125 6.4.3, strict: a `*` is
    the whole left-most label, stands for exactly one label, and never for a public suffix
    of a single label such as `*.com`)."""
    pattern = pattern.lower().rstrip(".")
    if pattern == hostname:
        return True
    if not pattern.startswith("*.") or "*" in pattern[2:]:
        return False
    rest = pattern[2:]
    label, _, parent = hostname.partition(".")
    return bool(label) and parent == rest and rest.count(".") >= 1
