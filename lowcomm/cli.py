"""The ``lowcomm`` command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; add one with a line in :data:`COMMANDS` (name -> module, help).
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("lowcomm.sim.cli", "simulate W workers per strategy on one machine: loss, bytes, wall-clock"),
    "train": ("lowcomm.train", "train with a recipe: standalone (a world of one) or under torchrun (replicas)"),
    "peer": ("lowcomm.peer", "join a volunteer run over ZeroMQ with a recipe; leaves cleanly on Ctrl+C"),
    "coordinator": ("lowcomm.comm.zmq.coordinator_cli", "run the membership coordinator of a ZeroMQ run"),
    "keygen": ("lowcomm.comm.zmq.security", "write a CurveZMQ key pair (NAME.key public, NAME.key_secret private)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowcomm", description="Low-communication decentralized pretraining.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except ValueError as e:
        print(f"lowcomm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
