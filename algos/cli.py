"""The ``algos`` command: ``run``, ``compare`` and ``inspect`` YAML recipes, and the scripted ``demo``."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "run": "train BASE.yaml [RECIPE.yaml ...] [key=value ...] and print a summary",
    "compare": "baseline plus one run per recipe: table, JSON/CSV and a plot",
    "inspect": "print the surgery report of BASE.yaml [RECIPE.yaml ...] without training",
    "export": "RUN_DIR_OR_CHECKPOINT OUT_DIR: the trained network as safetensors + a JSON surgery record "
              "(load with algos.from_pretrained)",
    "demo": "scripted Factorize-in-mid-training and resume check on the digits",
}


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """YAML files and ``key=value`` overrides (any order); ``compare`` also takes --out and --overwrite, anywhere."""
    parser = argparse.ArgumentParser(prog=f"algos {command}", description=COMMANDS[command])
    parser.add_argument("items", nargs="*", metavar="FILE.yaml | key=value")
    if command == "compare":
        parser.add_argument("--out", default="runs/compare", help="folder for the runs and the comparison")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder's runs")
    args = parser.parse_intermixed_args(argv)  # options anywhere, also between or after the items
    args.overrides = [item for item in args.items if "=" in item]
    args.paths = [item for item in args.items if "=" not in item]
    return args


def load(args: argparse.Namespace):
    from algos.run.build import default_name
    from algos.run.config import load_config

    config = load_config(args.paths, args.overrides)
    if not config.run.name:
        config.run.name = default_name(args.paths)
    return config


def run_command(command: str, argv: list[str]) -> None:
    from algos.run.registry import ConfigError

    if command == "export":
        parser = argparse.ArgumentParser(prog="algos export", description=COMMANDS["export"])
        parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
        parser.add_argument("out", metavar="OUT_DIR")
        parser.add_argument("--overwrite", action="store_true", help="replace the two files in a non-empty OUT_DIR")
        args = parser.parse_args(argv)
        try:
            from algos.run.export import export

            print(f"wrote {export(args.source, args.out, overwrite=args.overwrite)}: load it with "
                  f"algos.from_pretrained(network_built_as_before_surgery, {args.out!r})")
        except ConfigError as error:
            sys.exit(f"algos export: {error}")
        return
    args = parse(command, argv)
    try:
        if command == "run":
            from algos.run.runner import run

            run(load(args), show_config=True)
        elif command == "inspect":
            from algos.run.inspection import inspect_config

            print(inspect_config(load(args)))
        else:
            from algos.run.compare import compare

            compare(args.paths, args.overrides, out=args.out, overwrite=args.overwrite)
    except ConfigError as error:
        sys.exit(f"algos {command}: {error}")
    except KeyboardInterrupt:  # Ctrl-C: the runner has said what is kept and how to continue
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        choices = "; ".join(f"{name}: {what}" for name, what in COMMANDS.items())
        given = f"unknown command {argv[0]!r}. " if argv and argv[0] not in ("-h", "--help") else ""
        sys.exit(f"usage: algos COMMAND [options]. {given}Commands: {choices}")
    if argv[0] == "demo":
        from algos.demo import main as demo

        demo(argv[1:])
    else:
        run_command(argv[0], argv[1:])


if __name__ == "__main__":
    main()
