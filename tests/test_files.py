"""files.py: a write that fails leaves the old file (or none) and no temporary file behind."""

from __future__ import annotations

import os

import pytest

from tokenrecycle.files import atomic_directory, atomic_write


class Crash(Exception):
    pass


def test_a_write_makes_the_folders_and_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "table.npz"
    with atomic_write(path) as file:
        file.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["table.npz"]


def test_text_mode_writes_utf8(tmp_path):
    path = tmp_path / "profile.json"
    with atomic_write(path, "w") as file:
        file.write("naïve ≥")
    assert path.read_bytes() == "naïve ≥".encode()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(Crash):
        with atomic_write(path, "w") as file:
            file.write("half of the new")
            raise Crash
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too
        with atomic_write(tmp_path / "new.bin") as file:
            file.write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_the_file_gets_the_permissions_open_would_give(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "shared.json", "w") as file:
            file.write("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "cache" / "model"
    with pytest.raises(Crash):
        with atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")
            raise Crash
    assert not target.exists() and os.listdir(tmp_path / "cache") == []
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"weights")
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path / "cache") == ["model"]
