"""``python -m algos.run BASE.yaml [RECIPE.yaml ...] [key=value ...]`` is ``algos run``; it is the form Composer's
launcher takes for multi-process (DDP) training: ``composer -n 2 -m algos.run yamls/digits_mlp.yaml ...``."""

from algos.cli import run_command

if __name__ == "__main__":
    import sys

    run_command("run", sys.argv[1:])
