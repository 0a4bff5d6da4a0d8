from __future__ import annotations

import pytest


@pytest.fixture
def data_cli(monkeypatch):
    """`fedprompt.cli.main` with only the `data` command registered: the data tests exercise the
    real CLI error handling without depending on the other (heavier) commands importing."""
    from fedprompt import cli

    monkeypatch.setattr(cli, "COMMANDS", ("data",))
    return cli.main
