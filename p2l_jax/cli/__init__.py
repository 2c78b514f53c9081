"""The ``p2l-jax`` command: one sub-command per module in this package.

Each sub-command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code.

Exit status: 0 success, 1 some images failed (non-finite results), 2 a one-line error
(:class:`~p2l_jax.errors.P2LError`), 130 interrupted (Ctrl-C; see
:mod:`p2l_jax.cli.interrupts`). docs/faults.md lists the fault cases and what each does.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from p2l_jax.errors import P2LError

# Sub-command modules, in the order `p2l-jax --help` lists them.
SUBCOMMANDS = ("convert", "degrade", "restore", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2l-jax",
        description="Restore images with latent diffusion priors (P2L and baselines) in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"p2l_jax.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. ``argv=None`` means this process's command line: Ctrl-C then ends
    the process at once with status 130 (:mod:`p2l_jax.cli.interrupts`); with an explicit
    ``argv`` (tests, notebooks) an interrupt returns 130 instead."""
    if argv is None:
        from p2l_jax.cli import interrupts

        named = [a for a in sys.argv[1:] if a in SUBCOMMANDS]
        interrupts.install(named[0] if named else "")
    command = "?"
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return int(args.func(args) or 0)
    except P2LError as err:
        print(f"p2l-jax {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"p2l-jax {command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
