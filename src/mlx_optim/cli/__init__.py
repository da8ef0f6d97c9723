"""The ``mlx-optim`` command: compare optimizers on small tasks, time their steps, verify parity.

    mlx-optim compare [--task digits] [--optimizers Adam SGD | all] [--steps N] [--out DIR]
    mlx-optim bench   [--rounds 7] [--steps 20] [--only Adam SGD] [--json FILE]
    mlx-optim verify  [--only SGD Adam StepLR] [--dtypes float32] [--modes eager]

Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A bad argument found after parsing (an unwritable ``--out``, torch missing): exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    from . import bench, compare, verify

    parser = Parser(prog="mlx-optim", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)
    for command in (compare, bench, verify):
        command.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"mlx-optim {args.command}: error: {error}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_names(given: list[str] | None, known: list[str], what: str) -> None:
    """Raise UsageError naming the first unknown name and listing the known ones."""
    for name in given or ():
        if name not in known:
            raise UsageError(f"unknown {what} {name!r}; choose from {', '.join(known)}")


def format_table(header: tuple[str, ...], rows: list[tuple], right: set[int] = frozenset()) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
