"""The name each algorithm answers to in a YAML recipe (``algorithms: {fff: {...}}``), declared next to the class by
the package that defines it: ``@yaml_name("fff")``. The runner's registry (``algos.run.components``) reads them all;
adding an algorithm needs no edit there."""

from __future__ import annotations

YAML_NAMES: dict[str, type] = {}


def yaml_name(name: str):
    """Class decorator: register ``cls`` under ``name`` for YAML recipes (one class per name)."""

    def register(cls: type) -> type:
        taken = YAML_NAMES.get(name)
        same = taken is not None and (taken.__module__, taken.__qualname__) == (cls.__module__, cls.__qualname__)
        if taken is not None and not same:  # the same class again is a reloaded module: allowed
            raise ValueError(f"YAML name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
        YAML_NAMES[name] = cls
        return cls

    return register
