"""Every command SPEC lists exists in `throttler`, and README's CLI section shows each."""

from __future__ import annotations

import re

import click

from cli.app import cli
from tests.support import ROOT

# SPEC, "Seeing it": the commands and the options it names.
SPEC_COMMANDS = {
    "submit": {"--input", "--file", "--wait"},
    "tasks": {"--status"},
    "show": set(),
    "cancel": {"--status", "--name", "--key", "--created-before"},
    "retry": {"--status", "--name", "--key", "--created-before"},
    "limits": set(),
    "limit": {"--rate"},
    "pause": {"--for"},
    "resume": set(),
    "nodes": set(),
    "top": {"--interval", "--count", "--once"},
}


def _cli_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Command line: `throttler`")
    return readme[start : readme.index("\n## ", start + 1)]


def test_every_spec_command_exists_with_its_options() -> None:
    assert isinstance(cli, click.Group)
    for name, options in SPEC_COMMANDS.items():
        command = cli.commands.get(name)
        assert command is not None, f"no `throttler {name}`"
        declared = {opt for param in command.params for opt in param.opts}
        assert options <= declared, f"`throttler {name}` lacks {sorted(options - declared)}"


def test_the_readme_shows_every_command_and_option() -> None:
    section = _cli_section()
    assert isinstance(cli, click.Group)
    for name, command in cli.commands.items():
        rows = re.findall(rf"^\| `throttler {name}\b.*$", section, flags=re.MULTILINE)
        assert rows, f"README's CLI table has no row for `throttler {name}`"
        shown = " ".join(rows)
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in shown, f"README does not show `throttler {name} {opt}`"
