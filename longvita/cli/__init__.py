"""The command line: ``longvita generate | train | eval niah | eval demo | info``
(``main.main``; one module per command)."""

from longvita.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
