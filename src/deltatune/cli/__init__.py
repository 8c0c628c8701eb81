"""The `deltatune` command line: a thin typer map from commands to library functions."""

from __future__ import annotations

from deltatune.cli.app import app


def main() -> None:
    app()
