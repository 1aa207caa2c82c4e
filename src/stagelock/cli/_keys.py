"""``stagelock keys generate``: CURVE certificates for ``--keys``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CliError, add_verbosity

if TYPE_CHECKING:
    import argparse

__all__ = ["add_commands"]


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``keys`` (with its ``generate`` action)."""
    keys = subparsers.add_parser(
        "keys",
        help="CURVE keys securing the daemon's sockets (--keys)",
        description=(
            "Write a server key pair (once) and a client key pair into DIR, the "
            "client's public key authorised in DIR/authorized_clients. The daemon "
            "runs with --keys DIR; a remote client needs server.key and its "
            "*.key_secret in a directory of its own, passed as --keys."
        ),
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = actions.add_parser("generate", help="write server and client certificates")
    gen.add_argument("directory", type=Path, metavar="DIR", help="key directory")
    gen.add_argument(
        "--client",
        default="client",
        metavar="NAME",
        help="name of the client's files (default 'client'); run again with "
        "another name to authorise one more client",
    )
    add_verbosity(gen)
    gen.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from stagelock.security import SecurityError, generate_keys

    try:
        files = generate_keys(args.directory, client=args.client)
    except SecurityError as exc:
        raise CliError(str(exc)) from None
    if files.server_secret is not None:
        print(f"server key pair   {files.server_secret} (daemon only, 0600)")
        print(f"server public key {files.server_public} (copy to every client)")
    else:
        print(f"server key pair   kept ({args.directory / 'server.key_secret'})")
    print(f"client key pair   {files.client_secret} (copy to the client, 0600)")
    print(f"authorised        {files.authorized}")
    return 0
