"""The ``algos`` command."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "offline quick-start on bundled real data (scikit-learn digits)"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        choices = "; ".join(f"{name}: {what}" for name, what in COMMANDS.items())
        given = f"unknown command {argv[0]!r}. " if argv and argv[0] not in ("-h", "--help") else ""
        sys.exit(f"usage: algos COMMAND [options]. {given}Commands: {choices}")
    if argv[0] == "demo":
        from algos.demo import main as demo

        demo(argv[1:])


if __name__ == "__main__":
    main()
