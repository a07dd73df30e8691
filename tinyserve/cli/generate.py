"""``tinyserve generate``: complete one prompt, streaming the text to stdout and one line of
statistics to stderr (so ``tinyserve generate ... > out.txt`` keeps only the text)."""
from __future__ import annotations

import sys

from .exits import EXIT_INTERRUPTED, EXIT_OK, UsageError
from .loading import llm_from_args, sampling_params_from_args


def format_stats(stats: dict) -> str:
    """One line from ``decode_loop``'s stats: prompt/generated tokens, TTFT, decode rate."""
    if not stats:
        return "[no statistics: generation did not finish]"
    n, prefill, total = stats["generated_tokens"], stats["prefill_s"], stats["total_s"]
    decode_s = total - prefill
    rate = f"{(n - 1) / decode_s:.1f} tok/s" if n > 1 and decode_s > 0 else "n/a"
    e2e = f"{n / total:.1f} tok/s" if total > 0 else "n/a"
    return (f"[prompt tokens: {stats['prompt_tokens']}, generated tokens: {n}, "
            f"time to first token: {prefill * 1e3:.0f} ms, decode: {rate}, "
            f"end-to-end: {e2e}, total: {total:.2f} s]")


def _stream_to(out, deltas) -> str:
    """Write each delta as it arrives; -> the whole text."""
    parts = []
    for d in deltas:
        out.write(d)
        out.flush()
        parts.append(d)
    return "".join(parts)


def cmd_generate(args) -> int:
    params = sampling_params_from_args(args)
    llm = llm_from_args(args)
    stats: dict = {}
    try:
        if args.chat:
            deltas = llm.stream_chat([{"role": "user", "content": args.prompt}], params, stats)
        else:
            deltas = llm.stream(args.prompt, params, stats)
        _stream_to(sys.stdout, deltas)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("[interrupted]", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as e:  # e.g. a prompt longer than the context
        raise UsageError(str(e)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(stats), file=sys.stderr)
    return EXIT_OK
