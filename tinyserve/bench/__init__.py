"""Benchmarks: ``python -m tinyserve.bench SUITE [options]``.

Speed is measured here, never in tests. Each suite is one module in this package with

    NAME, HELP          the sub-command and its one-line description
    add_arguments(p)    its options (``--out`` is added for every suite)
    run(args) -> dict   measure, print a small table, return the JSON-ready result

and is listed in ``SUITES`` below. ``common`` holds what every suite shares: the environment
record (card, versions, threads, date, command line), result files
(``benchmarks/results/<machine>-<suite>.json``) and timing helpers.

Suites:
    generate   batch-1 greedy decode tokens/s on SmolLM2: tinyserve vs HF transformers
"""

# sub-command -> module (imported only when that suite runs, so --help stays instant)
SUITES = {
    "generate": "tinyserve.bench.generate",
}
