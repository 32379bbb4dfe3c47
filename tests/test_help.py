"""`--help` of every entry point: every option explains itself and says its default in
plain words (never a Python dict, None or False)."""
import argparse
import importlib.util
import re
from pathlib import Path

import pytest

import dataset_tps
from spec_stream import finetune

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
PYTHON_VALUE = re.compile(r"\{['\"]|\(default: (None|False|True)\)|\[['\"]")  # a dict, list or literal repr


def script_parser(path: Path) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def entry_points() -> dict:
    parsers = {"dataset_tps.py": dataset_tps.build_parser, "python -m spec_stream.finetune": finetune.build_parser}
    parsers.update({f"scripts/{path.name}": (lambda path=path: script_parser(path)) for path in SCRIPTS})
    return parsers


def test_every_script_is_checked():
    assert len(SCRIPTS) >= 4 and all(path.read_text().count("def build_parser") == 1 for path in SCRIPTS
                                     if "argparse" in path.read_text())


@pytest.mark.parametrize("name", list(entry_points()))
def test_every_option_has_help_and_a_plain_default(name):
    parser = entry_points()[name]()
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"
        shown = formatter._get_help_string(action) % {"default": action.default, "prog": parser.prog}
        assert not PYTHON_VALUE.search(shown), f"{name}: {action.option_strings}: {shown}"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in shown, f"{name}: {action.option_strings} does not say its default: {shown}"
    assert not PYTHON_VALUE.search(parser.format_help()), parser.format_help()
