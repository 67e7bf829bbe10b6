"""Render the generated documents: the configuration reference and the two man pages.

    python docs/generate.py           write docs/configuration.md, docs/man/migrated.8, migratectl.8
    python docs/generate.py --check   exit 1 and name every file that differs from what it renders

Sources: the schema in migrated/config.py (keys, defaults, what is allowed, reload, overrides),
the comments of config/migrated.toml (what each key is for), and the argparse parsers of both
programs, rendered through the formatter `--help` uses. tests/test_docs.py fails when a
committed file is stale. The output depends on nothing but those sources: no date, no terminal
width.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from migrated import __version__  # noqa: E402
from migrated import __main__ as daemon_main  # noqa: E402
from migrated import cli  # noqa: E402
from migrated.config import KeyReference, schema_reference  # noqa: E402
from migrated.helpformat import HelpFormatter  # noqa: E402

ANNOTATED_CONFIG = REPO / "config" / "migrated.toml"
CONFIG_REFERENCE = REPO / "docs" / "configuration.md"
MAN_DIR = REPO / "docs" / "man"
WIDTH = 78  # of usage lines in the man pages; fixed, so the output is the same on every terminal


# ---------------------------------------------------------------------------------------------
# The configuration reference


def read_annotations(text: str, known: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(section -> its introduction, "section.key" -> the comment above the key) from the file.

    A comment block belongs to the key line that follows it. Keys shown commented out
    (`# tls_cert = ...`, names from `known` only) are key lines too, and consecutive ones share
    the block above the first. A block that a blank line ends, with no key after it, right
    under a [section] header, introduces that section. Indentation inside comments is kept.
    """
    sections: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    section = ""
    block: list[str] = []
    used = False  # the block already belongs to a key: the next comment line starts a new one
    under_header = False
    for raw in text.splitlines():
        line = raw.strip()
        header = re.fullmatch(r"\[([A-Za-z_]+)\]", line)
        if header:
            section, block, used, under_header = header.group(1), [], False, True
            continue
        if not line:
            if under_header and block and not used:
                sections[section] = block
            block, used, under_header = [], False, False
            continue
        key = re.match(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s", line)
        if key and (not line.startswith("#") or _commented_key(line, f"{section}.{key.group(1)}", known)):
            keys[f"{section}.{key.group(1)}"] = block
            used, under_header = True, False
            continue
        if line.startswith("#"):
            if used:
                block, used = [], False
            body = line[1:]
            block.append(body[1:] if body.startswith(" ") else body)
    return sections, keys


def _commented_key(line: str, dotted: str, known: set[str]) -> bool:
    """`# tls_cert = "/etc/..."` is a key shown commented out; `# auth = "psk" (here or ...`,
    a sentence that happens to start like one, is not valid TOML."""
    if dotted not in known:
        return False
    try:
        tomllib.loads(line[1:])
    except tomllib.TOMLDecodeError:
        return False
    return True


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _markdown(lines: list[str]) -> str:
    """A comment block as Markdown. Unindented lines are prose; indented runs are either a list
    (`  "psk"  - what it means`, continued by deeper lines) or a command, kept as a code block."""
    out: list[str] = []
    prose: list[str] = []
    run: list[str] = []

    def flush_prose() -> None:
        if prose:
            out.append(" ".join(prose))
            prose.clear()

    def flush_run() -> None:
        if not run:
            return
        items = [line for line in run if _LIST_ITEM.match(line)]
        if items and _LIST_ITEM.match(run[0]):
            entries: list[str] = []
            for line in run:
                item = _LIST_ITEM.match(line)
                if item:
                    entries.append(f"- `{item.group(1)}`: {item.group(2).strip()}")
                else:
                    entries[-1] += " " + line.strip()
            out.append("\n".join(entries))
        else:
            out.append("```sh\n" + "\n".join(line.strip() for line in run) + "\n```")
        run.clear()

    for line in lines:
        if line.startswith("  "):
            flush_prose()
            run.append(line)
        else:
            flush_run()
            prose.append(line.strip())
    flush_prose()
    flush_run()
    return "\n\n".join(out)


_LIST_ITEM = re.compile(r'^\s+("[^"]+"|[a-z-]+)\s+-\s(.*)$')


def render_config_reference() -> str:
    refs = schema_reference()
    known = {f"{ref.section}.{ref.key}" for ref in refs}
    sections, comments = read_annotations(ANNOTATED_CONFIG.read_text(), known)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/generate.py from migrated/config.py (the schema) and",
        "     config/migrated.toml (the comments). Do not edit: tests/test_docs.py fails when stale. -->",
        "",
        "`migrated --config FILE` reads one TOML file; `config/migrated.toml` is the annotated default,",
        "installed as `/etc/migrated/migrated.toml`. Every key is optional and unknown keys are errors.",
        "*Reload* says whether `systemctl reload migrated` (SIGHUP) applies a new value to what starts",
        "afterwards, or whether the key keeps its old value until the daemon restarts.",
        "",
        "| key | default | allowed | reload | command line |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ref in refs:
        out.append(
            f"| `{ref.section}.{ref.key}` | {_default_cell(ref)} | {_cell(ref.allowed)} | "
            f"{'yes' if ref.reloadable else 'restart'} | {f'`{ref.override}`' if ref.override else ''} |"
        )
    current = ""
    for ref in refs:
        if ref.section != current:
            current = ref.section
            out += ["", f"## [{current}]", ""]
            intro = sections.get(current)
            if intro:
                out += [_markdown(intro), ""]
        out += [f"### `{ref.key}`", ""]
        out += _key_facts(ref)
        comment = comments.get(f"{ref.section}.{ref.key}")
        if comment:
            out += ["", _markdown(comment)]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_cell(ref: KeyReference) -> str:
    return "none" if ref.default is None else f"`{_toml(ref.default)}`"


def _key_facts(ref: KeyReference) -> list[str]:
    facts = [
        f"- default: {_default_cell(ref)}",
        f"- allowed: {ref.allowed}",
        f"- reload: {'yes' if ref.reloadable else 'no, needs a restart'}",
    ]
    if ref.override:
        facts.append(f"- command line: `{ref.override}` (wins over the file)")
    return facts


# ---------------------------------------------------------------------------------------------
# Man pages


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens (so they stay ASCII minus signs), and a
    leading dot or quote, which would start a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    # The formatter `--help` uses, at a fixed width.
    return HelpFormatter(prog=parser.prog, width=WIDTH)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = _formatter(parser)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    # The formatter's own expansion: the same "(default: X)" and %(choices)s as --help shows.
    return " ".join(_formatter(parser)._expand_help(action).split())


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = _formatter(parser)
    return formatter._format_action_invocation(action)


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, child in action.choices.items():
                yield child, helps.get(name, "")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        out += [".TP", f"\\fB{_roff(_invocation(parser, action))}\\fR", _roff(_help(parser, action))]
    return out


def _command_sections(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for child, text in _subcommands(parser):
        nested = list(_subcommands(child))
        if nested:
            out += _command_sections(child)
            continue
        out += [f".SS {_roff(child.prog)}", _roff(text[0].upper() + text[1:] + ".") if text else ""]
        out += [".PP", ".nf", _roff(_usage(child)), ".fi"]
        out += _options(child)
    return out


def _description(text: str | None) -> list[str]:
    if not text:
        return []
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    out: list[str] = []
    for paragraph in paragraphs:
        out += [".PP", _roff(paragraph)]
    return out


def render_man_page(parser: argparse.ArgumentParser, summary: str, see_also: str) -> str:
    name = parser.prog
    out = [
        f'.\\" Generated by docs/generate.py from the argparse parser of {name}. Do not edit:',
        '.\\" tests/test_docs.py fails when this page is stale.',
        f'.TH {name.upper()} 8 "" "migrated {__version__}" "System Administration"',
        ".SH NAME",
        f"{name} \\- {_roff(summary)}",
        ".SH SYNOPSIS",
        ".nf",
        _roff(_usage(parser)),
        ".fi",
        ".SH DESCRIPTION",
        *_description(parser.description),
        ".SH OPTIONS",
        *_options(parser),
    ]
    commands = _command_sections(parser)
    if commands:
        out += [".SH COMMANDS", *commands]
    if parser.epilog:
        out += [".SH EXIT STATUS", *_description(parser.epilog)]
    out += [
        ".SH FILES",
        ".TP",
        "\\fI/etc/migrated/migrated.toml\\fR",
        "The configuration (docs/configuration.md in the source tree).",
        ".TP",
        "\\fI/run/migrated/control.sock\\fR",
        "The control socket, by default.",
        ".SH SEE ALSO",
        _roff(see_also),
    ]
    return "\n".join(line for line in out if line != "") + "\n"


def rendered() -> dict[Path, str]:
    """Every generated file and what it should hold."""
    return {
        CONFIG_REFERENCE: render_config_reference(),
        MAN_DIR / "migrated.8": render_man_page(
            daemon_main.build_parser(),
            "the KVM live-migration daemon",
            "migratectl(8); docs/operations.md and docs/design.md in the source tree",
        ),
        MAN_DIR / "migratectl.8": render_man_page(
            cli.build_parser(),
            "drive migrated: VMs, live migrations, host capabilities",
            "migrated(8); docs/operations.md in the source tree",
        ),
    }


def stale() -> list[Path]:
    return [path for path, text in rendered().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        old = stale()
        for path in old:
            print(f"{path.relative_to(REPO)} is stale: run python docs/generate.py", file=sys.stderr)
        return 1 if old else 0
    if argv:
        print("usage: python docs/generate.py [--check]", file=sys.stderr)
        return 2
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
