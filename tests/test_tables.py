"""Hot start across runs: the recycling table kept in the cache per model and topk, loaded at
start and saved atomically after each run; a bad file is a one-line warning; `--table none`
keeps nothing; a warm table changes drafts, never outputs (float32, a tiny random Llama)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tokenrecycle import Engine, Generator
from tokenrecycle.cli import main
from tokenrecycle.tables import TableFile, table_path
from serving import model_dir  # noqa: F401
from tiny_models import one_thread  # noqa: F401

PROMPT = "Count from one to ten."
OPTIONS = ["--dtype", "float32", "--tree", "tr4", "--no-tune", "--max-new-tokens", "24"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENRECYCLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tokenrecycle.runners.native.native_module_built", lambda: True)  # no build notice
    return tmp_path / "cache"


def generate(capsys, model_dir, *options):
    code = main(["generate", "--model", model_dir, *OPTIONS, *options, PROMPT])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    return out, err


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tokenrecycle: warning:")]


def test_the_table_is_kept_per_model_and_topk_and_round_trips(capsys, model_dir, cache):
    generate(capsys, model_dir)
    (saved,) = (cache / "tables").iterdir()
    assert saved == table_path(None, model_dir, 8) and saved.name.endswith("-top8.npz")
    assert table_path(None, model_dir, 4) != saved  # another topk: another file
    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=1)
    tables = TableFile()
    assert tables.load(engine) is None
    with np.load(saved, allow_pickle=False) as data:  # plain arrays, readable without pickle
        np.testing.assert_array_equal(engine.recycling.table, data["table"])
    assert (engine.recycling.table >= 0).any()


def test_an_unchanged_table_is_not_written_again(model_dir, cache, monkeypatch):
    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=1)
    tables = TableFile()
    tables.load(engine)
    assert tables.save(engine) is None and not (cache / "tables").exists()  # empty and untouched
    engine.complete(PROMPT)
    assert tables.save(engine) is None and tables.path(engine).is_file()
    monkeypatch.setattr(engine.recycling, "save", lambda path: pytest.fail("saved an unchanged table"))
    assert tables.save(engine) is None


def test_a_failed_save_keeps_the_old_file_whole_and_is_a_warning(model_dir, cache, monkeypatch):
    engine = Engine(model_dir, dtype="float32", tree="tr4", max_slots=1)
    tables = TableFile()
    engine.complete(PROMPT)
    tables.save(engine)
    path = tables.path(engine)
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"half a table")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tokenrecycle.drafters.recycling.np.savez", disk_full)
    engine.complete("Another prompt.")
    problem = tables.save(engine)
    assert problem.startswith("cannot save the recycling table") and "No space left" in problem
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("bad", ["damaged", "another topk"])
def test_a_bad_table_file_is_one_warning_and_then_replaced(capsys, model_dir, cache, bad):
    path = table_path(None, model_dir, 8)
    path.parent.mkdir(parents=True)
    if bad == "damaged":
        path.write_bytes(b"PK\x03\x04 not a whole table")
    else:
        np.savez(path, table=np.zeros((10, 4), dtype=np.int32))
    _, err = generate(capsys, model_dir)
    (line,) = warnings(err)
    assert "starting with an empty table" in line
    _, err = generate(capsys, model_dir)  # the run replaced it with a good one
    assert warnings(err) == []


def test_table_none_keeps_no_file_and_a_path_keeps_it_there(capsys, model_dir, cache, tmp_path):
    generate(capsys, model_dir, "--table", "none")
    assert not (cache / "tables").exists()
    mine = tmp_path / "mine.npz"
    out, _ = generate(capsys, model_dir, "--table", str(mine), "--json")
    assert mine.is_file() and not (cache / "tables").exists()
    assert f'"table_file": "{mine}"' in out


def test_a_warm_table_changes_drafts_not_outputs(model_dir):
    """Greedy output from a cold table, from a table a previous run saved, and plain greedy
    decoding (transformers' generate) are the same tokens; the warm table drafts more."""
    prompts = ["Count from one to ten.", "Write a haiku about rain.", "def fizzbuzz(n):"]
    cold = Generator(model_dir, dtype="float32", tree="tr16", max_slots=1)
    reference = [cold.generate_with_transformers(p, 32).token_ids for p in prompts]
    cold_runs = []
    for prompt in prompts:
        cold.reset_table()
        cold_runs.append(cold.generate(prompt, 32))
    for prompt in prompts:  # a run before this one, on the same prompts, left its table
        cold.generate(prompt, 32)
    tables = TableFile()
    tables.save(cold.engine)
    warm = Generator(model_dir, dtype="float32", tree="tr16", max_slots=1)
    assert tables.load(warm.engine) is None
    warm_runs = [warm.generate(prompt, 32) for prompt in prompts]
    assert [r.token_ids for r in cold_runs] == reference == [r.token_ids for r in warm_runs]
    assert all(w.steps < c.steps for w, c in zip(warm_runs, cold_runs))
