"""The man pages come from the reference docs (scripts/manpage.py), render without warnings,
name every option and command the programs take, and are what scripts/setup installed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from fusestream import cli, mount

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("manpage", ROOT / "scripts" / "manpage.py")
manpage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(manpage)

PAGES = {"mount.fusestream": ROOT / "docs" / "mount.fusestream.md", "fusestream": ROOT / "docs" / "fusestream.md"}


def rendered(doc: Path, tmp_path: Path) -> str:
    page = tmp_path / "page.roff"
    page.write_text(manpage.render(doc))
    result = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                            env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": ""})
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_page_renders_without_warnings(name, tmp_path):
    text = rendered(PAGES[name], tmp_path)
    assert text.splitlines()[0].startswith(name.upper() + "(")
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION"):
        assert f"\n{heading}\n" in text


def test_mount_fusestream_page_names_every_option(tmp_path):
    text = rendered(PAGES["mount.fusestream"], tmp_path)
    for option in sorted(mount.OPTION_NAMES):
        assert option in text, option


def test_fusestream_page_names_every_command_and_flag(tmp_path):
    text = rendered(PAGES["fusestream"], tmp_path)
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        assert re.search(rf"fusestream [\w|]*\b{name}\b", text), name  # "fusestream pause|resume|..." too
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in text, f"{name} {flag}"


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_installed_page_is_the_docs(name):
    section = manpage.page_name(PAGES[name])[1]
    installed = Path("/usr/local/share/man") / f"man{section}" / f"{name}.{section}"
    if not installed.exists():
        pytest.fail(f"{installed} is missing: scripts/setup installs it")
    assert installed.read_text() == manpage.render(PAGES[name]), "run scripts/setup: the page is stale"
