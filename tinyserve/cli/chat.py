"""``tinyserve chat``: a chat REPL. /reset clears the history, /exit or EOF (Ctrl-D) quits,
Ctrl-C stops the current reply (at the prompt: a fresh prompt, not an exit)."""
from __future__ import annotations

import sys

from .exits import EXIT_OK
from .loading import llm_from_args, sampling_params_from_args

CHAT_HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits, " \
            "Ctrl-C stops a reply"


def _read_line(prompt: str) -> str | None:
    """One line of user input, or None at end of input. A line that is not valid UTF-8 (a
    decode error, or bytes Python kept as lone surrogates) is reported and skipped: ""."""
    try:
        line = input(prompt)
        line.encode("utf-8")
        return line
    except EOFError:
        return None
    except UnicodeError:
        print("error: that line is not valid UTF-8 text; type it again", file=sys.stderr)
        return ""


def cmd_chat(args) -> int:
    params = sampling_params_from_args(args)
    llm = llm_from_args(args)
    if sys.stdin.isatty():  # only on a terminal: importing readline changes input() itself
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
