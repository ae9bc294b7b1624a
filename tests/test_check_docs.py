"""scripts/check_docs, which CI runs: the repository describes the product, not how the work was organised."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_docs"
STOP, ISSUE = "st" + "op", "iss" + "ue"  # built here, so that this file passes the check it tests


def _repo(path: Path) -> Path:
    """A git work tree ignoring what the project's .gitignore ignores (the check reads what git would track)."""
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / ".gitignore").write_text(".venv/\n.alignd/\n*.egg-info/\n")
    return path


@pytest.mark.parametrize(
    "line",
    [
        f"Measured at the previous {STOP}: 1.2x.",
        f"This {STOP}'s engine is faster.",
        f"# see {ISSUE} #12 part 5",
        f"The {ISSUE}'s target, 8x, is not met.",
    ],
)
def test_a_work_log_phrase_fails_the_check(tmp_path, line):
    _repo(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(f"alignd serves a chat model.\n{line}\n")
    done = subprocess.run([str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "docs/x.md:2:" in done.stdout


def test_a_product_description_passes_and_ignored_folders_are_skipped(tmp_path):
    _repo(tmp_path)
    (tmp_path / "README.md").write_text("Ctrl-C stops everything; a cycle that dies is settled by the next one.\n")
    for folder in (".venv", ".alignd", "alignd.egg-info"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "log.txt").write_text(f"this {STOP}\n")
    assert subprocess.run([str(SCRIPT), str(tmp_path)], capture_output=True).returncode == 0


def test_outside_a_git_work_tree_the_check_fails_rather_than_passing(tmp_path):
    (tmp_path / "README.md").write_text("alignd serves a chat model.\n")
    assert subprocess.run([str(SCRIPT), str(tmp_path)], capture_output=True).returncode not in (0, 1)
