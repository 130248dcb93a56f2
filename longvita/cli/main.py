"""The ``longvita`` command: the parser of every command and the error rule at its edge.

Each command lives in its own module (``generate``, ``train``, ``eval_niah``,
``eval_demo``, ``plan``, ``info``) with a frozen options object built from its flags by the
``checks`` layer before torch is imported. ``main`` prints the project's own errors as one
line on stderr (exit 1), once under torchrun; any other exception keeps its traceback."""

from __future__ import annotations

import argparse
import sys
import warnings

from longvita.cli import eval_demo, eval_niah, generate, info, plan, train
from longvita.cli.errors import EXIT_INPUT, EXIT_INTERRUPTED, is_user_error, one_line, rank

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error rule: one line on stderr (not the usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each flag's default (flags that default to unset say so in their help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    p = _Parser(prog="longvita", description="Long-VITA vision-language models at 128K-1M tokens", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    generate.add_parser(sub, fmt)
    train.add_parser(sub, fmt)
    e = sub.add_parser("eval", help="evaluations: needle in a haystack (visual and text), the demo tasks",
                       formatter_class=fmt)
    esub = e.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    eval_niah.add_parser(esub, fmt)
    eval_demo.add_parser(esub, fmt)
    plan.add_parser(sub, fmt)
    info.add_parser(sub, fmt)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command + (f" {args.eval_command}" if args.command == "eval" else "")

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # a user-facing warning (e.g. a video cut short): one line, like errors, once
        if rank() == 0:
            print(f"longvita {command}: warning: {str(message).splitlines()[0]}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # restores showwarning when main returns
            warnings.showwarning = one_line_warning
            return args.func(args)
    except KeyboardInterrupt:
        if rank() == 0:
            print("longvita: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if rank() == 0:  # every rank sees the same bad input; say it once
            print(f"longvita {command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
