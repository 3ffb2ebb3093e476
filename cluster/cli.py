"""The `pdserve` command: one subcommand per job, each handled in its own module (imported lazily)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _make_model(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from cluster.engine.make_model import add_make_model_args, run_make_model

    add_make_model_args(parser)
    return run_make_model


def _offline(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from cluster.offline_demo import add_offline_args, run_offline

    add_offline_args(parser)
    return run_offline


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {
    "make-model": ("write a random-weight checkpoint with a locally built tokenizer", _make_model),
    "offline": ("generate with the offline engine (no cluster)", _offline),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (help_text, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only import what this run needs
            handlers[name] = setup(p)
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
