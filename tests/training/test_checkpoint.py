"""Checkpoint folders (training/checkpoint.py): atomic write, sha256 verification, and a folder copied from another
deployment's checkpoint (with that deployment's manifest.json inside) written as a new checkpoint that verifies."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from training.checkpoint import MANIFEST, CheckpointError, read_manifest, verify_checkpoint, write_checkpoint


def _files(d) -> None:
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "sub").mkdir()
    (d / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)


def test_a_written_checkpoint_verifies_and_never_lists_its_manifest(tmp_path):
    path = write_checkpoint(_files, tmp_path / "v1", {"version": 1, "source": "sft"})
    manifest = verify_checkpoint(path)
    assert sorted(manifest["files"]) == ["config.json", "sub/weights.bin"]
    assert manifest["version"] == 1 and "carried_from" not in manifest
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporary folder left


def test_a_changed_or_missing_file_is_named(tmp_path):
    path = write_checkpoint(_files, tmp_path / "v1", {"version": 1})
    (path / "sub" / "weights.bin").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="sub/weights.bin has sha256"):
        verify_checkpoint(path)
    (path / "sub" / "weights.bin").unlink()
    with pytest.raises(CheckpointError, match="sub/weights.bin is missing"):
        verify_checkpoint(path)


def test_a_failed_write_leaves_nothing(tmp_path):
    def full_disk(d) -> None:
        _files(d)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_checkpoint(full_disk, tmp_path / "v1", {"version": 1})
    assert list(tmp_path.iterdir()) == []
    write_checkpoint(_files, tmp_path / "v1", {"version": 1})
    with pytest.raises(CheckpointError, match="immutable"):
        write_checkpoint(_files, tmp_path / "v1", {"version": 1})


def test_a_copied_checkpoint_keeps_the_other_manifest_as_provenance(tmp_path):
    """Deployment A's v3, copied and written again by deployment B (what `alignd bootstrap --base` does)."""
    theirs = write_checkpoint(_files, tmp_path / "a" / "v3", {"version": 3, "source": "ppo", "parent": 2})
    ours = write_checkpoint(
        lambda d: shutil.copytree(theirs, d, dirs_exist_ok=True),
        tmp_path / "b" / "v1",
        {"version": 1, "source": "base", "parent": None},
    )
    manifest = verify_checkpoint(ours)
    assert manifest["version"] == 1 and manifest["source"] == "base"
    assert MANIFEST not in manifest["files"] and sorted(manifest["files"]) == ["config.json", "sub/weights.bin"]
    carried = manifest["carried_from"]
    assert carried["version"] == 3 and carried["source"] == "ppo" and carried["parent"] == 2
    assert "files" not in carried
    assert read_manifest(theirs)["version"] == 3  # the original is untouched


def test_a_checkpoint_from_the_old_writer_that_listed_a_carried_manifest_verifies(tmp_path):
    """Writers before the fix hashed the copied manifest.json and then overwrote it: that entry can never match."""
    path = write_checkpoint(_files, tmp_path / "v1", {"version": 1})
    manifest = read_manifest(path)
    manifest["files"][MANIFEST] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert verify_checkpoint(path)["version"] == 1
    manifest["files"] = {MANIFEST: "0" * 64}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lists no files"):
        verify_checkpoint(path)
