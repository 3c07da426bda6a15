"""`tokenrecycle bench` end to end on tiny random models with SmolLM2's tokenizer, and its pieces."""

from __future__ import annotations

import gzip
import json
import os
import signal
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


from tokenrecycle.bench import default_questions, per_category, read_questions
from tokenrecycle.bench.methods import Method, MethodFactory, MethodRun
from tokenrecycle.bench.metrics import OVERALL, MethodStats, by_temperature, first_difference, profile_frontier, summarize, tree_checks
from tokenrecycle.bench.plots import plot_tree_checks
from tokenrecycle.bench.questions import BenchInputError
from tokenrecycle.bench.results import BenchRun, MethodInfo, Record, Section, load_results, portable_path
from tokenrecycle.cli import main
from tokenrecycle.errors import CorruptResultsError

from tiny_models import one_thread, save_tiny_pair  # noqa: F401  (tiny models: one thread is fastest)

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short poem about the sea.", "Now make it rhyme."]},
    {"question_id": 2, "category": "writing", "turns": ["Describe a zebra in one sentence."]},
    {"question_id": 3, "category": "coding", "turns": ["Write a Python function that adds two numbers."]},
    {"question_id": 4, "category": "coding", "turns": ["def fib(n):\n    # complete this function"]},
]
OUTPUTS = ("results.json", "report.md", "speedup_float32.png", "accepted_float32.png", "cost_float32.png")
COMMITTED = sorted(path.parent for path in (Path(__file__).parents[1] / "docs" / "bench").glob("*/results.json.gz"))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny target and a tiny draft that share SmolLM2's tokenizer (and its chat template)."""
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"), target_layers=2, seeds=(0, 1))


@pytest.fixture(scope="module")
def question_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "question.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    return path


@dataclass
class FailingMethod(Method):
    """Fails on prompts that mention `word`, succeeds (one token) elsewhere."""

    word: str = "zebra"
    tokenizer: object = None
    exception: type = RuntimeError

    def run(self, prompt_ids: np.ndarray, max_new_tokens: int) -> MethodRun:
        if self.word in self.tokenizer.decode(prompt_ids.tolist()):
            raise self.exception(f"boom on the {self.word}")
        return MethodRun([0], 0.01, [1])


def install_failing(monkeypatch, word: str, exception=RuntimeError):
    """The tr-hf slot builds a FailingMethod instead."""

    def build(factory, variant, tree):
        return FailingMethod(
            variant.name, variant.baseline("ar"), "fails on purpose", sampling=variant.sampling,
            word=word, tokenizer=factory.loaded.tokenizer, exception=exception,
        )  # fmt: skip

    monkeypatch.setattr(MethodFactory, "_tr_hf", build)


