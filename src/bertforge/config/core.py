"""The mechanism every subcommand's configuration is built on: typed sections and run configs.

A `Section` is a dataclass whose fields are declared with `opt(default, help, bounds...)`;
building one coerces every field to its type (flags and YAML arrive as strings) and checks
the bounds and the section's own `check()` rules, so a component that receives only its
section can trust it and no other place re-checks a value. A `RunConfig` is a preset name
plus sections: `to_dict`/`from_dict` round-trip exactly (the run directory's saved config,
`--print-config`), and it can also be built from flat field names, the way presets and
flags name them (`ServeConfig(checkpoint_input_dir=d, sequence_length=128)`).

Two rules apply to a whole run config rather than one value and so live here, once:
- Flat field names are unique within a run config (presets are flat, flags are the field
  names with dashes), and no field is named like a section.
- Required fields (`opt(..., required=True)`: an input or output path) are checked by
  `check_required()` just before the command runs, not when the config is built, so that
  `--help` and `--print-config` work before the inputs are known.
- Aliases (`opt(None, ..., alias_of="field")`: another name for a field, kept so that the
  reference's flag and preset key still work): the alias is a field of its own, so it gets
  a flag and a line in --help like any other, with the target's type; when set it sets its
  target and then reads None again, so only the target is ever consulted (and saved with a
  value). Given both, with different values, is an error. Cost: one always-null entry per
  alias in a saved config.

Pure Python (no torch/transformers/numpy): the CLI builds its parser from these classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Union

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NONE_WORDS = {"none", "null"}


# ---------------------------------------------------------------- small helpers
def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidates, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def parse_bool(value: Any) -> bool:
    """true/false/1/0/yes/no (any case), Python bools, and the ints 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"must be a boolean (true/false/1/0/yes/no), got {value!r}")


def is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, metavar: str | None = None,
        required: bool = False, positional: bool = False, alias_of: str | None = None) -> Any:
    """A section field: its flag help, numeric bounds (checked on build), and whether the
    command needs it set before running (`required`) or takes it as a positional argument.
    `alias_of` makes it another name for that field of the same section (module docstring):
    declare it with the target's type and default None."""
    assert alias_of is None or default is None, "an alias field defaults to None (unset)"
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "metavar": metavar,
            "required": required, "positional": positional, "alias_of": alias_of}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def coerce(value: Any, hint: Any) -> Any:
    """Convert a YAML/flag/JSON value to the field type `hint`; ValueError says what was expected.

    YAML 1.1 (PyYAML) reads `1e-3` as a string and `yes` as a bool, flags arrive as strings:
    one converter for all sources keeps a preset, a flag and a saved config interchangeable.
    A list of numbers may also be written "1,4,8" (numbers hold no commas; paths may).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"only Optional[X] unions are supported, got {hint}"
        if is_none(value):
            return None
        return coerce(value, inner[0])
    if origin is Literal:
        if isinstance(value, str):
            if value in args:
                return value
            folded = {str(a).lower(): a for a in args}
            if value.lower() in folded:
                return folded[value.lower()]
        raise ValueError(f"must be one of {', '.join(map(str, args))}; got {value!r}"
                         + did_you_mean(str(value), map(str, args)))
    if origin is list:
        if isinstance(value, str) and args[0] in (int, float):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {value!r}")
        return [coerce(v, args[0]) for v in value]
    if hint is bool:
        return parse_bool(value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(f"must be a string, got {value!r}")
    raise AssertionError(f"unsupported field type {hint}")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """cls(**values) with unknown keys reported by name and did-you-mean."""
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{did_you_mean(key, known)}")
    return cls(**values)


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _out_of_bounds(value: float, meta: typing.Mapping[str, Any]) -> bool:
    return ((meta["ge"] is not None and value < meta["ge"])
            or (meta["gt"] is not None and value <= meta["gt"])
            or (meta["le"] is not None and value > meta["le"])
            or (meta["lt"] is not None and value >= meta["lt"]))


# ---------------------------------------------------------------- sections
@dataclass
class Section:
    """Base of the config sections: coerces every field to its type and checks its bounds."""

    def __post_init__(self) -> None:
        section_hints = hints(type(self))
        for f in fields(self):
            target = f.metadata.get("alias_of")
            if target is not None:
                # Aliases first, so the target's own coercion and bounds check the value.
                if not is_none(getattr(self, f.name)):
                    setattr(self, target, getattr(self, f.name))
                setattr(self, f.name, None)
        for f in fields(self):
            if f.metadata.get("alias_of") is not None:
                continue  # always None here; its hint is the target's, which None is not
            name = f"{f.name} ({flag_name(f.name)})"
            try:
                value = coerce(getattr(self, f.name), section_hints[f.name])
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            numbers = value if isinstance(value, list) else [value]
            for number in numbers:
                # No setting of this project means anything at inf or nan (`--learning-rate
                # inf` would train to an all-NaN model): refused for every number.
                if isinstance(number, float) and not math.isfinite(number):
                    raise ValueError(f"{name} must be a finite number, got {number}")
                if (isinstance(number, (int, float)) and not isinstance(number, bool)
                        and _out_of_bounds(number, f.metadata)):
                    bounds = [f"{op} {f.metadata[k]}" for k, op in _BOUNDS
                              if f.metadata[k] is not None]
                    raise ValueError(f"{name} must be {' and '.join(bounds)}, got {number}")
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between fields of this section; override in sections that have some."""

    @staticmethod
    def fail(field_name: str, message: str) -> typing.NoReturn:
        raise ValueError(f"{field_name} ({flag_name(field_name)}) {message}")


