"""The commands the README and docs/ name exist: every `python -m mnist_pipeline.<module>`
is a command, every `make <target>` is a target, every relative link points at a file."""

from __future__ import annotations

import re

from mnist_pipeline.core.project import PROJECT_ROOT
from tests.test_workflow_fast import COMMANDS

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
TEXT = {page.relative_to(PROJECT_ROOT).as_posix(): page.read_text() for page in PAGES}


def named(pattern: str) -> list[str]:
    return sorted({m for text in TEXT.values() for m in re.findall(pattern, text)})


MODULES = named(r"python -m (mnist_pipeline\.\w+)")
# In code: at the start of a line or of inline code, after `&&`, or after VAR=value.
TARGETS = named(r"(?m)(?:^|`|&& |=\S+ )make ([a-z][\w-]*)")


def test_the_docs_name_commands():
    """Guards the patterns below: a page reorganised so they find nothing would pass."""
    assert {"mnist_pipeline.pipeline", "mnist_pipeline.compare"} <= set(MODULES)
    assert {"repro", "test", "lint"} <= set(TARGETS)
    assert {"docs/experiments.md", "docs/operations.md", "docs/failures.md"} <= set(TEXT)


def test_every_module_named_is_a_command():
    """Each one answers ``--help``: tests/test_workflow_fast.py runs every command's."""
    commands = {f"mnist_pipeline.{name}" for name in COMMANDS}
    assert set(MODULES) <= commands, f"not a command: {set(MODULES) - commands}"


def test_every_make_target_named_exists():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.MULTILINE))
    assert set(TARGETS) <= defined, f"not in the Makefile: {set(TARGETS) - defined}"


def test_every_relative_link_points_at_a_file():
    broken = []
    for name, text in TEXT.items():
        folder = (PROJECT_ROOT / name).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (folder / target).exists():
                broken.append(f"{name}: {target}")
    assert not broken
