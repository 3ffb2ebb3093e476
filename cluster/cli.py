"""The `pdserve` command: one subcommand per job, each handled in its own module (imported lazily)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in `--help`, except where there is none to show (None: "the config file's")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr (the flag and why), not the whole usage block."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """Options without help text still show their default in `--help`."""
        default = kwargs.get("default")
        if "help" not in kwargs and not any(default is v for v in (None, False, argparse.SUPPRESS)):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _is_user_error(exc: BaseException) -> bool:
    """Errors that tell the user what to fix (bad input, a port in use, nothing listening): one line, no
    traceback. The SDK's typed errors count too (`pdserve generate` with nothing running)."""
    if isinstance(exc, ValueError | OSError | RuntimeError):
        return True
    errors = sys.modules.get("pdserve.errors")
    return errors is not None and isinstance(exc, errors.PdserveError)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="pdserve", description="Disaggregated prefill/decode LLM serving",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pdserve {_version()}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    try:
        return _run(parser, sub, wanted, argv)
    except ModuleNotFoundError as e:  # the wrong Python: one without pdserve's dependencies
        if "--debug" in argv:
            raise
        print(f"pdserve {wanted}: error: the Python package {e.name!r} is not installed in {sys.executable}; run "
              "pdserve with the Python it was installed into (e.g. .venv/bin/python) or install it there "
              "(pip install -e .)", file=sys.stderr)
        return 2


def _run(parser: Parser, sub: argparse._SubParsersAction, wanted: str | None, argv: list[str]) -> int:
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, (help_text, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == wanted:  # only import what this run needs
            handlers[name] = setup(p)
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug or not _is_user_error(e):
            raise
        print(f"pdserve {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (`--debug` shows the traceback)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{text} (--debug shows the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())
