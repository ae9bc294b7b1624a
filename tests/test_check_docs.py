"""scripts/check_docs, which CI runs: the repository describes the product, not how the work was organised."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_docs"
STOP, ISSUE = "st" + "op", "iss" + "ue"  # built here, so that this file passes the check it tests


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
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(f"alignd serves a chat model.\n{line}\n")
    done = subprocess.run([str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "docs/x.md:2:" in done.stdout


def test_a_product_description_passes_and_private_folders_are_skipped(tmp_path):
    (tmp_path / "README.md").write_text("Ctrl-C stops everything; a cycle that dies is settled by the next one.\n")
    for folder in (".git", ".venv", ".alignd"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "log.txt").write_text(f"this {STOP}\n")
    assert subprocess.run([str(SCRIPT), str(tmp_path)], capture_output=True).returncode == 0
