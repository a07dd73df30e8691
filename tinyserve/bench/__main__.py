"""``python -m tinyserve.bench SUITE [options]``: run one benchmark suite, save its JSON.

    python -m tinyserve.bench generate --max-tokens 64 --repeats 3
    python -m tinyserve.bench generate --help

Results go to ``<out>/<machine>-<suite>.json`` (default ``--out benchmarks/results``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import SUITES
from .common import add_suite_args, log, write_result

PROG = "python -m tinyserve.bench"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="tinyserve benchmarks. Suites: "
                                            + ", ".join(SUITES))
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", parser_class=_Parser)
    sub.required = True
    for name, modname in SUITES.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_suite_args(p, mod)
        p.set_defaults(module=mod)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUITES:
        print(f"error: unknown suite {argv[0]!r} (available: {', '.join(SUITES)})",
              file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    args.argv = argv
    try:
        result = args.module.run(args)
    except (ValueError, FileNotFoundError) as e:  # e.g. unknown model, bad device or dtype
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # e.g. the `gguf` package is missing on this machine
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log("interrupted: nothing saved")
        return 130
    if result is None:  # e.g. `plot`: it only redraws figures from existing results
        return 0
    path = write_result(result, args.out, result["env"]["machine"], args.suite)
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
