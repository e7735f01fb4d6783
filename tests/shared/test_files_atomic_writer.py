"""``cityedge_host.files.atomic_writer``: the target is replaced only when the block ends
well; an exception or ``abandon()`` leaves the old file and no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityedge_host.files import atomic_writer, write_atomic


def test_pieces_replace_the_target_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "a"
    write_atomic(target, b"old", 0o600)
    with atomic_writer(target, 0o644, tmp_suffix=".x.part") as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # not yet
        f.write(b"data")
    assert target.read_bytes() == b"new data"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_an_exception_or_abandon_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"half")
        raise RuntimeError("cut")
    with atomic_writer(target) as f:
        f.write(b"wrong digest")
        f.abandon()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
