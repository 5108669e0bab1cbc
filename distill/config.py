"""Configuration: dataclass defaults <- YAML recipe <- command-line `key=value` overrides, validated.

Validation is OmegaConf's structured-config typing, with its errors rewritten as one line that names the key,
what was wrong, and what is allowed.
"""

import argparse
import difflib
import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from distill.errors import InputError, UnknownConfigKey

T = TypeVar("T")


def _allowed_keys(schema: Any, dotted: str) -> List[str]:
    """The keys allowed next to `dotted` in the schema (for the error message of an unknown key).

    schema is a dataclass or an instance; instances are followed through their values, so a field that
    holds a subclass of its declared type lists the subclass's keys."""
    node = schema
    for part in dotted.split(".")[:-1]:
        match = {f.name: f for f in fields(node)}.get(part) if is_dataclass(node) else None
        if match is None:
            break
        value = getattr(node, part, None) if not isinstance(node, type) else None
        node = value if is_dataclass(value) else match.type
        if not is_dataclass(node):
            break
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _explain(error: OmegaConfBaseException, schema: Any, source: str) -> InputError:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        allowed = _allowed_keys(schema, str(key))
        close = difflib.get_close_matches(str(key).split(".")[-1], allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return UnknownConfigKey(f"unknown config key '{key}' in {source}{hint}; allowed keys here: "
                                f"{', '.join(allowed)}", str(key))
    if isinstance(error, ValidationError):
        message = str(error).splitlines()[0]
        return InputError(f"config key '{key}' in {source}: {message}")
    return InputError(f"invalid config in {source}: {str(error).splitlines()[0]}")


def _section(schema: Any, dotted: str) -> Optional[Any]:
    """The section (a dataclass instance or type) that `dotted` names in the schema, or None for a value / unknown."""
    node = schema
    for part in dotted.split("."):
        match = {f.name: f for f in fields(node)}.get(part) if is_dataclass(node) else None
        if match is None:
            return None
        owner = node
        node = getattr(node, part) if not isinstance(node, type) else match.default_factory() \
            if callable(match.default_factory) else match.type
        if node is None:  # an optional section left empty (eval.dataset): its declared type
            node = _declared_section(owner, part)
    return node if is_dataclass(node) else None


def _declared_section(owner: Any, name: str) -> Optional[Any]:
    """The dataclass that field `name` of `owner` is declared to hold (Optional[X] -> X), or None."""
    import typing

    try:
        hints = typing.get_type_hints(owner if isinstance(owner, type) else type(owner))
    except Exception:  # an annotation that cannot be resolved: no section to name
        return None
    declared = hints.get(name)
    return next((t for t in (declared, *typing.get_args(declared)) if is_dataclass(t)), None)


def _check_sections(schema: Any, values: Any, source: str, prefix: str = "") -> None:
    """A value where the schema has a section of keys (objective=dinov2 for objective.name=dinov2) is one line
    naming the keys of that section."""
    items = values.items() if isinstance(values, dict) else ()
    for key, value in items:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        section = _section(schema, dotted)
        if section is None:
            continue
        if isinstance(value, dict):
            _check_sections(schema, value, source, dotted)
        elif value is not None:
            names = [f.name for f in fields(section)]
            example = f"{dotted}.name={value}" if "name" in names else f"{dotted}.path={value}" if "path" in names \
                else f"{dotted}.{names[0]}=..."
            raise InputError(f"config key '{dotted}' in {source} is a section of keys, not a value: set one of them, "
                             f"e.g. {example} (keys: {', '.join(names)})")


def _numbers(node: Any, prefix: str = ""):
    """(dotted key, value) of every float in a config: dataclass fields, lists and dicts, nested."""
    if is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in fields(node)]
    elif isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        if isinstance(node, float):
            yield prefix, node
        return
    for name, value in items:
        yield from _numbers(value, f"{prefix}.{name}" if prefix else str(name))


def load_config(
    schema: Union[Type[T], T],
    path: Optional[Union[str, Path]] = None,
    overrides: Sequence[str] = (),
) -> T:
    """Merge schema defaults, the YAML file at `path` and `overrides` ("a.b=1"), and return a typed object.

    schema is a dataclass, or an instance of one whose fields may hold subclasses of their declared types
    (their own keys are then the ones validated).
    """
    config: DictConfig = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise InputError(f"config file {path} is a folder: give a YAML recipe (e.g. configs/dino/vit_small_16_100ep.yaml)")
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:
            raise InputError(f"cannot parse {path} as YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise InputError(f"{path} holds a YAML list, not a recipe: a recipe maps keys to values (model:, data:, "
                             "optim:, train:, ...)")
        _check_sections(schema, OmegaConf.to_container(loaded), str(path))
        try:
            config = OmegaConf.merge(config, loaded)
        except OmegaConfBaseException as error:
            raise _explain(error, schema, str(path)) from None
    bad = [item for item in overrides if "=" not in item or not item.split("=", 1)[0].strip()]
    if bad:
        raise InputError(f"overrides must look like key=value, got {', '.join(bad)}")
    for item in overrides:
        key, value = item.split("=", 1)
        _check_sections(schema, {key.strip(): value or None}, "the command line")
    try:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise _explain(error, schema, "the command line") from None
    result = OmegaConf.to_object(config)
    for key, value in _numbers(result):
        if not math.isfinite(value):
            raise InputError(f"config key '{key}' is {value}: give a finite number")
    validate = getattr(result, "validate", None)
    if callable(validate):
        validate()
    return result


def save_config(config: Any, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML, so a run's folder says exactly what it ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def number(kind: Callable[[str], Any] = int, at_least: Optional[float] = None,
           above: Optional[float] = None, below: Optional[float] = None) -> Callable[[str], Any]:
    """An argparse `type` for a command-line number: finite, of `kind`, at least `at_least` or above `above`, and
    below `below`.
    Anything else is argparse's one-line usage error naming the option (exit status 2), e.g.
    "argument --batch-size: must be at least 1, got 0"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be at least {at_least}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be above {above}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {text}")
        return value

    return parse


def parse_sets(items: Sequence[str]) -> Dict[str, object]:
    """--set key=value pairs for the backbone, values read as YAML (4 -> int, true -> bool)."""
    import yaml

    bad = [item for item in items if "=" not in item]
    if bad:
        raise InputError(f"--set takes key=value, got {', '.join(bad)}")
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}
