"""Command-line flags generated from the typed config sections (bertforge pretrain / squad).

One `--flag-name` per section field (dashes for underscores, help and bounds from the field's
metadata), every flag defaulting to SUPPRESS so that only flags actually given override the
chosen preset; plus a parser class whose subcommands answer a mistyped flag with a
did-you-mean. Kept apart from config.py, which owns the sections, presets and validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import fields
from typing import Any, Literal, Union

from bertforge.config import (PretrainConfig, RunConfig, _hints, coerce, default_preset_file,
                              did_you_mean, flag_name, load_config, load_presets)


class DidYouMeanParser(argparse.ArgumentParser):
    """ArgumentParser whose leaf (sub)parsers reject unknown arguments with a did-you-mean.

    Plain argparse lets a subparser hand unknown flags up to the top-level parser, which then
    says only "unrecognized arguments". Subparsers made from this class (add_subparsers uses
    the parent's class) fail at the leaf instead, where the valid flags are known; exit code 2
    as argparse. The price: parse_known_args on a leaf parser no longer returns leftovers.
    """

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001 (argparse signature)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            options = [s for s in self._option_string_actions if s.startswith("--")]
            hints = [did_you_mean(a.split("=", 1)[0], options) for a in extras
                     if a.startswith("-")]
            self.error("unrecognized arguments: " + " ".join(extras) + "".join(hints))
        return namespace, extras


def _arg_type(hint: Any) -> typing.Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return coerce(text, hint)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(hint, "__name__", "value")
    return convert


def add_config_arguments(parser: argparse.ArgumentParser,
                         cls: type[RunConfig] = PretrainConfig) -> None:
    """--config NAME, --config-file PATH and one flag per section field (all default SUPPRESS)."""
    parser.allow_abbrev = False  # a prefix of one flag must not silently mean that flag
    if parser.usage is None:
        parser.usage = "%(prog)s [--config NAME] [--config-file PATH] [--FLAG VALUE ...]"
    preset_file = default_preset_file(cls)
    try:
        names = ", ".join(load_presets(preset_file))
    except (FileNotFoundError, ValueError):
        names = f"see {preset_file}"
    group = parser.add_argument_group(
        "preset", "A flag's '(default: X)' below is the built-in value; the chosen preset may "
        "set another, and a flag given on the command line beats both.")
    group.add_argument("--config", default=argparse.SUPPRESS, metavar="NAME",
                       help=f"preset (default: {cls.DEFAULT_PRESET}); flags given override it. "
                            f"Presets: {names}")
    group.add_argument("--config-file", default=argparse.SUPPRESS, metavar="PATH",
                       help=f"YAML file of presets (default: {preset_file})")
    for section, section_cls in cls.section_types().items():
        doc = (section_cls.__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(section, doc)
        hints = _hints(section_cls)
        for f in fields(section_cls):
            hint = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata.get("help", "")
            if "default" not in text:
                text += f" (default: {default})"
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
            base = hint
            if typing.get_origin(hint) in (Union, types.UnionType):
                base = next(a for a in typing.get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is list:
                kwargs.update(nargs="+", type=_arg_type(typing.get_args(hint)[0]))
            elif hint is bool:
                kwargs.update(nargs="?", const=True, type=_arg_type(bool), metavar="BOOL")
            else:
                kwargs.update(type=_arg_type(hint),
                              metavar={int: "N", float: "X"}.get(base, "TEXT"))
            if typing.get_origin(base) is Literal:
                kwargs["metavar"] = "{" + ",".join(typing.get_args(base)) + "}"
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
            group.add_argument(flag_name(f.name), **kwargs)


def config_from_args(args: argparse.Namespace,
                     cls: type[RunConfig] = PretrainConfig) -> RunConfig:
    """defaults <- --config preset <- the flags actually given (not resolved)."""
    given = vars(args)
    overrides = {k: given[k] for k in cls.field_sections() if k in given}
    return load_config(given.get("config"), overrides, preset_file=given.get("config_file"),
                       cls=cls)
