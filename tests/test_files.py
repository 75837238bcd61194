"""Atomic writes: whole content or the old file, never a partial one, and no stray temporaries."""

import pytest
from dit_accel.files import atomic_write


def test_atomic_write_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    assert atomic_write(path, "first\n") == path
    assert path.read_text() == "first\n"
    atomic_write(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, "kept")

    with pytest.raises(TypeError):  # the write itself fails, after the temporary file was created
        atomic_write(path, 12345)
    assert path.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
