"""Save a surgered model as safetensors plus a JSON record of its surgery, and load it back into a model built as
before surgery, without unpickling anything.

``save_pretrained(model, directory)`` writes
* ``model.safetensors``: every weight (``safetensors.torch.save_model``, which also handles tied weights);
* ``algos_surgery.json``: the format version and, for each module a surgery put in, its name, the algorithm and a
  *spec*: its registered class name and the settings and shapes that rebuild it (ranks, tree depth / leaf width /
  node variant, mixing settings, ...), children as specs of their own;
* for a Hugging Face model, its ``config.json``: ``AutoModel...from_pretrained(directory)`` builds the model as
  before surgery (reporting the surgered weights it does not know), and ``from_pretrained`` makes it the saved one.

``from_pretrained(base_model, directory)`` builds each recorded module from its spec, checks the weights file's names
and shapes against the model those modules would make (on a weightless copy), then swaps them in and loads the
weights. Any mismatch (a module the base model lacks, an unknown class, a missing, extra or misshapen tensor, a newer
format) is a one-line ``PretrainedError`` naming it, with the base model unchanged. Neither ``torch.load`` nor
``pickle`` is called: a spec can only build the classes registered here.

Why by hand: safetensors stores tensors only, and Hugging Face's ``save_pretrained`` rebuilds a model from its own
config class, which knows nothing of modules a surgery put in. Each algorithm registers its module classes
(``SPECS.register``) from its own folder; the core registers the torch modules they hold.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
from torch import nn

from algos.surgery.replace import replace_modules
from algos.surgery.skeleton import meta_copy
from algos.surgery.targets import SURGERY_MARKER, converted_by

FORMAT, VERSION = "algos-surgery", 1
RECORD_FILE, WEIGHTS_FILE, HF_CONFIG_FILE = "algos_surgery.json", "model.safetensors", "config.json"

ToSpec = Callable[[nn.Module, Callable[[nn.Module], dict]], dict]  # (module, spec_of child) -> settings
FromSpec = Callable[[dict, Callable[[dict], nn.Module]], nn.Module]  # (settings, build child) -> module


class PretrainedError(ValueError):
    """A directory that cannot be saved to or loaded from as asked: one line naming the file, module or tensor."""


@dataclass(frozen=True)
class _Entry:
    cls: type[nn.Module]
    to_spec: ToSpec
    from_spec: FromSpec


class ModuleSpecs:
    """Registered module classes, by a stable name: how each becomes a JSON spec and is built back from one. The
    class must match exactly (a subclass has behaviour of its own, so it needs its own entry)."""

    def __init__(self):
        self._by_name: dict[str, _Entry] = {}
        self._by_class: dict[type, str] = {}

    def register(self, name: str, cls: type[nn.Module], to_spec: ToSpec, from_spec: FromSpec) -> None:
        self._by_name[name] = _Entry(cls, to_spec, from_spec)
        self._by_class[cls] = name

    def spec(self, module: nn.Module, where: str = "") -> dict:
        name = self._by_class.get(type(module))
        if name is None:
            raise PretrainedError(f"cannot save {where or 'a module'}: {type(module).__qualname__} has no spec "
                                  f"(registered: {', '.join(sorted(self._by_name))})")
        return {"class": name, **self._by_name[name].to_spec(module, lambda child: self.spec(child, where))}

    def build(self, spec: dict, where: str = "") -> nn.Module:
        entry = self._by_name.get(spec.get("class")) if isinstance(spec, dict) else None
        if entry is None:
            shown = spec.get("class") if isinstance(spec, dict) else spec
            raise PretrainedError(f"{where or 'a module'}: unknown module class {shown!r} (known: "
                                  f"{', '.join(sorted(self._by_name))}); was it saved by a newer algos?")
        settings = {key: value for key, value in spec.items() if key != "class"}
        try:
            return entry.from_spec(settings, lambda child: self.build(child, where))
        except PretrainedError:
            raise
        except (TypeError, ValueError, KeyError) as error:
            raise PretrainedError(f"{where or 'a module'}: its {spec['class']} spec does not build "
                                  f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


SPECS = ModuleSpecs()


def _register_torch_modules() -> None:
    """The torch modules the suite's rewrites hold or put in (children and companions)."""
    SPECS.register("Identity", nn.Identity, lambda m, spec: {}, lambda s, build: nn.Identity())
    SPECS.register("Dropout", nn.Dropout, lambda m, spec: {"p": m.p}, lambda s, build: nn.Dropout(s["p"]))
    SPECS.register("Linear", nn.Linear,
                   lambda m, spec: {"in_features": m.in_features, "out_features": m.out_features,
                                    "bias": m.bias is not None},
                   lambda s, build: nn.Linear(s["in_features"], s["out_features"], bias=s["bias"]))
    SPECS.register("LayerNorm", nn.LayerNorm,
                   lambda m, spec: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                    "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None},
                   lambda s, build: nn.LayerNorm(s["normalized_shape"], eps=s["eps"],
                                                 elementwise_affine=s["elementwise_affine"], bias=s["bias"]))
    SPECS.register("Sequential", nn.Sequential, lambda m, spec: {"modules": [spec(child) for child in m]},
                   lambda s, build: nn.Sequential(*(build(child) for child in s["modules"])))


_register_torch_modules()


