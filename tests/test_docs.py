"""The generated documents are current, and `--help` explains every command and option.

docs/generate.py renders the configuration reference from the config schema and the man pages
from the argparse parsers; a committed file that differs from its rendering fails here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from migrated import __main__ as daemon_main
from migrated import __version__, cli
from migrated.config import schema_reference
from migrated.helpformat import HelpFormatter, has_shown_default

REPO = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generator()


@pytest.mark.parametrize("name", ["configuration.md", "man/migrated.8", "man/migratectl.8"])
def test_committed_document_is_current(name: str) -> None:
    path = REPO / "docs" / name
    expected = generate.rendered()[path]
    assert path.exists(), f"docs/{name} is missing: run python docs/generate.py"
    assert path.read_text() == expected, f"docs/{name} is stale: run python docs/generate.py"


def test_check_mode_names_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--check compares what it renders with the file: a reference edited by hand is caught."""
    copy = tmp_path / "configuration.md"
    copy.write_text(generate.render_config_reference().replace("| `300` |", "| `250` |"))
    monkeypatch.setattr(generate, "CONFIG_REFERENCE", copy)
    assert copy in generate.stale()
    copy.write_text(generate.render_config_reference())
    assert copy not in generate.stale()


def test_reference_documents_every_key_with_its_default_and_comment() -> None:
    text = generate.render_config_reference()
    refs = schema_reference()
    known = {f"{r.section}.{r.key}" for r in refs}
    _, comments = generate.read_annotations((REPO / "config" / "migrated.toml").read_text(), known)
    for ref in refs:
        dotted = f"{ref.section}.{ref.key}"
        assert f"| `{dotted}` |" in text, dotted
        assert comments.get(dotted), f"{dotted} has no comment in config/migrated.toml to document it"
        row = next(line for line in text.splitlines() if line.startswith(f"| `{dotted}` |"))
        if ref.default is not None:
            assert f"`{generate._toml(ref.default)}`" in row, row


def test_annotations_keep_commented_keys_apart_from_sentences() -> None:
    text = (
        "[peer]\n"
        "# The key file. Required when\n"
        '# auth = "psk" (here or on the command line).\n'
        'key_file = "/k"\n'
        "\n"
        "# Certificates.\n"
        '# tls_cert = "/c"\n'
        '# tls_key = "/k"\n'
    )
    _, keys = generate.read_annotations(text, {"peer.key_file", "peer.auth", "peer.tls_cert", "peer.tls_key"})
    assert keys["peer.key_file"] == ["The key file. Required when", 'auth = "psk" (here or on the command line).']
    assert "peer.auth" not in keys
    assert keys["peer.tls_cert"] == keys["peer.tls_key"] == ["Certificates."]


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


@pytest.mark.parametrize("build", [cli.build_parser, daemon_main.build_parser], ids=["migratectl", "migrated"])
def test_every_option_has_help_and_says_its_default(build: object) -> None:
    assert callable(build)
    top = build()
    checked = 0
    for parser in _parsers(top):
        # The man pages render through HelpFormatter: a parser with another would show the
        # operator a different text in --help than in man.
        assert parser.formatter_class is HelpFormatter, parser.prog
        formatter = parser.formatter_class(prog=parser.prog)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            text = formatter._expand_help(action)
            if has_shown_default(action):
                assert "default" in text, f"{where}: {text!r} does not show its default"
            elif action.option_strings and action.nargs != 0 and not action.required:
                assert "default" in text or "required" in text, f"{where}: {text!r} says nothing of its default"
            checked += 1
    assert checked >= 5, "hardly any options found: the parser walk is broken"


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100"),
        timeout=60,
    )


def test_top_level_help_lists_every_command_and_vm_subcommand() -> None:
    result = _run("migrated.cli", "--help")
    assert result.returncode == 0, result.stderr
    top = cli.build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    vm = next(a for a in commands.choices["vm"]._actions if isinstance(a, argparse._SubParsersAction))
    assert len(vm.choices) >= 9
    for name in commands.choices:
        assert f"\n    {name} " in result.stdout, f"{name} missing from:\n{result.stdout}"
    vm_line = " ".join(result.stdout.split()).split(" vm ", 1)[1]
    for name in vm.choices:
        assert name in vm_line.split(" migrate ")[0], f"vm {name} missing from:\n{result.stdout}"


@pytest.mark.parametrize("module,prog", [("migrated.cli", "migratectl"), ("migrated", "migrated")])
def test_version(module: str, prog: str) -> None:
    result = _run(module, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{prog} {__version__}"


def test_generator_check_mode_passes_on_the_committed_tree() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "generate.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
