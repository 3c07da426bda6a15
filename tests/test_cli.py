"""The command line and the API refuse bad input with one line and a typed error."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenrecycle import (
    EmptyPromptError,
    Generator,
    InvalidOptionError,
    InvalidTemplateError,
    ModelNotFoundError,
    PromptTooLongError,
    UnsupportedModelError,
)
from tokenrecycle.cli import identical_text, main
from tokenrecycle.models import resolve
from tokenrecycle.runners.native import SOURCE, module_name, native_module, native_module_built


@pytest.fixture(autouse=True)
def extension_cache_ready(monkeypatch):
    """The C++ loop's build notice depends on this machine's extension cache, the one-line checks
    here must not (test_build_notice sets it)."""
    monkeypatch.setattr("tokenrecycle.runners.native.native_module_built", lambda: True)


def run_cli(capsys, *args):
    code = main(["generate", "--no-tune", *args])  # tuning on first use is tested in test_tuning.py
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, text):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenrecycle: error:") and text in lines[0], err


@pytest.mark.parametrize(
    "args, text",
    [
        (["   "], "prompt is empty"),
        (["hi", "--max-new-tokens", "0"], "at least 1"),
        (["hi", "--model", "/no/such/model"], "no model at"),
        (["hi", "--tree", "bogus"], "unknown tree"),
        (["hi", "--topk", "0"], "topk"),
        (["hi", "--tree", "tr80", "--topk", "x"], "invalid int"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_loading(capsys, args, text):
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, text)
    assert out == ""


def test_bad_dtype_is_one_line_too(capsys):
    code, _, err = run_cli(capsys, "hi", "--dtype", "fp8")
    assert_one_line_error(code, err, "invalid choice: 'fp8'")


@pytest.mark.parametrize(
    "args, text",
    [
        (["--runner", "turbo"], "invalid choice: 'turbo'"),
        (["--quantize", "int2"], "invalid choice: 'int2'"),
        (["--quantize", "int4", "--dtype", "float32"], "needs bfloat16"),
        (["--quantize", "int4", "--runner", "hf", "--dtype", "bfloat16"], "needs the fast runner"),
    ],
)
def test_bad_runner_options_are_one_line(capsys, args, text):
    code, out, err = run_cli(capsys, "hi", *args)
    assert_one_line_error(code, err, text)
    assert out == ""


def test_auto_dtype_and_runner_are_reported(capsys):
    code, out, _ = run_cli(capsys, "--json", "--max-new-tokens", "4", "Hi")
    assert code == 0
    report = json.loads(out)
    assert report["dtype"] in ("float32", "bfloat16") and report["dtype_reason"].startswith("auto: ")
    assert report["runner"] == "fast"
    code, out, _ = run_cli(capsys, "--json", "--runner", "hf", "--dtype", "float32", "--max-new-tokens", "4", "Hi")
    assert json.loads(out)["runner"] == "hf" and json.loads(out)["dtype_reason"] == "asked for float32"


@pytest.mark.parametrize("quantize", ["int4", "gguf"])  # gguf: the file's own Q4_1 blocks and Q8_0 head
def test_quantised_weights_compare_with_plain_decoding_of_the_same_weights(capsys, quantize):
    args = ["--json", "--compare", "--quantize", quantize, "--dtype", "bfloat16", "--max-new-tokens", "8", "Hi"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    report = json.loads(out)
    assert report["quantize"] == quantize
    assert report["tree"] in ("tr2", "auto")  # the 4-bit default, or the tuned tree where the cache has a profile
    assert report["baseline"] == f"plain greedy, same {quantize} runner"


def test_user_tree_file_is_validated(capsys, tmp_path):
    bad = tmp_path / "tree.json"
    bad.write_text("[[0], [0, 0, 0]]")
    code, _, err = run_cli(capsys, "hi", "--tree", str(bad))
    assert_one_line_error(code, err, "has no parent path [0, 0]")
    bad.write_text("{not json")
    code, _, err = run_cli(capsys, "hi", "--tree", str(bad))
    assert_one_line_error(code, err, "cannot read tree file")


def test_corrupt_and_truncated_gguf_leave_nothing_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENRECYCLE_CACHE", str(tmp_path / "cache"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    code, _, err = run_cli(capsys, "hi", "--model", str(garbage))
    assert_one_line_error(code, err, "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    with resolve("smollm2").open("rb") as source:
        truncated.write_bytes(source.read(2_000_000))
    code, _, err = run_cli(capsys, "hi", "--model", str(truncated))
    assert_one_line_error(code, err, "cannot read GGUF")
    leftovers = list((tmp_path / "cache" / "models").iterdir()) if (tmp_path / "cache" / "models").exists() else []
    assert leftovers == []


def test_unsupported_architecture_is_refused_at_load(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        Generator(str(tmp_path / "gpt2"))
    code, _, err = run_cli(capsys, "hi", "--model", str(tmp_path / "gpt2"))
    assert_one_line_error(code, err, "not supported")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        Generator(str(tmp_path))


def test_api_raises_typed_errors(smollm2):
    with pytest.raises(EmptyPromptError):
        smollm2.generate("")
    with pytest.raises(InvalidOptionError):
        smollm2.generate("hi", max_new_tokens=0)
    with pytest.raises(PromptTooLongError, match="context window of 8192"):
        smollm2.generate("word " * 9000)
    with pytest.raises(PromptTooLongError):
        smollm2.generate("hi", max_new_tokens=8190)
    with pytest.raises(InvalidTemplateError):
        smollm2.set_tree([[0], [5, 0]])


def test_tree_names(smollm2, monkeypatch):
    smollm2.set_tree([])
    assert smollm2.engine.tree.name == "custom" and smollm2.engine.tree.template.num_nodes == 0
    monkeypatch.setattr("tokenrecycle.engine.read_profile", lambda key: (None, None))  # not tuned here
    smollm2.set_tree(None)
    assert smollm2.engine.tree.name == "tr4" and smollm2.engine.tree.template.num_nodes == 4  # the float32 default
    with pytest.raises(ModelNotFoundError):
        Generator("/no/such/model")


def test_prompt_too_long_on_the_cli(capsys):
    code, _, err = run_cli(capsys, "word " * 9000)
    assert_one_line_error(code, err, "exceeds the context window")


def test_json_with_compare(capsys):
    args = ["--json", "--compare", "--dtype", "float32", "--max-new-tokens", "12", "Name a fruit."]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    report = json.loads(out)
    for key in ("text", "new_tokens", "steps", "mean_accepted", "tokens_per_s",
                "baseline_tokens_per_s", "speedup", "identical", "drafter_bytes", "runner", "dtype_reason"):
        assert key in report
    assert report["runner"] == "fast" and report["baseline"] == "plain greedy model.generate"
    assert report["identical"] is True
    assert report["new_tokens"] <= 12
    assert report["mean_accepted"] == pytest.approx(report["new_tokens"] / report["steps"])


def test_streams_text_then_stats_and_saves_the_table(capsys, tmp_path):
    table = tmp_path / "table.npz"
    code, out, err = run_cli(capsys, "--max-new-tokens", "8", "--table", str(table), "--stop", "zzz", "Say hello.")
    assert code == 0 and out.strip() and table.is_file()
    assert "new tokens in" in err and "MAT" in err and "tokens/s" in err
    code, _, _ = run_cli(capsys, "--max-new-tokens", "8", "--table", str(table), "Say hello.")
    assert code == 0
    table.write_bytes(b"broken")  # a damaged table is a one-line warning, and the run replaces it
    code, _, err = run_cli(capsys, "--max-new-tokens", "8", "--table", str(table), "Say hello.")
    assert code == 0 and "tokenrecycle: warning: cannot read table file" in err and "Traceback" not in err


def test_console_script_entry_point():
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "tokenrecycle.cli", "generate", ""], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "tokenrecycle: error: the prompt is empty"
    scripts = Path(sys.executable).parent / "tokenrecycle"
    assert scripts.exists()


def test_identical_text_explains_a_16_bit_mismatch():
    assert identical_text(True, "bfloat16") == "yes"
    assert identical_text(False, "float32") == "NO"
    assert identical_text(False, "bfloat16").startswith("no (bfloat16 rounding")


@pytest.mark.parametrize("args", [[], ["hi", "--prompt-file", "p.txt"], ["-", "--prompt-file", "p.txt"]])
def test_exactly_one_prompt_source(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "give exactly one prompt: as an argument, - for standard input, or --prompt-file")
    assert out == ""


def test_missing_or_unreadable_prompt_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--prompt-file", str(tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "cannot read prompt file")
    assert "No such file" in err
    code, _, err = run_cli(capsys, "--prompt-file", str(tmp_path))  # a directory
    assert_one_line_error(code, err, "Is a directory")


def test_prompt_that_is_not_utf8(capsys, tmp_path, monkeypatch):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    code, _, err = run_cli(capsys, "--prompt-file", str(latin1))
    assert_one_line_error(code, err, "is not valid UTF-8 (byte 0xe9 at offset 3)")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    code, _, err = run_cli(capsys, "-")
    assert_one_line_error(code, err, "the prompt on standard input is not valid UTF-8")
    code, _, err = run_cli(capsys, "\udcff\udcfe")  # how Python receives undecodable argument bytes
    assert_one_line_error(code, err, "the prompt is not valid UTF-8")
    code, _, err = run_cli(capsys, "hi", "--stop", "\udcff")
    assert_one_line_error(code, err, "is not valid UTF-8")


def test_undecodable_argument_bytes_in_a_process():
    result = subprocess.run(
        [sys.executable, "-m", "tokenrecycle.cli", "generate", b"\xff\xfe"], capture_output=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "tokenrecycle: error: the prompt is not valid UTF-8"


def test_empty_stop_string_is_refused(capsys):
    code, out, err = run_cli(capsys, "hi", "--stop", "x", "--stop", "")
    assert_one_line_error(code, err, "a stop string must be a non-empty string")
    assert out == ""


def test_prompt_from_a_file_or_standard_input_is_the_argument(capsys, tmp_path, monkeypatch):
    prompt = "Name a fruit."
    options = ["--json", "--dtype", "float32", "--max-new-tokens", "6"]
    file = tmp_path / "prompt.txt"
    file.write_text(prompt, encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt.encode())))
    texts = []
    for source in ([prompt], ["--prompt-file", str(file)], ["-"]):
        code, out, _ = run_cli(capsys, *options, *source)
        assert code == 0
        texts.append(json.loads(out)["text"])
    assert texts[0] and texts == [texts[0]] * 3


def test_a_prompt_file_longer_than_an_argument_can_be(capsys, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 30_000, encoding="utf-8")  # 150 KB: past the 128 KiB a shell argument may hold
    code, _, err = run_cli(capsys, "--prompt-file", str(long))
    assert_one_line_error(code, err, "exceeds the context window")  # read whole, then measured in tokens


def test_native_module_built_reads_the_extension_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not native_module_built()
    build = tmp_path / module_name()  # torch's name for the build directory under the root (made by the lookup)
    library = build / f"{module_name()}.so"
    library.write_bytes(b"")
    assert not native_module_built()  # no build.ninja: not built from this source
    (build / "build.ninja").write_text(f"build decoder.o: compile {SOURCE}\n")
    assert native_module_built()
    (build / "build.ninja").write_text("build decoder.o: compile /another/checkout/decoder.cpp\n")
    assert not native_module_built()  # another checkout's build: rebuilt for this one


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """torch's `lock` file from a build that was killed mid-way: the next process loads anyway."""
    from torch.utils.cpp_extension import _get_build_directory

    assert not isinstance(native_module(), str), native_module()  # built (and loaded) here once
    stale = Path(_get_build_directory(module_name(), verbose=False)) / "lock"
    stale.touch()
    code = "from tokenrecycle.runners.native import native_module; m = native_module(); assert not isinstance(m, str), m"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not stale.exists()


