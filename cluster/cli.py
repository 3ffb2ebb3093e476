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


def _up(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from cluster.serve import add_up_args, run_up

    add_up_args(parser)
    return run_up


def _generate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from cluster.client_cli import add_generate_args, run_generate

    add_generate_args(parser)
    return run_generate


def _demo(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from cluster.client_cli import add_demo_args, run_demo

    add_demo_args(parser)
    return run_demo


def _bench(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    from cluster.bench.cli import add_bench_args, run_bench

    add_bench_args(parser)
    return run_bench


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]] = {
    "demo": ("bring up a local cluster, stream a few requests through the SDK, shut down", _demo),
    "up": ("run a cluster (Ray + Redis + prefill/decode pools + router) until Ctrl-C", _up),
    "generate": ("send one prompt to a running cluster through the SDK", _generate),
    "make-model": ("write a random-weight checkpoint with a locally built tokenizer", _make_model),
    "offline": ("generate with the offline engine (no cluster)", _offline),
    "bench": ("measure: engine throughput (vs transformers), step latency vs hardware limits, serving goodput, "
              "KV handoff",
              _bench),
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
