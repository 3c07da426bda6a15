#!/usr/bin/env bash
# Prepare, on this (CPU) machine after `make install`, what scripts/gpu_check.sh needs on a GPU
# machine that reaches no network and gets only the working tree plus up to 64 MiB of carried,
# git-ignored paths per call. Everything lands in .gpu/ (ignored by git):
#
#   .gpu/model-a/  .gpu/model-b/   SmolLM2's GGUF (98 MB) in two halves, one per call, and its sha256
#   .gpu/wheels/                   the one Python package the GPU image lacks: gguf (pure Python)
#   .gpu/questions.jsonl           the bench's prompts: the first MT-Bench question of each
#                                  category and the first HumanEval problem (the packages that ship
#                                  them are not on the GPU image)
#
# Then, with the device tool (two calls back to back, while the machine stays warm):
#   run(carry=[".gpu/model-a"], command="bash scripts/gpu_check.sh stage")
#   run(carry=[".gpu/model-b", ".gpu/wheels", ".gpu/questions.jsonl"], command="bash scripts/gpu_check.sh", timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
test -x "$PY" || { echo "gpu_prepare: run make install first" >&2; exit 2; }
mkdir -p .gpu/model-a .gpu/model-b .gpu/wheels

GGUF=$("$PY" -c 'from tokenrecycle.models import bundled_gguf; print(bundled_gguf("smollm2"))')
NAME=$(basename "$GGUF")
HALF=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
rm -f .gpu/model-a/* .gpu/model-b/*
split -b "$HALF" -d -a 1 "$GGUF" ".gpu/part."
mv .gpu/part.0 ".gpu/model-a/$NAME.part0"
mv .gpu/part.1 ".gpu/model-b/$NAME.part1"
(cd "$(dirname "$GGUF")" && sha256sum "$NAME") > .gpu/model-b/sha256
cp .gpu/model-b/sha256 .gpu/model-a/sha256

# gguf for Python 3.12 (the GPU image's python3); it needs numpy, pyyaml, requests and tqdm, which the image has.
GGUF_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("gguf"))')
rm -f .gpu/wheels/*
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .gpu/wheels "gguf==$GGUF_VERSION"

"$PY" - <<'EOF'
import json
from tokenrecycle.bench import default_questions, per_category

with open(".gpu/questions.jsonl", "w") as out:
    for q in per_category(default_questions(), 1):
        out.write(json.dumps({"question_id": q.question_id, "category": q.category, "turns": list(q.turns)}) + "\n")
EOF
du -sh .gpu/model-a .gpu/model-b .gpu/wheels .gpu/questions.jsonl
echo "gpu_prepare: ready; see the comment at the top of this script for the two device calls"
