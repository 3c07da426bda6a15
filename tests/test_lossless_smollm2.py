"""Exactness on the real default model, float32: every template equals model.generate token for token.

The main checks run on every device there is (marked cuda: on a GPU, through the fast runner's
CUDA graphs, against model.generate on the same GPU; skipped here)."""

import pytest

from real_models import assert_sampling_exact, generate_baselines
from tokenrecycle import TEMPLATES
from tokenrecycle.sampling import Sampling

pytestmark = pytest.mark.real_model

PROMPTS = [
    # chat
    "Explain in three sentences why the sky is blue.",
    "What are three tips for staying focused while studying?",
    "Write a short, friendly email declining a meeting invitation.",
    "Describe the water cycle to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why do cats purr?",
    # code
    "Write a Python function that reverses a string.",
    "Write a Python function to check whether a number is prime.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Write a SQL query that counts the orders per customer.",
    "Explain what this code does: for i in range(10): print(i * i)",
    "Write a JavaScript function that sums an array of numbers.",
    # repetitive text
    "Repeat the following line five times: the quick brown fox jumps over the lazy dog.",
    "Count from one to twenty in words.",
    "List the days of the week, then list them again in reverse order.",
    "Write the alphabet in capital letters separated by commas.",
    "a b c a b c a b c a b c a b c",
    # arithmetic
    "What is 17 + 25?",
    "What is 12 times 12? Show your work.",
    "If a train travels 60 miles per hour for 3 hours, how far does it go?",
    "Compute 1000 - 357.",
    # non-English
    "Traduis en français : The weather is nice today.",
    "¿Cuál es la capital de España?",
    "Was ist die Hauptstadt von Deutschland?",
    "日本の首都はどこですか？",
    "Переведи на английский: Я люблю читать книги.",
    # one word and odd inputs
    "Hello",
    "Why?",
    "Python",
    "!!!",
]

MAX_NEW = 32
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module")
def on_device(request):
    """The model in float32 on a device and runner, loaded once (the CPU ones are the session's,
    asked for only when a CPU test runs)."""
    from tokenrecycle import Generator

    generators = {}

    def get(device: str, runner: str = "fast"):
        if (device, runner) not in generators:
            if device == "cpu":
                generators[device, runner] = request.getfixturevalue("smollm2" if runner == "fast" else "smollm2_hf")
            else:
                generators[device, runner] = Generator("smollm2", dtype="float32", runner=runner, device=device)
        return generators[device, runner]

    return get


@pytest.fixture(scope="module")
def device_baselines(on_device):
    """model.generate's greedy tokens for every prompt, on each device."""
    found = {}

    def get(device: str):
        if device not in found:
            reference = on_device(device)
            found[device] = generate_baselines(reference, PROMPTS, MAX_NEW)
        return found[device]

    return get


@pytest.fixture(scope="module")
def baselines(device_baselines):
    return device_baselines("cpu")


# All 32 prompts for the float32 default tree; every other prompt (16, from every group above) for
# the other trees, the largest and the dynamic one included. The budget of `make test` is 20
# minutes on two cores; the engine's tests cover interleaving, every drafter and the tree shapes.
FULL_CHECK = {"tr4"}


