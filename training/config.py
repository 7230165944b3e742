"""Training configs: a YAML or TOML file read into nested dataclasses.

Each training script declares its config as dataclasses whose field defaults are the documented defaults; a file
gives only what it changes. A key the dataclass does not have is an error that names the key (typos never pass
silently), and so is a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import re
import pathlib
import tomllib
import types
import typing
from typing import Any, Literal, Optional, Union

T = typing.TypeVar("T")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """The ``train:`` keys every step-loop script shares (:mod:`.loop`); a script's ``TrainConfig`` subclasses it,
    redeclaring the defaults it changes and adding its own keys."""
    output_dir: str
    name: str = "run"                    # names the exported files
    max_steps: int = 10000
    batch_size: int = 1                  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1.0e-4
    weight_decay: float = 0.01
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None  # null: accelerate's config
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500          # resumable checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2            # newest checkpoints kept (0: all)
    tensorboard: bool = True             # also log to TensorBoard (output_dir/logs) if tensorboard is installed


@dataclasses.dataclass(kw_only=True)
class AdamConfig:
    """AdamW's moments (the learning rate and weight decay are :class:`RunConfig`'s)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8


STEP_COUNTS = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every")


def check_train(train, named: bool = True) -> None:
    """The ``train:`` checks every script shares: a one-word run name (it names the output files) and step counts of
    at least 1."""
    if named and not re.fullmatch(r"[A-Za-z0-9_.-]+", train.name):
        raise ConfigError(f"train.name: {train.name!r} must be one word of letters, digits, '_-.'")
    for key in STEP_COUNTS:
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}: at least 1")


def read_file(path) -> dict:
    """The top-level mapping of a ``.yaml``/``.yml`` or ``.toml`` file."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    else:
        raise ConfigError(f"{path}: a config is a .yaml, .yml or .toml file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must hold a mapping of sections, found {type(data).__name__}")
    return data


def load(path, cls: type[T]) -> T:
    """``cls`` (a dataclass) filled from the file at ``path``; relative paths stay as written."""
    return from_dict(cls, read_file(path), where=f"{path}: ")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """``cls(**data)`` recursively, checking keys and value types; ``where`` prefixes error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip(': ') or 'config'}: expected a mapping of keys, found {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = where if where.endswith(": ") or not where else where + "."
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; {cls.__name__} has {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    return cls(**values)


def to_dict(obj) -> dict:
    """The plain mapping of a config dataclass (for saving a run's resolved config)."""
    return dataclasses.asdict(obj)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _show(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {_show(value)} fits none of the allowed types")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, found {_show(value)}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, found {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, found {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-5 as a string; 1.0e-5 is a number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, found {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, found {_show(value)}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")
