"""Config dataclasses that are also command lines: ``option`` fields become CLI options.

Every analysis (and the evaluation) has a frozen config dataclass. A field made with
``option(default, help)`` is a CLI option (``--field-name``), parsed from its type
(ints, floats, strings, booleans, comma-separated tuples, ``Literal`` choices, and layer
grids: ``tuple[int, ...] | str | None``); ``runtime`` fields (batch sizes, progress bars)
change how fast a table is made, not what it holds, and stay out of its provenance.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from latent_hops.errors import InputError

T = TypeVar("T")


def option(
    default: Any,
    help: str,
    flag: str | None = None,
    runtime: bool = False,
    minimum: int | None = None,
) -> Any:
    """A config field that is also a CLI option (``--field-name``, or ``flag``).

    ``runtime`` fields (batch sizes, memory budgets) change how fast a table is made, not
    what it holds: they are left out of its provenance. ``minimum`` bounds a count (a
    negative ``--max-new-tokens`` is an error, not an empty generation)."""
    metadata = {"help": help, "flag": flag, "runtime": runtime, "minimum": minimum}
    return field(default=default, metadata=metadata)


def runtime(default: Any = None) -> Any:
    """A config field that is not a CLI option and does not change the table (progress bars)."""
    return field(default=default, metadata={"runtime": True})


def provenance_config(config: Any) -> dict:
    """A config's fields that decide a table's rows (runtime fields left out)."""
    return {
        f.name: _plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if not f.metadata.get("runtime")
    }


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """A config rebuilt exactly from the plain values of its fields (``dataclasses.asdict``,
    or a table's recorded provenance, which lacks only the runtime fields):
    ``config_from_dict(C, asdict(c)) == c`` for every config. A field it does not know, or a
    value it cannot rebuild, raises ``InputError`` (never a silently different config)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{cls.__name__}: unknown fields {unknown}")
    kwargs = {
        name: _rebuild(hints[name], value, f"{cls.__name__}.{name}")
        for name, value in values.items()
    }
    return cls(**kwargs)


def _rebuild(hint: Any, value: Any, where: str) -> Any:
    """``value`` (plain: lists for tuples, dicts for dataclasses) as a value of ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _rebuild(arg, value, where)
            except InputError:
                continue
        raise InputError(f"{where}: cannot rebuild {value!r} as {hint}")
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_rebuild(args[0], v, where) for v in value)
        if len(args) == len(value):
            return tuple(_rebuild(a, v, where) for a, v in zip(args, value))
    elif origin is Literal:
        if value in args:
            return value
    elif origin is dict and isinstance(value, dict):
        return dict(value)
    elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return config_from_dict(hint, value)
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is str and isinstance(value, str):
        return value
    raise InputError(f"{where}: cannot rebuild {value!r} as {hint}")


@dataclass(frozen=True)
class Option:
    """A CLI option made from a config field."""

    field: str  # the config field it sets
    flag: str
    dest: str
    default: Any
    help: str
    kind: Any  # the field's type
    minimum: int | None = None

    @property
    def is_flag(self) -> bool:
        return self.kind is bool

    @property
    def is_layer_grid(self) -> bool:
        """A layer grid (``tuple[int, ...] | str | None``): checked against the model's layers
        once the model is loaded (``Run``), before anything runs."""
        args = typing.get_args(self.kind)
        return str in args and any(typing.get_origin(a) is tuple for a in args)

    def parse(self, text: Any) -> Any:
        """The field's value from the option's text (or a config file's value), checked
        against the field's minimum."""
        value = _parse(self.kind, text, self.flag)
        check_minimum(self.flag, value, self.minimum)
        return value


def check_minimum(flag: str, value: Any, minimum: int | None) -> None:
    """A count below its minimum is an input error (``--max-cases -1`` is not pandas'
    ``head(-1)``)."""
    if minimum is not None and isinstance(value, (int, float)) and not value >= minimum:  # NaN too
        raise InputError(f"{flag} must be >= {minimum}, got {value}")


def options(config_type: type) -> list[Option]:
    hints = typing.get_type_hints(config_type)
    out = []
    for f in dataclasses.fields(config_type):
        if "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        out.append(
            Option(
                f.name,
                flag,
                flag[2:].replace("-", "_"),
                f.default,
                f.metadata["help"],
                hints[f.name],
                f.metadata.get("minimum"),
            )
        )
    return out


def _parse(kind: Any, text: Any, flag: str) -> Any:
    if text is None or not isinstance(text, str):
        return text
    args, origin = typing.get_args(kind), typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        if text.strip().lower() in ("", "none") and type(None) in args:
            return None
        if str in args:  # e.g. a layer grid spec: the library parses it
            return text
        return _parse(next(a for a in args if a is not type(None)), text, flag)
    if origin is tuple:
        return tuple(_parse(args[0], v.strip(), flag) for v in text.split(",") if v.strip())
    if origin is Literal:
        if text not in args:
            raise InputError(f"{flag}: choose from {', '.join(map(str, args))}, got {text!r}")
        return text
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise InputError(
            f"{flag} expects {getattr(kind, '__name__', kind)}, got {text!r}"
        ) from None


def config_from_options(config_type: type, values: dict[str, Any], **fixed: Any) -> Any:
    """A config from parsed CLI values (keyed by option dest) plus ``fixed`` fields
    (``batch_size``, ``progress``) that the config has."""
    names = {f.name for f in dataclasses.fields(config_type)}
    kwargs = {k: v for k, v in fixed.items() if k in names}
    for opt in options(config_type):
        if opt.dest in values:
            kwargs[opt.field] = opt.parse(values[opt.dest])
    return config_type(**kwargs)