def surgered_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, algorithm, module)`` of every module a surgery put into ``model`` (outermost only)."""
    found: list[tuple[str, str, nn.Module]] = []
    for fqn, module in model.named_modules():
        if fqn and converted_by(module) and not any(fqn.startswith(f"{outer}.") for outer, _, _ in found):
            found.append((fqn, converted_by(module), module))
    return found


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model``'s weights (safetensors) and its surgery record (JSON), and a Hugging Face model's config, into
    ``directory``; returns it.

    A directory with other files in it is refused unless ``overwrite=True``, which replaces only the files written
    here (each written whole under a temporary name, then renamed); nothing else in it is touched."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PretrainedError(f"save_pretrained: {str(directory)!r} is a file, not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise PretrainedError(f"save_pretrained: {str(directory)!r} is not empty; pass overwrite=True to replace "
                              f"its {RECORD_FILE} and {WEIGHTS_FILE} (nothing else in it is touched)")
    record = {"format": FORMAT, "version": VERSION, "modules": [
        {"name": fqn, "algorithm": algorithm, "module": SPECS.spec(module, f"module {fqn!r}")}
        for fqn, algorithm, module in surgered_modules(model)]}  # every spec first: an error writes nothing
    directory.mkdir(parents=True, exist_ok=True)
    # {"format": "pt"}: what Hugging Face's loaders require of a safetensors file
    _write_whole(directory / WEIGHTS_FILE,
                 lambda path: safetensors.torch.save_model(model, path, metadata={"format": "pt"}))
    _write_whole(directory / RECORD_FILE, lambda path: Path(path).write_text(json.dumps(record, indent=2)))
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_file"):  # a Hugging Face model: its config too, so that it builds from the folder
        _write_whole(directory / HF_CONFIG_FILE, config.to_json_file)
    return directory


def from_pretrained(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild the recorded surgery on ``base_model`` (built as the saved model was before surgery, any weights)
    and load the saved weights; returns ``base_model``, rewritten in place. Errors leave it unchanged."""
    directory = Path(directory)
    record = _read_record(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise PretrainedError(f"from_pretrained: {str(weights)!r} is missing")
    modules = {fqn for fqn, _ in base_model.named_modules()}
    built: dict[str, nn.Module] = {}
    for entry in record["modules"]:
        fqn, algorithm = entry.get("name"), entry.get("algorithm")
        if fqn not in modules:
            raise PretrainedError(f"from_pretrained: the base model has no module {fqn!r} (where {algorithm} put a "
                                  f"{entry.get('module', {}).get('class')}); build the model the saved one was made "
                                  f"from")
        built[fqn] = SPECS.build(entry["module"], f"module {fqn!r}")
        setattr(built[fqn], SURGERY_MARKER, algorithm)  # as the surgery marked it: applying it again skips it
    _check_weights(base_model, built, weights)
    originals = {fqn: base_model.get_submodule(fqn) for fqn in built}
    replace_modules(base_model, built)
    try:
        safetensors.torch.load_model(base_model, weights, strict=True)
    except Exception as error:
        replace_modules(base_model, originals)
        raise PretrainedError(f"from_pretrained: {str(weights)!r} does not load: "
                              f"{str(error).strip().splitlines()[0]}") from None
    return base_model


def _read_record(directory: Path) -> dict:
    path = directory / RECORD_FILE
    if not path.is_file():
        raise PretrainedError(f"from_pretrained: {str(path)!r} is missing; save with algos.save_pretrained")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PretrainedError(f"from_pretrained: {str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("modules"), list):
        raise PretrainedError(f"from_pretrained: {str(path)!r} is not an algos surgery record")
    version = record.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise PretrainedError(f"from_pretrained: {str(path)!r} has format version {version!r}; this algos reads up "
                              f"to version {VERSION}: upgrade algos to load it")
    return record


def _check_weights(base_model: nn.Module, built: dict[str, nn.Module], weights: Path) -> None:
    """The weights file holds exactly the tensors (names and shapes) of ``base_model`` with ``built`` swapped in, up
    to tied weights, which the file holds once under one of their names. Checked on weightless copies."""
    skeleton = meta_copy(base_model)
    replace_modules(skeleton, {fqn: meta_copy(module) for fqn, module in built.items()})
    expected: dict[int, tuple[list[str], tuple]] = {}  # one entry per tensor, with all the names it goes by
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        expected.setdefault(id(tensor), ([], tuple(tensor.shape)))[0].append(name)
    try:
        with safetensors.safe_open(weights, framework="pt") as saved:
            shapes = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
        raise PretrainedError(f"from_pretrained: {str(weights)!r} is not a readable safetensors file "
                              f"({str(error).strip().splitlines()[0]})") from None
    known = set()
    for names, shape in expected.values():
        present = [name for name in names if name in shapes]
        if not present:
            raise PretrainedError(f"from_pretrained: {str(weights)!r} has no tensor {names[0]!r} (shape "
                                  f"{list(shape)}) that the model needs")
        for name in present:
            if shapes[name] != shape:
                raise PretrainedError(f"from_pretrained: tensor {name!r} in {str(weights)!r} has shape "
                                      f"{list(shapes[name])}, the model needs {list(shape)}")
        known.update(names)
    extra = sorted(set(shapes) - known)
    if extra:
        raise PretrainedError(f"from_pretrained: {str(weights)!r} holds {len(extra)} tensor(s) the model does not "
                              f"have (e.g. {extra[0]!r}); load it into the model it was saved from")


def _write_whole(path: Path, write: Callable[[str], None]) -> None:
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