def bench_args(tiny_pair, question_file, out, methods="ar,plain,tr,tr-cold,hf-pld,hf-assisted,tr-hf"):
    target, draft = tiny_pair
    return [
        "bench", "--model", target, "--draft-model", draft, "--questions", str(question_file),
        "--dtype", "float32", "--max-new-tokens", "12", "--methods", methods, "--out", str(out), "--warm-up", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bench_run(tiny_pair, question_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as monkeypatch:
        install_failing(monkeypatch, "zebra")
        assert main(bench_args(tiny_pair, question_file, out)) == 0
    return out, load_results(out)


def test_every_output_is_written(bench_run):
    out, results = bench_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for heading in ("Speedup by category", "Details", "MAT by category", "Tokens/s by category", "Accepted tokens", "Runner cost", "Methods", "Failures"):
        assert heading in report
    for method in ("ar", "plain", "tr", "tr-cold", "hf-pld", "hf-assisted", "tr-hf"):
        assert f"| {method} |" in report
    assert results.status == "complete"
    assert results.machine.cpu and results.machine.versions["torch"]


def test_a_failing_method_is_recorded_and_the_run_goes_on(bench_run):
    _, results = bench_run
    records = results.sections[0].records
    failing = [r for r in records if r.method == "tr-hf"]
    assert [r.status for r in failing] == ["ok", "ok", "failed", "ok", "ok"]
    assert "boom on the zebra" in failing[2].error
    assert all(r.status == "ok" for r in records if r.method != "tr-hf")


def test_second_turn_follows_the_first_answer(bench_run):
    _, results = bench_run
    records = [r for r in results.sections[0].records if r.question_id == "1" and r.method == "ar"]
    assert [r.turn for r in records] == [0, 1]
    assert records[1].prompt_tokens > records[0].prompt_tokens


def test_numbers_are_consistent(bench_run):
    _, results = bench_run
    section = results.sections[0]
    stats = summarize(section)
    ok = [r for r in section.records if r.status == "ok"]
    for record in ok:  # every method accounts for each new token in exactly one forward pass
        assert sum(record.accepted_lengths) == record.new_tokens == len(record.token_ids)
        assert record.tokens_per_s == pytest.approx(record.new_tokens / record.seconds[0])
    for method, info in section.methods.items():
        mine = [r for r in ok if r.method == method]
        median = statistics.median(r.tokens_per_s for r in mine)
        assert stats[method][OVERALL].tokens_per_s == pytest.approx(median)
        mat = sum(r.new_tokens for r in mine) / sum(len(r.accepted_lengths) for r in mine)
        assert stats[method][OVERALL].mat == pytest.approx(mat)
        baseline = info.baseline or method
        theirs = statistics.median(r.tokens_per_s for r in ok if r.method == baseline)
        assert stats[method][OVERALL].speedup == pytest.approx(median / theirs)
    report = (bench_run[0] / "report.md").read_text()
    tr = stats["tr"][OVERALL]
    assert f"| tr | plain | {tr.tokens_per_s:.1f} | {tr.speedup:.2f}x |" in report


def test_tokenrecycle_methods_are_lossless_in_float32(bench_run):
    _, results = bench_run
    section = results.sections[0]
    stats = summarize(section)
    for method in ("plain", "tr", "tr-cold"):
        assert stats[method][OVERALL].identical == 1.0, method
    drafting = [r for r in section.records if r.method == "tr"]
    assert all(len(r.accepted_lengths) <= r.new_tokens for r in drafting)


def test_render_reproduces_the_report(bench_run, tmp_path):
    out, _ = bench_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    assert main(["bench", "--render", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    for name in OUTPUTS:
        assert (copy / name).is_file()


def test_ctrl_c_leaves_a_valid_partial_result_and_resume_completes_it(tiny_pair, question_file, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        install_failing(patch, "zebra", KeyboardInterrupt)
        assert main(bench_args(tiny_pair, question_file, tmp_path, methods="ar,tr-hf")) == 130
    results = load_results(tmp_path)
    assert results.status == "interrupted"
    assert {r.question_id for r in results.sections[0].records} == {"1"}  # question 2 was cut short
    assert "Partial run (interrupted)" in (tmp_path / "report.md").read_text()
    first = results.sections[0].records
    install_failing(monkeypatch, "nothing-matches")
    assert main(bench_args(tiny_pair, question_file, tmp_path, methods="ar,tr-hf") + ["--resume"]) == 0
    resumed = load_results(tmp_path)
    records = resumed.sections[0].records
    assert resumed.status == "complete" and len(resumed.resumed) == 1 and len(resumed.sections) == 1
    assert records[: len(first)] == first  # kept, not measured again
    assert [r.question_id for r in records].count("1") == len(first) and {r.question_id for r in records} == {"1", "2", "3", "4"}
    assert main(bench_args(tiny_pair, question_file, tmp_path, methods="ar,plain") + ["--resume"]) == 2  # other settings


def terminate(message: str) -> Exception:
    """Stop this process as `kill` would; the bench's handler raises before this returns."""
    os.kill(os.getpid(), signal.SIGTERM)
    return RuntimeError(message)


def test_sigterm_saves_a_partial_result_like_ctrl_c(tiny_pair, question_file, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    install_failing(monkeypatch, "zebra", terminate)
    assert main(bench_args(tiny_pair, question_file, tmp_path, methods="ar,tr-hf")) == 130
    results = load_results(tmp_path)
    assert results.status == "interrupted" and {r.question_id for r in results.sections[0].records} == {"1"}
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the bench's only while it runs


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "ar,warp-drive"], "unknown method 'warp-drive'"),
        (["--methods", "ar,llamacpp"], "method llamacpp:"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--per-category", "0"], "--per-category must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_pair, question_file, tmp_path, capsys, extra, message):
    assert main(bench_args(tiny_pair, question_file, tmp_path) + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "results.json").exists()  # nothing half-written


def test_unreadable_question_files(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["bench", "--questions", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read question file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["hi"]}\n{"question_id": 2, "turns": ["no category"]}\n')
    with pytest.raises(BenchInputError, match=r"bad.jsonl:2: .*missing field 'category'"):
        read_questions(bad)
    bad.write_text("not json\n")
    with pytest.raises(BenchInputError, match=r"bad.jsonl:1: not a Spec-Bench question"):
        read_questions(bad)
    assert not (tmp_path / "out" / "results.json").exists()


def test_default_questions_come_from_installed_packages():
    questions = default_questions()
    categories = {q.category for q in questions}
    assert {"writing", "coding", "humaneval"} <= categories
    assert sum(q.category != "humaneval" for q in questions) == 80
    assert all(len(q.turns) == 2 for q in questions if q.category != "humaneval")
    chosen = per_category(questions, 2)
    assert len(chosen) == 2 * len(categories)
    assert [q.question_id for q in chosen[:2]] == [q.question_id for q in questions[:2]]


def test_transformers_methods_count_the_tokens_each_forward_pass_of_the_target_decides(tiny_pair):
    """`ar` decides one token a pass; prompt lookup its accepted candidates plus one (the prefill
    verifies candidates too). The target is made to predict from the last token alone (its layers
    add nothing to the residual), so its greedy output is a chain t -> f(t), the prompt holds that
    chain, and every candidate prompt lookup copies from it is right: 5 candidates + 1 a pass."""
    import torch

    factory = MethodFactory(tiny_pair[0], "float32", pld_tokens=5, pld_ngram=2)
    model = factory.loaded.model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        chain = factory.build("ar").run(np.array([42]), 30)
        assert chain.accepted_lengths == [1] * 30 and len(calls) == 30
        calls.clear()
        lookup = factory.build("hf-pld").run(np.array([42, *chain.token_ids, 42, chain.token_ids[0]]), 24)
    finally:
        hook.remove()
    assert lookup.token_ids == chain.token_ids[1:25]
    assert lookup.accepted_lengths == [6, 6, 6, 6] and len(calls) == 4


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def section_of(methods: dict[str, MethodInfo], records: list[Record], profile: dict | None = None) -> Section:
    """A section with these methods and records; its setup is of no account to the metrics."""
    return Section("float32", "asked for float32", "FastRunner", None, "tr4", None, 0, profile, methods, records=records)


def method_info(base: str = "tr", baseline: str | None = "plain", settings: dict | None = None) -> MethodInfo:
    return MethodInfo(base, baseline, "a method", settings or {}, temperature=0.0, memory_added_bytes=0, drafter_bytes=0)


def ok_record(method: str, accepted_lengths: list[int], category="writing", question_id="1", tokens_per_s=0.0) -> Record:
    new_tokens = sum(accepted_lengths)
    return Record(
        question_id, category, 0, 10, method, "ok", seconds=[new_tokens / tokens_per_s if tokens_per_s else 1.0],
        new_tokens=new_tokens, tokens_per_s=tokens_per_s, accepted_lengths=accepted_lengths, token_ids=[1] * new_tokens,
    )  # fmt: skip


def profiled_section(methods: dict[str, list]) -> Section:
    """A section whose profile knows rates for rank paths 0, 0.0 and 1 and a cost curve; one
    record per method accepting 2 then 1 tokens after the prefill."""
    profile = {
        "acceptance": {"0": {"rate": 0.5, "visits": 20}, "0.0": {"rate": 0.5, "visits": 10}, "1": {"rate": 0.2, "visits": 10}},
        "cost_ms": {"256": {"1": 10.0, "2": 10.0, "4": 20.0}, "1024": {"1": 10.0, "2": 10.0, "4": 20.0}},
    }
    return section_of(
        {name: method_info(settings={"paths": paths}) for name, paths in methods.items()},
        [ok_record(name, [1, 2, 1]) for name in methods],
        profile,
    )  # fmt: skip


def test_tree_checks_predict_from_the_profile_and_flag_uncalibrated_nodes(tmp_path):
    section = profiled_section({"tr@chain": [[0], [0, 0]], "tr@wide": [[0], [5], [5, 0]], "tr@chain~t0.7": [[0], [0, 0]]})
    section.methods["tr@chain~t0.7"].temperature = 0.7  # greedy rates do not predict sampling: left out
    stats = {name: {OVERALL: MethodStats(tokens_per_s=40.0)} for name in section.methods}
    chain, wide = tree_checks(section, stats)
    assert (chain.nodes, chain.depth, chain.calibrated) == (2, 2, True)
    assert chain.predicted_tokens == pytest.approx(1 + 0.5 + 0.25)
    assert chain.predicted_tokens_per_s == pytest.approx(1000 * 1.75 / 15.0)  # 3 tokens: between 2 and 4
    assert chain.measured_tokens == pytest.approx(1.5) and chain.measured_tokens_per_s == 40.0
    # rank 5 was never calibrated: it and its child count as never accepted, a lower bound
    assert wide.calibrated is False and wide.predicted_tokens == pytest.approx(1.5)
    plot = plot_tree_checks([chain, wide], profile_frontier(section), "float32", tmp_path / "trees.png")
    assert plot.stat().st_size > 0


def test_profile_frontier_is_the_best_tree_of_every_size():
    frontier = profile_frontier(profiled_section({}), max_nodes=3)
    assert [plan.num_nodes for plan in frontier] == [0, 1, 2, 3]
    assert [plan.paths[-1] for plan in frontier[1:]] == [(0,), (0, 0), (1,)]  # most likely node first
    assert [plan.expected_tokens for plan in frontier] == pytest.approx([1.0, 1.5, 1.75, 1.95])
    assert profile_frontier(section_of({}, [], profile=None)) == []


def test_sampling_rows_and_draft_model_methods(tiny_pair, question_file, tmp_path):
    target, _ = tiny_pair
    args = ["bench", "--model", target, "--questions", str(question_file), "--dtype", "float32", "--max-new-tokens", "10",
            "--methods", "ar,plain,tr,sps,rsd,rsd-sbs,lookup,retrieval,merged,auto", "--temperatures", "0,0.7", "--draft", "early-exit:1", "--warm-up", "1",
            "--no-cost-curve", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    section = load_results(tmp_path).sections[0]
    assert section.methods["tr~t0.7"].baseline == "plain~t0.7"
    assert section.methods["sps"].baseline == "plain" and section.methods["rsd~t0.7"].temperature == 0.7
    assert all(r.status == "ok" for r in section.records), [r.error for r in section.records if r.error]
    for record in section.records:
        assert sum(record.accepted_lengths) == record.new_tokens
    stats = summarize(section)
    for method in ("sps", "rsd", "rsd-sbs", "lookup", "retrieval", "merged", "auto"):
        assert stats[method][OVERALL].identical == 1.0, method  # greedy: exact
    assert stats["tr~t0.7"][OVERALL].identical != stats["tr~t0.7"][OVERALL].identical  # NaN: samples differ by chance
    report = (tmp_path / "report.md").read_text()
    assert "Greedy decoding and sampling at temperature 0.7" in report and "| rsd~t0.7 |" in report
    auto = [r for r in section.records if r.method == "auto"][-1].details
    assert set(auto["credit"]) == {"tr", "lookup", "retrieval"} and sum(auto["plays"].values()) > 0
    assert "credit: tr " in report
    runs = by_temperature(section, stats)
    assert set(runs) == {"ar", "plain", "tr", "sps", "rsd", "rsd-sbs", "lookup", "retrieval", "merged", "auto"}
    assert runs["tr"][0.7] is stats["tr~t0.7"][OVERALL] and runs["tr"][0.0] is stats["tr"][OVERALL]
    kept = f"{stats['tr~t0.7'][OVERALL].speedup / stats['tr'][OVERALL].speedup:.0%}"
    sampled_part = report.split("### Greedy and sampled")[1]
    tr_row = next(line for line in sampled_part.splitlines() if line.startswith("| tr |"))
    assert tr_row.endswith(f"| {kept} |")  # greedy speedup, MAT, sampled speedup, MAT, kept


def drafters_section(speeds: dict[str, list[float]], categories=("writing", "rag")) -> Section:
    """A finished section where each method ran the same turns at the given tokens/s."""
    methods = {name: method_info(name, None if name == "plain" else "plain") for name in speeds}
    records = [
        ok_record(name, [1] * 10, categories[i % len(categories)], str(i), float(speed))
        for name, values in speeds.items() for i, speed in enumerate(values)
    ]  # fmt: skip
    return section_of(methods, records)


def test_auto_is_paired_per_turn_with_the_best_single_drafter():
    from tokenrecycle.bench.metrics import against_best_rival

    rng = np.random.default_rng(0)
    plain = rng.uniform(20, 60, size=40)  # prompts differ far more than methods do on one prompt
    section = drafters_section({"plain": plain, "tr": 1.4 * plain, "lookup": 1.2 * plain, "auto": 1.5 * plain * rng.uniform(0.98, 1.02, 40)})
    found = {c.category: c for c in against_best_rival(section, summarize(section))}
    assert set(found) == {"writing", "rag", OVERALL}
    for comparison in found.values():
        assert comparison.rival == "tr" and comparison.turns == (40 if comparison.category == OVERALL else 20)
        assert comparison.low <= comparison.ratio <= comparison.high and abs(comparison.ratio - 1.5 / 1.4) < 0.02
        assert comparison.verdict == "faster"
    level = np.tile([0.8, 0.8, 1.25, 1.25], 10)  # as often 20% slower as 25% faster, in each category
    noisy = drafters_section({"plain": plain, "tr": 1.4 * plain, "auto": 1.4 * plain * level})
    assert {c.verdict for c in against_best_rival(noisy, summarize(noisy))} == {"within noise"}
    assert against_best_rival(drafters_section({"plain": plain, "tr": plain}), summarize(section)) == []  # no auto


def absolute_paths(value) -> list[str]:
    """The strings in JSON data that are, or hold, an absolute path of the machine a run was on."""
    if isinstance(value, dict):
        return absolute_paths(list(value)) + absolute_paths(list(value.values()))
    if isinstance(value, list):
        return [path for item in value for path in absolute_paths(item)]
    machine_roots = ("/work/", "/root/", "/home/", "/tmp/", "/Users/")
    found = isinstance(value, str) and (os.path.isabs(value) or any(root in value for root in machine_roots))
    return [value] if found else []


def test_results_survive_a_json_round_trip(bench_run):
    out, results = bench_run
    assert BenchRun.from_json(json.loads(json.dumps(results.to_json()))) == results
    section = results.sections[0]
    assert any(not r.ok for r in section.records) and section.methods["tr-hf"].baseline == "ar"
    assert section.cost_curves and all(isinstance(n, int) for curve in section.cost_curves.values() for n in curve)
    assert results.settings.dtypes == ("float32",) and results.settings.temperatures == (0.0,)


def test_results_name_files_without_the_machines_paths(bench_run, tiny_pair):
    out, results = bench_run
    target, draft = tiny_pair
    assert results.settings.model == Path(target).name and results.settings.draft_model == Path(draft).name
    assert results.settings.question_source == "question.jsonl" and results.settings.out == out.name
    assert absolute_paths(json.loads((out / "results.json").read_text())) == []


def test_portable_path_is_relative_to_the_project_or_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_path("smollm2") == "smollm2"
    assert portable_path("../shared/question.jsonl") == "../shared/question.jsonl"  # relative: as typed
    assert portable_path(tmp_path / "bench-results" / "run") == "bench-results/run"
    assert portable_path("/elsewhere/models/tiny.gguf") == "tiny.gguf"


def set_version(data):
    data["version"] = 1


def set_speed_text(data):
    data["sections"][0]["records"][0]["tokens_per_s"] = "fast"


def set_turn_true(data):
    data["sections"][0]["records"][0]["turn"] = True


def drop_records(data):
    del data["sections"][0]["records"]


def add_field(data):
    data["settings"]["colour"] = "blue"


def set_cost_key(data):
    data["sections"][0]["cost_curves"]["hf"]["one"] = 1.0


@pytest.mark.parametrize(
    "damage, message",
    [
        (set_version, r"format version 1; this tokenrecycle reads bench results of version 2"),
        (set_speed_text, r"sections\[0\]\.records\[0\]\.tokens_per_s: expected int or float, found str"),
        (set_turn_true, r"records\[0\]\.turn: expected int, found bool"),
        (drop_records, r"sections\[0\]: missing field 'records'"),
        (add_field, r"settings: unknown field 'colour'"),
        (set_cost_key, r"key 'one' is not a whole number"),
    ],
)
def test_results_of_another_version_or_damaged_are_a_typed_error(bench_run, tmp_path, capsys, damage, message):
    out, _ = bench_run
    data = json.loads((out / "results.json").read_text())
    damage(data)
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(CorruptResultsError, match=message):
        load_results(tmp_path)
    assert main(["bench", "--render", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "results.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "report.md").exists()


def test_results_that_are_not_json_are_a_typed_error(tmp_path):
    (tmp_path / "results.json").write_text('{"version": 2, "status": ')
    with pytest.raises(CorruptResultsError, match="is not JSON"):
        load_results(tmp_path)


@pytest.mark.parametrize("committed", COMMITTED, ids=lambda path: path.name)
def test_committed_results_render_their_report(committed, tmp_path):
    copy = tmp_path / committed.name
    copy.mkdir()
    text = gzip.decompress((committed / "results.json.gz").read_bytes()).decode()
    (copy / "results.json").write_text(text)
    assert main(["bench", "--render", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (committed / "report.md").read_text()
    assert absolute_paths(json.loads(text)) == []


def test_quantised_methods_run_on_their_own_weights_against_their_own_plain_decoding():
    """gguf-*: the GGUF's own blocks on the C++ kernel; tr and auto there are paired with gguf-plain."""
    factory = MethodFactory("smollm2", "bfloat16")
    ids = factory.engine.encode("def add(a, b):")
    built = {name: factory.build(name, tree="tr4" if name.endswith("-tr") else None) for name in ("gguf-plain", "gguf-tr", "gguf-auto")}
    assert built["gguf-plain"].baseline == "ar" and built["gguf-tr"].baseline == built["gguf-auto"].baseline == "gguf-plain"
    assert built["gguf-auto"].settings["quantize"] == "gguf" and "gguf weights" in built["gguf-plain"].description
    runs = {name: method.run(ids, 12) for name, method in built.items()}
    for name, run in runs.items():
        assert len(run.token_ids) == 12 and sum(run.accepted_lengths) == 12, name  # the prefill decides the first
    assert runs["gguf-plain"].accepted_lengths == [1] * 12
    assert set(factory.cost_runners(list(built.values()))) == {"hf", "fast", "fast gguf"}
    assert factory.quantized_engine("gguf").runner.kernel.startswith("qmatmul")