def test_the_native_build_is_named_by_its_source(tmp_path, monkeypatch):
    """Another version's sources (a second clone, a worktree) get a build of their own: an edit
    to any file in csrc, a header included, changes the name."""
    edited = shutil.copytree(SOURCE.parent, tmp_path / "csrc")
    header = next(edited.glob("*.h"))
    header.write_bytes(header.read_bytes() + b"\n// edited\n")
    ours = module_name()
    monkeypatch.setattr("tokenrecycle.runners.native.CSRC", edited)
    module_name.cache_clear()
    try:
        assert module_name() != ours and module_name().startswith("tokenrecycle_decoder_")
    finally:
        module_name.cache_clear()


@pytest.mark.parametrize(
    "built, args, env, notice",
    [
        (False, [], {}, True),
        (True, [], {}, False),
        (False, ["--runner", "hf"], {}, False),
        (False, [], {"TOKENRECYCLE_NATIVE": "0"}, False),
    ],
)
def test_build_notice(capsys, monkeypatch, built, args, env, notice):
    monkeypatch.setattr("tokenrecycle.runners.native.native_module_built", lambda: built)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "hi", "--model", "/no/such/model", *args)  # fails at the load, after the notice
    assert code == 2
    lines = err.strip().splitlines()
    assert ("tokenrecycle: building the C++ decoder loop (once, about 30 s)" in lines) is notice
    assert lines[-1].startswith("tokenrecycle: error: no model at")
