"""A GGUF shipped in parts (split_gguf.py), on small fake part packages: joined once, verified
before it appears, a damaged part a one-line typed error with nothing left behind."""

from __future__ import annotations

import hashlib
import threading

import pytest

from tokenrecycle.errors import CorruptModelError, ModelNotFoundError
from tokenrecycle.split_gguf import SplitGGUF, assemble

PIECES = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]


@pytest.fixture
def split(tmp_path, monkeypatch) -> SplitGGUF:
    """Three importable part packages on sys.path, none of them ever imported."""
    site = tmp_path / "site"
    for n, piece in enumerate(PIECES, 1):
        (site / f"fake_part{n}" / "data").mkdir(parents=True)
        (site / f"fake_part{n}" / "__init__.py").write_text("raise ImportError('never imported')\n")
        (site / f"fake_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(piece)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(PIECES)
    parts = tuple((f"fake_part{n}", f"fake-part{n}", f"data/part{n:02d}.bin") for n in range(1, 4))
    return SplitGGUF("model.gguf", parts, len(whole), hashlib.sha256(whole).hexdigest())


def test_joined_once_in_order(split, tmp_path):
    path = assemble(split, tmp_path / "cache")
    assert path.read_bytes() == b"".join(PIECES)
    for part in split.part_paths():
        part.unlink()  # a joined file is not read or joined again
    assert assemble(split, tmp_path / "cache") == path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model.gguf"]


def test_a_damaged_part_is_a_one_line_error_and_leaves_nothing(split, tmp_path):
    split.part_paths()[1].write_bytes(bytes(999) + b"x")
    with pytest.raises(CorruptModelError, match=r"^model\.gguf: the joined parts are 1208 bytes with sha256 [0-9a-f]{12}\.\.\., expected") as error:
        assemble(split, tmp_path / "cache")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_missing_package_or_part_names_it(split, tmp_path):
    split.part_paths()[2].unlink()
    with pytest.raises(ModelNotFoundError, match="missing part .*part03.bin"):
        assemble(split, tmp_path / "cache")
    absent = SplitGGUF("x.gguf", (("no_such_part_package", "no-such-part", "data/p.bin"),), 1, "0" * 64)
    with pytest.raises(ModelNotFoundError, match="needs the package no-such-part"):
        assemble(absent, tmp_path / "cache")


def test_processes_joining_at_once_all_get_the_whole_file(split, tmp_path):
    paths, errors = [], []

    def join():
        try:
            paths.append(assemble(split, tmp_path / "cache"))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=join) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(paths)) == 1
    assert paths[0].read_bytes() == b"".join(PIECES)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model.gguf"]  # no staging file left
