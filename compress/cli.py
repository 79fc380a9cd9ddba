"""The ``tensornets`` command.

``tensornets demo`` runs the core demo (every format on a real MiniLM weight). The console
script lives in ``compress`` because ``tensornets`` (the core) imports neither ``compress`` nor
``adapters``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="tensornets", description="tensor-network layers, compression and adapters")
    parser.add_argument("command", choices=["demo"], help="demo: decompose a real MiniLM weight in every format")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from tensornets.demo import main as demo_main

        demo_main(argv[1:])


if __name__ == "__main__":
    main()
