"""What both sides' process wrappers share (server/deploy.py: the aggregator's; client/deploy.py: a
hospital's): address and TOML argument checks, and the environment of Flower's processes."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def split_address(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise InputError.at(what, f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def toml_str(value: str, what: str) -> str:
    """`value` as a TOML string in a Flower `key=value` argument (--run-config, --node-config)."""
    if any(c in value for c in '"\\\n\r\t') or any(ord(c) < 32 for c in value):
        raise InputError.at(what, f"{value!r}: quotes, backslashes and control characters are not supported here")
    return f'"{value}"'


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process' environment for a Flower process working in `flwr_home` (FLWR_HOME)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    # Neither side downloads anything: backbone and tokenizer are local files.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # (FLWR_TELEMETRY_ENABLED=0 is inherited: fedprompt/__init__.py sets it in this process.)
    return env