# ---------------------------------------------------------------- run configs
class _FlatKeywords(type):
    """Metaclass of RunConfig: keyword arguments named like a section's fields build that
    section, so `ServeConfig(checkpoint_input_dir=d, sequence_length=128)` works as a preset
    reads (flat) while the config stays a tree of sections."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        owner = cls.field_sections()
        flat = {k: kwargs.pop(k) for k in [k for k in kwargs if k in owner]}
        for section, section_cls in cls.section_types().items():
            own = {k: v for k, v in flat.items() if owner[k] == section}
            if own:
                assert section not in kwargs, f"give {section} as a section or as fields, not both"
                kwargs[section] = section_cls(**own)
        return super().__call__(*args, **kwargs)


@dataclass
class RunConfig(metaclass=_FlatKeywords):
    """A preset name plus sections: one subcommand's whole configuration.

    Subclasses declare their sections as fields and, when they have presets, the preset file
    (presets/<PRESET_FILE>) and its default preset. The machinery (presets, flags, saved
    configs) is shared: a subcommand only declares its sections and, where values derive
    from the run (world size), `resolve`.
    """

    PRESET_FILE: ClassVar[str] = ""
    DEFAULT_PRESET: ClassVar[str] = ""

    config: str | None = None

    @classmethod
    def section_types(cls) -> dict[str, type[Section]]:
        cls_hints = hints(cls)
        return {f.name: cls_hints[f.name] for f in fields(cls)
                if isinstance(cls_hints[f.name], type) and issubclass(cls_hints[f.name], Section)}

    @classmethod
    @functools.cache
    def field_sections(cls) -> dict[str, str]:
        """Flat field name -> section name; flat names must be unique (presets are flat)."""
        owner: dict[str, str] = {}
        top = {f.name for f in fields(cls)}
        for section, section_cls in cls.section_types().items():
            for f in fields(section_cls):
                assert f.name not in owner and f.name not in top, f"duplicate field {f.name}"
                owner[f.name] = section
        return owner

    @classmethod
    def from_flat(cls, values: dict[str, Any], *, config: str | None = None,
                  sources: dict[str, str] | None = None) -> RunConfig:
        """Build from flat field values; `sources` names where each value came from for errors."""
        owner = cls.field_sections()
        sections = cls.section_types()
        nested: dict[str, dict[str, Any]] = {name: {} for name in sections}
        for key, value in values.items():
            where = (sources or {}).get(key, "config")
            if key not in owner:
                raise ValueError(f"{where}: unknown key {key!r}{did_you_mean(key, owner)}")
            try:
                nested[owner[key]][key] = coerce(value, hints(sections[owner[key]])[key])
            except ValueError as err:
                raise ValueError(f"{where}: {key}: {err}") from None
        for section, own in nested.items():
            for f in fields(sections[section]):
                target = f.metadata.get("alias_of")
                if (target is not None and target in own and not is_none(own.get(f.name))
                        and own[f.name] != own[target]):
                    raise ValueError(f"{flag_name(f.name)} is another name for "
                                     f"{flag_name(target)} and the two disagree "
                                     f"({own[f.name]!r} vs {own[target]!r}); give only one")
        return cls(config=config, **{s: sections[s](**v) for s, v in nested.items()})

    def to_flat(self) -> dict[str, Any]:
        """Flat field name -> value, as presets and flags name them."""
        return {name: getattr(getattr(self, section), name)
                for name, section in self.field_sections().items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) for the run directory and checkpoints."""
        return {f.name: (dataclasses.asdict(v) if isinstance(v := getattr(self, f.name), Section)
                         else v) for f in fields(self)}

    def to_yaml(self) -> str:
        """to_dict as YAML, sections in declaration order (what --print-config prints)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "saved config") -> RunConfig:
        """Inverse of to_dict (exact round trip); keys missing from an older save take defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
        sections = cls.section_types()
        top = {}
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: section {key!r} must be a mapping")
                value = _build(sections[key], value, f"{where}: section {key!r}")
            top[key] = value
        return _build(cls, top, where)

    def resolve(self, world_size: int = 1) -> RunConfig:
        """A copy with derived values filled and cross-section rules checked."""
        return type(self).from_dict(self.to_dict())

    def check_required(self) -> None:
        """ValueError naming the first required field left unset (see the module docstring)."""
        for section in self.section_types():
            for f in fields(getattr(self, section)):
                if f.metadata["required"] and getattr(getattr(self, section), f.name) in (None, []):
                    what = (f.metadata["metavar"] or f.name.upper()) if f.metadata["positional"] \
                        else flag_name(f.name)
                    raise ValueError(f"{what} is required: {f.metadata['help']}")
