#!/usr/bin/env bash
# One pass on a lent GPU machine: correctness first, then decode and the other suites.
#
#   OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu_check.sh      (from the repository root)
#   OUT=/tmp/g PACK=$OUT/gpu_check.tgz bash benchmarks/gpu_check.sh   (a transport that returns
#                                            few files: everything packed into one archive)
#
# Needs only what that machine has (torch, triton, transformers, matplotlib; no gguf, no
# network) and installs nothing. Every part runs under `timeout` against one overall deadline
# (TOTAL_S, default 540 s, so the whole script ends inside 9.5 minutes); a part that fails
# or runs out of time is logged and the next one still runs. Everything lands in $OUT:
#   pytest-gpu.xml / .log     `pytest -m gpu` over tests/ (kernels vs references in bf16, the
#                             model with backend="triton" vs "ref", CUDA graphs, ...), verbose so
#                             a run cut off by its timeout still names every test it finished;
#                             spread over pytest-xdist workers when the machine has it (Triton's
#                             compiles and autotuning are CPU-bound and take most of the time)
#   <gpu>-{decode,ops,quant,serving,speculative}.json, *.log   the suites' results and output
#                             (the caps add up to more than TOTAL_S: a part that finds too
#                             little time left is skipped and says so in summary.txt)
#   figures/                  the plots drawn from those results (the suites write them there)
#   summary.txt               exit status and seconds of each part
# First run (2026-12-04, H200): pytest alone used its whole 150 s on 28 of 132 tests, and the
# decode suite, last then, got no time; hence xdist, the verbose log and decode second.
set -u
OUT=${OUT:-benchmarks/gpu_out}
TOTAL_S=${TOTAL_S:-540}
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
PYTEST_OPTS=()
$PY -c "import xdist" 2>/dev/null && PYTEST_OPTS+=(-n 8)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS+=(--timeout 120)
run pytest-gpu 170 $PY -m pytest -v -m gpu tests/ -p no:cacheprovider -rs ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} \
    --continue-on-collection-errors --junitxml="$OUT/pytest-gpu.xml"

# 2. end-to-end decode, Llama-3.2-1B and Llama-2-7B shapes, batch 1 and 16, ours vs HF: the
#    suite the headline targets are measured by. --budget-s: start no new (model, batch) run
#    once it is spent; the cap's remaining 70 s let the run in progress finish and the JSON be
#    written.
run bench-decode 150 $PY -m tinyserve.bench decode --out "$OUT" --figures "$OUT/figures" \
    --budget-s 80

# 3. every op's kernel vs its peers at real shapes (stops starting new cases after --budget-s);
#    paged_attention's "contiguous" peer gives the paged/contiguous ratio (target >= 0.9)
run bench-ops 90 $PY -m tinyserve.bench ops --out "$OUT" --figures "$OUT/figures" --budget-s 60

# 3b. quantized decode: memory and tok/s of bf16 / int4-g128 / int8 / nf4, Llama-2-7B shape,
#     batch 1 and 16, CUDA graphs (prompt 16: prefill stays on the skinny path, less autotuning)
run bench-quant 75 $PY -m tinyserve.bench quant --out "$OUT" --prompt-len 16 --budget-s 45

# 3c. continuous vs static batching, Llama-3.2-1B shape (no HF: its 1B generate alone would
#     take minutes); speculative target/draft step costs combined with the committed CPU alpha
run bench-serving 65 $PY -m tinyserve.bench serving --model llama-3.2-1b --no-hf --rates '' \
    --num-requests 64 --out "$OUT" --figures "$OUT/figures"
run bench-speculative 50 $PY -m tinyserve.bench speculative --device cuda --repeats 10 --budget-s 30 \
    --out "$OUT"

echo "total $(( SECONDS - START ))s" | tee -a "$OUT/summary.txt"
if [[ -n "${PACK:-}" ]]; then   # archive outside $OUT first: tar must not read its own output
    tmp=$(mktemp) && tar czf "$tmp" -C "$OUT" . && mv "$tmp" "$PACK" && echo "packed $OUT into $PACK"
fi
exit 0
