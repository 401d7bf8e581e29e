"""Every command of ``gateway`` is documented: README.md mentions each as ``gateway <name>``.

The commands are found by walking the click group, so a new command (or subcommand of a
group, ``gateway model swap``) fails this test until the README describes it.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from gateway.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def command_names(group: click.Group, prefix: str = "") -> list[str]:
    """``run``, ``status``, ``model swap``...: every visible command and subcommand, depth first."""
    names = []
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        full = f"{prefix}{name}"
        names.append(full)
        if isinstance(command, click.Group):
            names.extend(command_names(command, prefix=f"{full} "))
    return names


COMMANDS = command_names(main)


def test_the_walk_finds_the_core_commands():
    assert {"run", "status", "quarantine"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_in_the_readme(name):
    assert README.exists(), f"{README} is missing"
    text = README.read_text(encoding="utf-8")
    pattern = r"\bgateway\s+" + r"\s+".join(map(re.escape, name.split())) + r"(?![\w-])"
    assert re.search(pattern, text), f"README.md never mentions `gateway {name}`"
