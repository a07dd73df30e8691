"""The ``tinyserve`` command line: generate, chat and info.

    tinyserve generate "The capital of France is" --max-tokens 32 --temperature 0
    tinyserve generate "What is the capital of France?" --chat
    tinyserve chat --system "You are a terse assistant."
    tinyserve info smollm2

``generate`` streams the completion to stdout and prints one line of statistics to stderr, so
``tinyserve generate ... > out.txt`` keeps only the text. Bad arguments print one
``error: ...`` line to stderr and exit with status 2.

Heavy imports (torch, the model) happen after the arguments are checked, so ``--help`` and
argument errors are instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .args import add_engine_args, positive_int
from .errors import RequestFailed

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

LLM_BATCHED_TOKENS = 2048   # LLM's own default (EngineConfig's is 512): same engine as LLM()
DTYPE_CHOICES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


class UsageError(Exception):
    """A bad command line: reported as one ``error: ...`` line, exit status 2."""


class Failure(Exception):
    """Something that is not the user's fault (e.g. the model could not be fetched): one
    ``error: ...`` line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and call sys.exit(2)
        raise UsageError(message)


# ---- argument types (checked before anything heavy is imported) --------------------------
def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _temperature(s: str) -> float:
    v = _float(s)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _top_p(s: str) -> float:
    v = _float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _top_k(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < -1:
        raise argparse.ArgumentTypeError(f"must be -1 or 0 (disabled) or >= 1, got {v}")
    return v


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _add_model_args(p, positional: bool = False):
    if positional:
        p.add_argument("model", help="a named model (e.g. smollm2), a .gguf file or an HF "
                                     "directory")
    else:
        p.add_argument("--model", "-m", default="smollm2",
                       help="a named model, a .gguf file or an HF directory (default: smollm2)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights and activations (default: bf16 on CUDA, fp32 on CPU)")


def _add_sampling_args(p, max_tokens: int):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=positive_int, default=max_tokens,
                   help=f"most new tokens per reply (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=_temperature, default=0.7,
                   help="0 = greedy (default: 0.7)")
    g.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus mass in (0, 1] (default: 1)")
    g.add_argument("--top-k", type=_top_k, default=-1, help="-1 = off (default)")
    g.add_argument("--seed", type=_int, default=None, help="for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinyserve", description="Run a small LLM with tinyserve.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"tinyserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("generate", help="complete one prompt, streaming to stdout",
                       description="Complete PROMPT, streaming the text to stdout; "
                                   "statistics go to stderr.")
    p.add_argument("prompt", help="the prompt text")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as one user message through the model's chat template")
    add_engine_args(p, max_num_batched_tokens=LLM_BATCHED_TOKENS)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (/reset clears history, /exit quits)",
                       description="A chat REPL. /reset clears the history, /exit or EOF "
                                   "(Ctrl-D) quits, Ctrl-C stops the current reply.")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    _add_sampling_args(p, max_tokens=512)
    add_engine_args(p, max_num_batched_tokens=LLM_BATCHED_TOKENS)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config, parameter count and memory footprint of a model",
                       description="Print a model's config, parameter count, weight bytes per "
                                   "dtype, on-disk size and KV-cache bytes per token.")
    _add_model_args(p, positional=True)
    p.set_defaults(func=cmd_info)
    return parser


# ---- model loading -----------------------------------------------------------------------
def check_model_name(name: str) -> None:
    """Reject a model that is neither an existing path nor a registered name, without
    loading (or downloading) anything."""
    from .weights import registry
    p = Path(name)
    if p.exists():
        return
    try:
        registry.resolve(name)
        return
    except ValueError:
        pass
    if os.sep in name or name.endswith(".gguf"):
        raise UsageError(f"model file or directory not found: {name}")
    raise UsageError(f"unknown model {name!r}: not a file or directory, and not one of the "
                     f"named models ({', '.join(registry.known_names())})")


def _dtype_arg(dtype: str):
    return None if dtype in (None, "auto") else dtype


def load_llm(model: str, device: str = "auto", dtype: str | None = None, config=None):
    """Build the ``LLM`` (``config``: its EngineConfig, None = LLM's defaults). Tests replace
    this function to reuse one loaded model."""
    from .llm import LLM
    return LLM(model, device=device, dtype=_dtype_arg(dtype), config=config)


def _engine_config(args):
    """The EngineConfig of the engine flags (None for a command without them), checked
    before anything is loaded."""
    if not hasattr(args, "_engine_flags"):
        return None
    from .engine.config import EngineConfig
    try:
        return EngineConfig.from_args(args)
    except ValueError as e:   # e.g. --max-num-batched-tokens below --max-num-seqs
        raise UsageError(str(e)) from None


def _load(args):
    from .weights.registry import ModelFetchError
    check_model_name(args.model)
    config = _engine_config(args)
    try:
        return load_llm(args.model, args.device, args.dtype, config=config)
    except (ValueError, FileNotFoundError) as e:  # bad device, bad file, unsupported model
        raise UsageError(str(e)) from None
    except (ModelFetchError, ImportError) as e:  # no network, `gguf` missing, ...
        raise Failure(str(e)) from None


