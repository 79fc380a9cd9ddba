"""The ``tensornets`` command.

- ``tensornets compress [flags]`` -- the main job (:mod:`compress.main_job`): compress a causal LM (default: the
  embedded SmolLM2-135M), compensate with EoRA, print perplexities, parameters and time per stage.
- ``tensornets demo`` -- the core demo (every tensor format on a real MiniLM weight).

The console script lives in ``compress`` because ``tensornets`` (the core) imports neither ``compress`` nor
``adapters``. :func:`main` takes an ``argv`` list, so ``main(["compress", "--help"])`` works from Python and tests.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "compress": "compress a causal LM (default: embedded SmolLM2-135M), compensate with EoRA, report perplexity",
    "demo": "decompose a real MiniLM weight in every tensor format",
}


def main(argv: list[str] | None = None) -> None:
    """Run ``tensornets <command> [flags]``; ``argv`` defaults to ``sys.argv[1:]``.

    Returns ``None`` (the console script's exit status is 0); bad flags raise ``SystemExit(2)`` with a message on
    stderr, as argparse does.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="tensornets", description="tensor-network layers, compression and adapters",
        epilog="run `tensornets <command> --help` for the flags of a command",
    )
    parser.add_argument("command", choices=list(COMMANDS),
                        help="; ".join(f"{name}: {text}" for name, text in COMMANDS.items()))
    args = parser.parse_args(argv[:1])
    if args.command == "compress":
        from compress.main_job import main as compress_main
        from compress.memory import return_freed_memory

        return_freed_memory()
        compress_main(argv[1:])
    elif args.command == "demo":
        from tensornets.demo import main as demo_main

        demo_main(argv[1:])


if __name__ == "__main__":
    main()
