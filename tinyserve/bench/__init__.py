"""Benchmarks: ``python -m tinyserve.bench SUITE [options]``.

Speed is measured here, never in tests. Each suite is one module in this package with

    NAME, HELP          the sub-command and its one-line description
    COMMON              the shared flags it takes (--device, --threads, --seed, --budget-s,
                        --figures: ``common.COMMON_FLAGS``; ``--out`` is every suite's)
    add_arguments(p)    its own options (engine options: ``tinyserve.args.add_engine_args``)
    run(args) -> dict   ``common.start`` (device, threads, environment record), measure,
                        ``common.finish`` (print its table, draw its figures), return the result

and is listed in ``SUITES`` below. ``common`` holds what every suite shares: that runner, the
environment record (card, versions, threads, load average, date, command line), result files
(``benchmarks/results/<machine>-<suite>.json``), timing helpers and the time budget.

Suites:
    roofline   measured copy bandwidth and matmul rate: the ceilings everything is a fraction of
    ops        each op's kernel vs its peers (cuBLAS, SDPA, eager ref), fraction of roofline
    decode     decode tokens/s of Llama-3.2-1B / Llama-2-7B shapes (random weights) vs HF
    generate   batch-1 greedy decode tokens/s on SmolLM2: tinyserve vs HF transformers
    cpu        SmolLM2 on the CPU: tinyserve native vs fp32 reference vs HF vs llama.cpp
    speculative  alpha, tokens per step and speedup per draft and task (CPU; GPU from shapes)
    serving    continuous vs static batching vs HF batched generate: throughput, latency vs rate
    paged      paged KV store vs contiguous slots: waste, sequences per KV budget, prefix cache
    all        roofline + ops + decode (+ generate), one result file each
    plot       redraw the figures of result files (``plot benchmarks/results/<file>.json``)
    figures    redraw every committed result into figures/ (``make figures``)
"""

# sub-command -> module (imported only when that suite runs, so --help stays instant)
SUITES = {
    "roofline": "tinyserve.bench.roofline",
    "ops": "tinyserve.bench.ops",
    "decode": "tinyserve.bench.decode",
    "generate": "tinyserve.bench.generate",
    "cpu": "tinyserve.bench.cpu",
    "quant": "tinyserve.bench.quant",
    "serving": "tinyserve.bench.serving",
    "paged": "tinyserve.bench.paged",
    "speculative": "tinyserve.bench.speculative",
    "all": "tinyserve.bench.all",
    "plot": "tinyserve.bench.plots",
    "figures": "tinyserve.bench.figures",
}
