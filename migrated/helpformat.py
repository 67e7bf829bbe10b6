"""The `--help` layout both programs share: every option shows its default.

The man pages (docs/generate.py) are rendered through this formatter too, so `--help` and
`man migratectl` cannot tell different stories.
"""

from __future__ import annotations

import argparse
from typing import Any

# Defaults that say nothing to an operator: no value (the daemon's configuration decides, and
# the help text says so), and the off state of a flag.
_SILENT_DEFAULTS: tuple[Any, ...] = (None, False, argparse.SUPPRESS)


def has_shown_default(action: argparse.Action) -> bool:
    if action.option_strings and action.nargs == 0:
        return False  # a flag: its default is "not given"
    if any(action.default is silent for silent in _SILENT_DEFAULTS):
        return False
    return bool(action.default != "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; option help gains "(default: X)" unless it names
    its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None or text is argparse.SUPPRESS:
            return text
        if "%(default)" in text or not has_shown_default(action):
            return text
        default = action.default
        shown = f"{default:#x}" if action.dest in _HEX_DEFAULTS and isinstance(default, int) else "%(default)s"
        return f"{text} (default: {shown})"


# Guest-physical addresses read better in hex, as the operator types them.
_HEX_DEFAULTS = frozenset({"load_addr"})


def parser_options() -> dict[str, Any]:
    """Keyword arguments for every ArgumentParser and sub-parser of both programs."""
    return {"formatter_class": HelpFormatter}
