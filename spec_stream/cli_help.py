"""`--help` in plain words for every command line of the project: each option's default
follows its help as people write it ("4, 3, 2", "results/x.json"), never as a Python value."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

STATES_ITS_DEFAULT = re.compile(r"default(:| per | \d)", re.IGNORECASE)  # "(default: x)", "; default 0.7"


def plain(value) -> str:
    """A default as words: a list as "a, b, c", a path or number as itself, a bool as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ", ".join(plain(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {plain(item)}" for key, item in value.items())
    return str(value) if isinstance(value, (str, int, float, Path)) else repr(value)


def per_device(values: dict) -> str:
    """``{"cpu": 64, "cuda": 128}`` as "64 on a CPU, 128 on a GPU" (one value if both agree)."""
    if len(set(values.values())) == 1:
        return plain(next(iter(values.values())))
    names = {"cpu": "a CPU", "cuda": "a GPU"}
    return ", ".join(f"{plain(value)} on {names.get(device, device)}" for device, value in values.items())


class PlainDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" in plain words to an option whose help does not already say
    its default; switches (off unless given) and options without a default say nothing."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        silent = (default is None or default is False or default is argparse.SUPPRESS or not action.option_strings
                  or action.required or STATES_ITS_DEFAULT.search(help_text))
        if silent:
            return help_text
        return f"{help_text} (default: {plain(default).replace('%', '%%')})"
