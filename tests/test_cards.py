"""The method cards' argument tables say what the code does: every argument a table lists exists, with the default the
table gives (the settings are declared once, on the config dataclasses; a card is checked against them)."""

import ast
import inspect
import re
from pathlib import Path

import pytest

import algos

ROOT = Path(__file__).resolve().parents[1]
CARDS = {"factorize": [algos.Factorize], "fff": [algos.FFFReplace], "fnet": [algos.FNetMixing],
         "heal": [algos.distill, algos.SelfDistillation]}  # teacher: the Composer form's (None)
REQUIRED = ("(required)", "-")


def argument_rows(card: Path) -> list[tuple[list[str], list[str]]]:
    """(names, default cells) of each row of the card's ``| argument | default | meaning |`` table."""
    rows, inside = [], False
    for line in card.read_text().splitlines():
        if line.startswith("| argument | default |"):
            inside = True
        elif inside and not line.startswith("|"):
            inside = False
        elif inside and not line.startswith("|---"):
            names_cell, default_cell = line.split(" | ")[:2]
            names = re.findall(r"`(\w+)`", names_cell)
            separator = " / " if " / " in names_cell else ", "
            defaults = [cell.strip() for cell in default_cell.split(separator)]
            rows.append((names, defaults if len(defaults) == len(names) else defaults * len(names)))
    return rows


def literal(cell: str):
    """The value a default cell states: its first token (``None (0.25)`` -> None, ``"svd"`` -> 'svd', ``1e-3``)."""
    token = cell.replace("`", "").split(" (")[0].strip()
    try:
        return ast.literal_eval(token)
    except (ValueError, SyntaxError):
        return cell  # a description (e.g. "HF config's max_position_embeddings"): the code's default is None


@pytest.mark.parametrize("package", CARDS)
def test_every_argument_in_a_method_card_has_the_codes_default(package):
    parameters = {}
    for function in CARDS[package]:
        parameters.update(inspect.signature(function).parameters)
    rows = argument_rows(ROOT / "algos" / package / "README.md")
    assert len(rows) >= 8
    for names, defaults in rows:
        for name, cell in zip(names, defaults, strict=True):
            assert name in parameters, f"{package} card lists {name!r}, which the code does not take"
            default = parameters[name].default
            if cell in REQUIRED:
                assert default is inspect.Parameter.empty, f"{name}: the card says required, the code {default!r}"
                continue
            stated = literal(cell)
            if isinstance(stated, str) and stated == cell and not cell.startswith(('"', "`\"")):
                assert default is None, f"{name}: the card describes {cell!r}, the code's default is {default!r}"
            else:
                assert stated == default and type(stated) is type(default), \
                    f"{package} card: {name} = {cell!r}, the code's default is {default!r}"
