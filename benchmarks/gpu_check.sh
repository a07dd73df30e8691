#!/usr/bin/env bash
# One pass on a lent GPU machine: correctness first, then the ops and decode benchmarks.
#
#   OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu_check.sh      (from the repository root)
#
# Needs only what that machine has (torch, triton, transformers, matplotlib; no gguf, no
# network) and installs nothing. Every part runs under `timeout` against one overall deadline
# (TOTAL_S, default 460 s, so the whole script ends well inside 8 minutes); a part that fails
# or runs out of time is logged and the next one still runs. Everything lands in $OUT:
#   pytest-gpu.xml / .log     `pytest -m gpu` over tests/ (kernels vs references in bf16, the
#                             model with backend="triton" vs "ref", CUDA graphs, ...)
#   <gpu>-{ops,quant,serving,speculative,decode}.json, *.log   the suites' results and output
#                             (the caps add up to more than TOTAL_S: a part that finds too
#                             little time left is skipped and says so in summary.txt)
#   figures/                  the plots drawn from those results (the suites write them there)
#   summary.txt               exit status and seconds of each part
set -u
OUT=${OUT:-benchmarks/gpu_out}
TOTAL_S=${TOTAL_S:-460}
PY=${PYTHON:-python}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/figures"
START=$SECONDS
: > "$OUT/summary.txt"

# run NAME CAP_S CMD...: CMD under timeout min(CAP_S, time left - 10 s); output to NAME.log
run() {
    local name=$1 cap=$2; shift 2
    local left=$(( TOTAL_S - (SECONDS - START) - 10 ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 20 )); then
        echo "$name: skipped, ${left}s left" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc $(( SECONDS - t0 ))s$( ((rc == 124)) && echo ' (timed out)')" \
        | tee -a "$OUT/summary.txt"
}

{ nvidia-smi; $PY -c "import torch, triton, transformers; print('torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. correctness on CUDA: every test marked gpu (a module that cannot be imported here, e.g.
#    for want of gguf, is reported and the rest still run)
run pytest-gpu 150 $PY -m pytest -q -m gpu tests/ -p no:cacheprovider -rs \
    --continue-on-collection-errors --junitxml="$OUT/pytest-gpu.xml"

# 2. every op's kernel vs its peers at real shapes (stops starting new cases after --budget-s);
#    paged_attention's "contiguous" peer gives the paged/contiguous ratio (target >= 0.9)
run bench-ops 110 $PY -m tinyserve.bench ops --out "$OUT" --figures "$OUT/figures" --budget-s 80

# 2b. quantized decode: memory and tok/s of bf16 / int4-g128 / int8 / nf4, Llama-2-7B shape,
#     batch 1 and 16, CUDA graphs (prompt 16: prefill stays on the skinny path, less autotuning)
run bench-quant 120 $PY -m tinyserve.bench quant --out "$OUT" --prompt-len 16 --budget-s 70

# 2c. continuous vs static batching, Llama-3.2-1B shape (no HF: its 1B generate alone would
#     take minutes); speculative target/draft step costs combined with the committed CPU alpha
run bench-serving 80 $PY -m tinyserve.bench serving --model llama-3.2-1b --no-hf --rates '' \
    --num-requests 64 --out "$OUT" --figures "$OUT/figures"
run bench-speculative 50 $PY -m tinyserve.bench speculative --device cuda --repeats 10 --budget-s 35 \
    --out "$OUT"

# 3. end-to-end decode, Llama-3.2-1B and Llama-2-7B shapes, batch 1 and 16, ours vs HF
#    --budget-s: start no new (model, batch) run once it is spent; the 80 s kept back let the
#    run in progress (Llama-2-7B at batch 16 takes ~30 s) finish and the JSON be written.
left=$(( TOTAL_S - (SECONDS - START) - 10 ))
budget=$(( left - 80 < 170 ? left - 80 : 170 ))
run bench-decode 260 $PY -m tinyserve.bench decode --out "$OUT" --figures "$OUT/figures" \
    --budget-s $(( budget > 0 ? budget : 0 ))

echo "total $(( SECONDS - START ))s" | tee -a "$OUT/summary.txt"
