#!/usr/bin/env bash
# Curation end to end on the demo (README, Curation): train the demo recipe, let that model rate
# 1,500 fresh synthetic problems, decontaminate them against the held-out 200, keep 817, train
# the same recipe on them, and evaluate both on the held-out 200. About 15 minutes on 2 CPU cores.
#
#   bash benchmarks/curate_demo.sh          # outputs in runs/demo, runs/curate-demo, runs/curated
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=runs/curate-demo
rm -rf "$W" runs/curated
mkdir -p "$W/eval/synthetic"
make demo                                                   # the baseline: runs/demo, evaluated
"$PY" - "$W" <<'PYTHON'
import json, sys
from limo.data.synthetic import heldout_split, problems
work = sys.argv[1]
with open(f"{work}/pool.jsonl", "w") as f:   # after the held-out 200 and the 817 the demo trains on
    f.writelines(json.dumps({"id": f"pool-{i}", **r}) + "\n" for i, r in enumerate(problems(1500, skip=1017)))
with open(f"{work}/eval/synthetic/test.jsonl", "w") as f:
    f.writelines(json.dumps({"id": f"heldout-{i}", **r}) + "\n" for i, r in enumerate(heldout_split()))
PYTHON
"$PY" -m limo.curate --pool "$W/pool.jsonl" --out "$W/curated" --model runs/demo/hf --eval-dir "$W/eval" \
    --samples 4 --max-tokens 400 --band 0,0.5 --select 817 --device cpu --max-num-seqs 128 --batch-size 512
.venv/bin/torchrun --nproc_per_node 2 limo/engine/train.py --config configs/demo.toml \
    --data.path="$W/curated/kept.jsonl" --data.tokenizer=runs/demo/hf --train.output_dir=runs/curated