def _sampling_params(args):
    from .sampling import SamplingParams
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---- commands ----------------------------------------------------------------------------
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
    params = _sampling_params(args)
    llm = _load(args)
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


CHAT_HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits, " \
            "Ctrl-C stops a reply"


def _read_line(prompt: str) -> str | None:
    """One line of user input, or None at end of input."""
    try:
        return input(prompt)
    except EOFError:
        return None


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load(args)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    prompt = ">>> " if sys.stdin.isatty() else ""  # no prompts in piped transcripts
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    print(f"tinyserve chat ({args.model}); {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = _read_line(prompt)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, not an exit
            print("\n(" + CHAT_HELP + ")", file=sys.stderr)
            continue
        if line is None:
            print()
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit"):
                return EXIT_OK
            if cmd == "/reset":
                history = list(base)
                print("[history cleared]", file=sys.stderr)
            elif cmd == "/help":
                print(CHAT_HELP, file=sys.stderr)
            else:
                print(f"unknown command {cmd}; {CHAT_HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            for d in llm.stream_chat(history, params):
                sys.stdout.write(d)
                sys.stdout.flush()
                parts.append(d)
        except KeyboardInterrupt:
            print("\n[reply stopped]", file=sys.stderr)
        except ValueError as e:  # the conversation outgrew the context window
            history.pop()
            print(f"\nerror: {e} (use /reset to start over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        reply = "".join(parts)
        if reply:  # keep what the user saw, even if the reply was stopped early
            history.append({"role": "assistant", "content": reply})
        else:
            history.pop()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _source_size(source: str) -> int | None:
    p = Path(source)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return None


def _vocab_size(tok) -> int | None:
    v = getattr(tok, "vocab_size", None)
    if isinstance(v, int):
        return v
    try:
        return len(tok)
    except TypeError:
        return None


def model_info(llm) -> dict:
    """The numbers ``info`` prints, as a dict (also handy in notebooks)."""
    model, cfg = llm.model, llm.model.config
    loaded = sum(p.numel() for p in model.parameters())
    packed = getattr(model, "packed_weights", {}) or {}
    by_qtype: dict[str, dict] = {}
    for pt in packed.values():
        q = by_qtype.setdefault(pt.qtype, {"tensors": 0, "params": 0, "bytes": 0})
        q["tensors"] += 1
        numel = 1
        for s in pt.shape:
            numel *= int(s)
        q["params"] += numel
        q["bytes"] += pt.nbytes
    return {
        "config": cfg.to_dict(),
        "num_parameters_config": cfg.num_parameters(),
        "num_parameters_loaded": loaded,
        "weight_bytes": {"fp32": loaded * 4, "bf16": loaded * 2, "fp16": loaded * 2},
        "loaded_dtype": str(model.dtype).replace("torch.", ""),
        "source": getattr(model, "source", None),
        "source_bytes": _source_size(getattr(model, "source", "") or ""),
        "quantized": by_qtype,
        "kv_bytes_per_token": {"fp32": cfg.kv_bytes_per_token(4),
                               "bf16": cfg.kv_bytes_per_token(2)},
        "tokenizer_vocab_size": _vocab_size(llm.tokenizer),
    }


def cmd_info(args) -> int:
    llm = _load(args)
    info = model_info(llm)
    cfg = info["config"]
    w = max(len(k) for k in cfg)
    print(f"model: {args.model}")
    print(f"source: {info['source']}")
    print("config:")
    for k, v in cfg.items():
        print(f"  {k:<{w}}  {v}")
    n_cfg, n = info["num_parameters_config"], info["num_parameters_loaded"]
    print("parameters:")
    print(f"  from config      {n_cfg:,}")
    print(f"  loaded tensors   {n:,}" + ("" if n == n_cfg else "  (differs from the config!)"))
    print("weight bytes:")
    for dt, b in info["weight_bytes"].items():
        print(f"  {dt:<5} {b:>15,}  ({_fmt_bytes(b)})")
    size = info["source_bytes"]
    if size is not None:
        print(f"on disk: {size:,} bytes ({_fmt_bytes(size)}, "
              f"{8 * size / max(n, 1):.2f} bits/parameter)")
    q_total = 0
    for qt, q in sorted(info["quantized"].items()):
        q_total += q["bytes"]
        print(f"  {qt:<5} {q['tensors']:>4} tensors {q['params']:>13,} params "
              f"{q['bytes']:>13,} bytes ({8 * q['bytes'] / q['params']:.2f} bits/weight)")
    if info["quantized"] and size is not None:
        print(f"  other (unquantized tensors, metadata, tokenizer) {size - q_total:,} bytes")
    ctx = cfg["max_position_embeddings"]
    print("KV cache per token:")
    for dt, b in info["kv_bytes_per_token"].items():
        print(f"  {dt:<5} {b:>10,} bytes  (full context of {ctx:,} tokens: "
              f"{_fmt_bytes(b * ctx)})")
    print(f"tokenizer vocab size: {info['tokenizer_vocab_size']:,}"
          if info["tokenizer_vocab_size"] is not None else "tokenizer vocab size: unknown")
    return EXIT_OK


# ---- entry point -------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (Failure, RequestFailed) as e:   # RequestFailed: the generation itself raised
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `tinyserve generate ... | head -c 10`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
