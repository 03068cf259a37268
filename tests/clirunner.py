"""Run the `adaptune` command line in-process, as a user would, and collect what it printed."""

from __future__ import annotations

import sys

from orchestrator.cli import main


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `adaptune ARGS`."""
    monkeypatch.setattr(sys, "argv", ["adaptune", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
