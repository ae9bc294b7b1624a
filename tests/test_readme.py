"""The README stays true where a test can tell: its configuration table lists every setting of core/config.py, its
links resolve, its test command exists, and it stays a front door (about 300 lines)."""

from __future__ import annotations

import re
from pathlib import Path

from core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_configuration_table_lists_every_setting():
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(ALIGND_[A-Z0-9_]+)`", table))
    expected = {f"ALIGND_{name.upper()}" for name in Settings.model_fields}
    assert expected - listed == set(), "settings missing from the README's table"
    assert listed - expected == set(), "the README's table lists settings that do not exist"


def test_links_resolve_and_the_test_command_exists():
    for doc in ("README.md", "docs/design.md", "docs/operations.md", "docs/benchmarks.md"):
        text = (ROOT / doc).read_text()
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not link.startswith("http"):
                assert (ROOT / doc).parent.joinpath(link).exists(), (doc, link)
    assert "scripts/test" in README and (ROOT / "scripts" / "test").is_file()
    assert len(README.splitlines()) <= 320
