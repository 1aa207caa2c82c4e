"""``stagelock init-config`` and ``stagelock install-unit``: the shipped examples.

The example configurations (``config/*.toml``) and systemd units
(``systemd/*.service``) are package data of the wheel (``stagelock/data/``); in a
source checkout they are read from the repository.
"""

from __future__ import annotations

import argparse  # noqa: TC003 - used at run time by add_commands callers
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from ._common import CliError, add_verbosity

__all__ = ["add_commands", "data_file", "example_names"]

_SHIPPED_EXEC = "/opt/stagelock/venv/bin/stagelock"
"""The ``ExecStart`` program in the shipped units, replaced by this install's."""


def _data_dir(kind: str) -> Path:
    """Return the folder of shipped ``config`` or ``systemd`` files."""
    packaged = Path(str(resources.files("stagelock"))) / "data" / kind
    if packaged.is_dir():
        return packaged
    # a source checkout (editable install): the repository's own folder
    return Path(__file__).resolve().parents[3] / kind


def example_names() -> list[str]:
    """Names of the example configurations (``simulated``, ``folder``, ...)."""
    return sorted(p.stem for p in _data_dir("config").glob("*.toml"))


def data_file(kind: str, name: str) -> Path:
    """Path of one shipped file, e.g. ``data_file("config", "folder.toml")``.

    Raises
    ------
    CliError
        When the file is not shipped (names the ones that are).
    """
    path = _data_dir(kind) / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in _data_dir(kind).glob("*")))
        raise CliError(f"no shipped {kind} file {name!r} (shipped: {known or 'none'})")
    return path


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``init-config`` and ``install-unit``."""
    init = subparsers.add_parser(
        "init-config",
        help="write an example configuration to start from",
        description="Copy a shipped example configuration; never overwrites a file.",
    )
    init.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=Path("stagelock.toml"),
        help="where to write it (default ./stagelock.toml)",
    )
    init.add_argument(
        "--example",
        default="simulated",
        help="simulated | folder | micromanager (default simulated)",
    )
    add_verbosity(init)
    init.set_defaults(func=_init_config)

    unit = subparsers.add_parser(
        "install-unit",
        help="print the systemd unit for this installation",
        description=(
            "Print the shipped systemd unit with ExecStart pointing at this "
            "installation's stagelock; redirect it to /etc/systemd/system/."
        ),
    )
    unit.add_argument(
        "--print",
        dest="print_unit",
        action="store_true",
        help="print the unit on stdout (the only mode; nothing is installed)",
    )
    unit.add_argument(
        "--template",
        action="store_true",
        help="the stagelock@.service template (one daemon per config file)",
    )
    add_verbosity(unit)
    unit.set_defaults(func=_install_unit)


def _init_config(args: argparse.Namespace) -> int:
    source = data_file("config", f"{args.example}.toml")
    target: Path = args.path
    if target.is_dir():
        target = target / "stagelock.toml"
    if target.exists():
        raise CliError(f"{target} already exists; it is not overwritten")
    if not target.resolve().parent.is_dir():
        raise CliError(f"directory {target.resolve().parent} does not exist")
    target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    print(
        f"wrote {target} (example {args.example!r}); "
        f"run: stagelock run --config {target}"
    )
    return 0


def _install_unit(args: argparse.Namespace) -> int:
    if not args.print_unit:
        raise CliError(
            "use --print and redirect it, e.g. 'stagelock install-unit --print | "
            "sudo tee /etc/systemd/system/stagelock.service'"
        )
    name = "stagelock@.service" if args.template else "stagelock.service"
    text = data_file("systemd", name).read_text(encoding="utf-8")
    here = Path(sys.executable).parent / "stagelock"
    if here.exists():
        text = text.replace(_SHIPPED_EXEC, str(here))
    sys.stdout.write(text)
    return 0
