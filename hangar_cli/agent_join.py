"""`hangar agent join TOKEN`: enrol this machine's agent with a one-time join token.

It makes the agent's key here, sends runtime a CSR at its enrolment address, checks the
answer against the CA the token pins, and writes the agent's TLS files (kubernetes.io/tls
layout: tls.key 0600, tls.crt, ca.crt). The agent started with HANGAR_TLS_DIR on that
directory acts as the server the token was made for (docs/tls.md, "Agent enrolment")."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DIRECTORY = "/var/lib/hangar/agent-tls"


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agent = sub.add_parser("agent", help="this machine's agent")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    join = agent_sub.add_parser("join", help="enrol this machine's agent with a join token")
    join.add_argument("token", help="from `hangar servers join-token SERVER`")
    join.add_argument(
        "--runtime",
        default=os.environ.get("HANGAR_RUNTIME_ENROLMENT_ADDR", ""),
        help="runtime's enrolment address, host:port (default: HANGAR_RUNTIME_ENROLMENT_ADDR)",
    )
    join.add_argument(
        "--dir",
        default=os.environ.get("HANGAR_TLS_DIR", DEFAULT_DIRECTORY),
        help=f"where the agent's TLS files go (default: HANGAR_TLS_DIR or {DEFAULT_DIRECTORY})",
    )
    join.add_argument("--timeout", type=float, default=30.0, help="seconds for the call")
    join.set_defaults(func=cmd_agent_join)


def cmd_agent_join(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    from services.agent.enrolment import join
    from shared.agent_certs import CertificateRefused

    if not args.runtime:
        print("hangar: --runtime (runtime's enrolment address) is required", file=sys.stderr)
        return 2
    directory = Path(args.dir)
    try:
        joined = asyncio.run(join(args.token, args.runtime, directory, call_timeout=args.timeout))
    except CertificateRefused as exc:
        print(f"hangar: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"hangar: runtime refused the join: {exc.details()}", file=sys.stderr)
        return 3 if exc.code() is grpc.StatusCode.UNAUTHENTICATED else 1
    until = f"{joined.not_after:%Y-%m-%d}"
    print(f"joined as server {joined.server_id}; certificate {joined.serial} until {until}")
    print(f"start the agent with HANGAR_TLS_DIR={directory} (it renews its certificate itself)")
    return 0