@pytest.mark.parametrize("template", sorted(TEMPLATES) + ["dyn16"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_template_matches_plain_greedy(on_device, device_baselines, device, template):
    smollm2, baselines = on_device(device), device_baselines(device)
    smollm2.set_tree(template)
    mismatches = []
    accepted = []
    for prompt in PROMPTS if template in FULL_CHECK else PROMPTS[::2]:
        result = smollm2.generate(prompt, max_new_tokens=MAX_NEW)
        accepted.append(result.mean_accepted)
        if result.token_ids != baselines[prompt]:
            mismatches.append(prompt)
    assert not mismatches, f"{template}: outputs differ from model.generate on {mismatches}"
    if template != "none":
        assert max(accepted) > 1.5  # drafts really were accepted, not just verified


@pytest.mark.parametrize("device", DEVICES)
def test_plain_decoding_on_the_fast_runner_matches_generate(on_device, device_baselines, device):
    """One token per step on the fast runner is exactly transformers' greedy decoding: the prompts
    the empty tree (`none`, above) does not run, so the two no-draft paths cover all 32."""
    smollm2, baselines = on_device(device), device_baselines(device)
    mismatches = [p for p in PROMPTS[1::2] if smollm2.generate(p, max_new_tokens=MAX_NEW, drafter="plain").token_ids != baselines[p]]
    assert not mismatches, f"plain decoding on the fast runner differs from model.generate on {mismatches}"


@pytest.mark.parametrize("template", ["tr8", "tr80"])
@pytest.mark.parametrize("device", DEVICES)
def test_transformers_runner_matches_generate(on_device, device_baselines, device, template):
    smollm2_hf, baselines = on_device(device, "hf"), device_baselines(device)
    smollm2_hf.set_tree(template)
    for prompt in PROMPTS[::4]:
        assert smollm2_hf.generate(prompt, max_new_tokens=MAX_NEW).token_ids == baselines[prompt], prompt


def test_both_runners_give_the_same_tree_logits(smollm2, smollm2_hf):
    """On the real model, float32: the fast runner's logits for a prompt and a tree are the
    transformers runner's up to float rounding."""
    import numpy as np

    from tokenrecycle.trees import compile_template, prune

    prompt = smollm2.encode(PROMPTS[8])
    compiled = compile_template(TEMPLATES["tr16"], 8)
    tokens = np.random.default_rng(0).integers(0, 49152, size=len(compiled.paths))
    tree = prune(compiled, tokens, np.ones(len(tokens), dtype=bool))
    with smollm2_hf.runner.borrowed_slot() as hf, smollm2.runner.borrowed_slot() as fast:
        for name, expected, actual in [
            ("prefill", smollm2_hf.runner.prefill(hf, prompt), smollm2.runner.prefill(fast, prompt)),
            ("tree", smollm2_hf.runner.forward_tree(hf, tree), smollm2.runner.forward_tree(fast, tree)),
        ]:
            assert (expected - actual).abs().max().item() < 1e-3, name


def test_fixed_steps_on_the_cpu_match_generate(smollm2, baselines):
    """The fast runner's fixed-shape steps (what a GPU replays as CUDA graphs), run eagerly on the
    CPU through the same code: Token Recycling with tr16 still gives model.generate's tokens."""
    from fakes import decode_alone
    from tokenrecycle.runners import FastRunner

    runner = FastRunner(smollm2.engine.loaded.model, fixed_steps=True, max_slots=1)
    drafter = smollm2.engine.recycling_drafter("tr16")
    for prompt in PROMPTS[8:10]:
        steps = list(decode_alone(runner, drafter, smollm2.encode(prompt), MAX_NEW))
        tokens = [token for step in steps for token in step.tokens]
        assert tokens[: len(baselines[prompt])] == baselines[prompt], prompt
        assert len(steps) < len(tokens)  # drafts were accepted: trees of several sizes ran


def test_long_generation_with_the_default_tree(smollm2):
    smollm2.set_tree(None)
    for prompt in PROMPTS[:2] + PROMPTS[8:9]:
        result = smollm2.generate(prompt, max_new_tokens=128)
        assert result.token_ids == smollm2.generate_with_transformers(prompt, max_new_tokens=128).token_ids


def test_one_new_token(smollm2):
    smollm2.set_tree("tr80")
    result = smollm2.generate(PROMPTS[0], max_new_tokens=1)
    assert result.new_tokens == 1 and result.steps == 1
    assert result.token_ids == smollm2.generate_with_transformers(PROMPTS[0], max_new_tokens=1).token_ids


def test_eos_accepted_inside_a_draft_path(smollm2):
    smollm2.set_tree("tr16")
    prompt = "Answer with one word: what color is grass?"
    smollm2.generate(prompt, max_new_tokens=16)  # warm the table on this answer
    result = smollm2.generate(prompt, max_new_tokens=16)
    assert result.stop_reason == "eos"
    assert result.token_ids == smollm2.generate_with_transformers(prompt, max_new_tokens=16).token_ids
    assert result.accepted_lengths[-1] > 1  # EOS came as a drafted token, not only as a bonus


def test_stop_string_spanning_two_tokens(smollm2):
    smollm2.set_tree(None)
    prompt = PROMPTS[0]
    full = smollm2.generate_with_transformers(prompt, max_new_tokens=64)
    pieces = [smollm2.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(3, len(pieces)) if len(pieces[i - 1]) >= 3 and len(pieces[i].strip()) >= 2)
    stop = pieces[i - 1][-2:] + pieces[i][:2]
    assert stop not in "".join(pieces[:i])
    result = smollm2.generate(prompt, max_new_tokens=64, stop=[stop])
    assert result.stop_reason == "stop"
    assert result.token_ids == full.token_ids[: i + 1]
    assert result.text == smollm2.tokenizer.decode(full.token_ids[: i + 1]).split(stop)[0]
    assert stop not in result.text


def test_streamed_pieces_join_to_the_result_text(smollm2):
    smollm2.set_tree(None)
    generation = smollm2.stream(PROMPTS[8], max_new_tokens=48)
    pieces = list(generation)
    assert "".join(pieces) == generation.result.text and len(pieces) > 1


def test_sampling_with_token_recycling_is_exact_on_the_real_model(smollm2):
    """Exact output distribution of three sampled tokens (top-k 2: eight outcomes, enumeration.py)
    against the model's own conditionals, with a warm table so drafts are accepted."""
    assert_sampling_exact(smollm2, PROMPTS[14], Sampling(temperature=0.8, top_k=2))


def test_interleaved_requests_on_the_real_model_equal_generate(smollm2, baselines):
    """Seven requests through one engine of four slots, three drafters, stepped together."""
    from tokenrecycle import RequestSettings

    smollm2.set_tree("tr8")
    engine = smollm2.engine
    prompts = PROMPTS[::5]
    drafters = ["recycling", "auto", "lookup"]
    requests = [engine.submit(p, RequestSettings(MAX_NEW, drafter=drafters[i % 3])) for i, p in enumerate(prompts)]
    while not engine.idle:
        engine.step()
    mismatches = [p for p, r in zip(prompts, requests) if r.result.token_ids != baselines[p]]
    assert not mismatches, f"interleaved outputs differ from model.generate on {mismatches}"
