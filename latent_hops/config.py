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
from typing import Any, Literal

from latent_hops.errors import InputError


def option(default: Any, help: str, flag: str | None = None, runtime: bool = False) -> Any:
    """A config field that is also a CLI option (``--field-name``, or ``flag``).

    ``runtime`` fields (batch sizes, memory budgets) change how fast a table is made, not
    what it holds: they are left out of its provenance."""
    return field(default=default, metadata={"help": help, "flag": flag, "runtime": runtime})


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


def config_from_dict(cls: type, values: dict) -> Any:
    """A config rebuilt from a table's recorded provenance (lists back to tuples; fields
    it cannot rebuild keep their defaults)."""
    hints = typing.get_type_hints(cls)
    kept = {}
    for f in dataclasses.fields(cls):
        if f.name in values and _simple(hints[f.name]):
            v = values[f.name]
            kept[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kept)


def _simple(hint: Any) -> bool:
    args = typing.get_args(hint) or (hint,)
    return all(
        a in (int, float, str, bool, type(None), Ellipsis)
        or typing.get_origin(a) is Literal
        or (typing.get_origin(a) is tuple and _simple(a))
        for a in args
    )


@dataclass(frozen=True)
class Option:
    """A CLI option made from a config field."""

    field: str  # the config field it sets
    flag: str
    dest: str
    default: Any
    help: str
    kind: Any  # the field's type

    @property
    def is_flag(self) -> bool:
        return self.kind is bool

    def parse(self, text: Any) -> Any:
        """The field's value from the option's text (or a config file's value)."""
        return _parse(self.kind, text, self.flag)


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
