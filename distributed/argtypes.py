"""argparse types shared by the command-line entry points."""

from __future__ import annotations

import argparse


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (e.g. ``--storage-option endpoint_override=host:9000``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE; use e.g. "
                                         "endpoint_override=localhost:9000")
    return key, value
