"""Command-line flags generated from a run config's sections, for every bertforge subcommand.

One `--flag-name` per section field (dashes for underscores; help, metavar and choices from
the field), or a positional argument for fields declared `positional`. Every flag defaults
to SUPPRESS, so only flags actually given override the chosen preset, never an argparse
default. Booleans take `--flag [BOOL]` (bare: true) and `--no-flag`. Lists take several
values, repeat (`--benchmark a --benchmark b`), and lists of numbers also `1,4,8`.

`--help` shows the value the chosen preset gives: cli.py reads `--config`/`--config-file`
from argv before it builds the parser (`requested_preset`) and passes them here, so
`bertforge pretrain --config demo_sample_128 --help` lists that preset's learning rate as
the default. `--print-config` (every subcommand) prints the resolved config as YAML and
exits. The parser class answers a mistyped flag with a did-you-mean. Type conversion is the
sections' (coerce); bounds and rules are checked only when the sections are built.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields
from typing import Any, Literal, Union

from bertforge.config import (PretrainConfig, RunConfig, coerce, default_preset_file,
                              did_you_mean, flag_name, load_config, load_presets, preset_layers)
from bertforge.config.core import field_default, hints

# Parser destinations that are not config fields.
RESERVED = {"config", "config_file", "print_config"}


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
            hints_ = [did_you_mean(a.split("=", 1)[0], options) for a in extras
                      if a.startswith("-")]
            self.error("unrecognized arguments: " + " ".join(extras) + "".join(hints_))
        return namespace, extras


class _ExtendLists(argparse.Action):
    """Each value is already a list (coerce splits "1,4,8"); a repeated flag adds to it."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values:
            items.extend(value)
        setattr(namespace, self.dest, items)


def _arg_type(hint: Any) -> typing.Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return coerce(text, hint)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def requested_preset(argv: list[str]) -> tuple[str | None, str | None]:
    """(--config NAME, --config-file PATH) as given in argv, before the real parse."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    early.add_argument("--config-file")
    known, _ = early.parse_known_args(argv)
    return known.config, known.config_file


def preset_defaults(cls: type[RunConfig], name: str, path: Any) -> dict[str, Any]:
    """Flat field -> value, for the fields that preset `name` (with its inherit chain) sets."""
    keys = {key for _, own in preset_layers(name, path, cls) for key in own}
    values = load_config(name, preset_file=path, cls=cls).to_flat()
    return {key: values[key] for key in keys}


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[RunConfig] = PretrainConfig,
                         *, preset: str | None = None, preset_file: str | None = None) -> None:
    """--print-config, --config NAME and --config-file PATH (when `cls` has presets) and one
    flag or positional per section field, all defaulting to SUPPRESS. `preset`/`preset_file`
    name the preset whose values --help shows as defaults (default: cls.DEFAULT_PRESET)."""
    parser.allow_abbrev = False  # a prefix of one flag must not silently mean that flag
    group = parser.add_argument_group("config")
    shown: dict[str, Any] = {}
    if cls.PRESET_FILE:
        path = preset_file or default_preset_file(cls)
        name = preset or cls.DEFAULT_PRESET
        names = f"see {path}"
        try:
            names = ", ".join(load_presets(path))
            shown = preset_defaults(cls, name, path)
            group.description = (f"'(default: X from preset {name})' below is the value preset "
                                 f"{name} gives; a flag given on the command line beats it.")
        except (FileNotFoundError, ValueError) as err:  # the run itself reports it, as an error
            group.description = f"defaults below are built in, as the preset failed: {err}"
        group.add_argument("--config", default=argparse.SUPPRESS, metavar="NAME",
                           help=f"preset (default: {cls.DEFAULT_PRESET}); flags given override "
                                f"it. Presets: {names}")
        group.add_argument("--config-file", default=argparse.SUPPRESS, metavar="PATH",
                           help=f"YAML file of presets (default: {default_preset_file(cls)})")
    layers = "defaults <- preset <- flags" if cls.PRESET_FILE else "defaults <- flags"
    group.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                       help=f"print the resolved config (YAML: {layers}, every section "
                            "validated) and exit without running")
    usage = []
    for section, section_cls in cls.section_types().items():
        doc = (section_cls.__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(section, doc)
        section_hints = hints(section_cls)
        for f in fields(section_cls):
            assert f.name not in RESERVED, f"field {f.name} clashes with a parser option"
            usage.append(_add_field(group, f, section_hints[f.name], shown, preset or
                                    cls.DEFAULT_PRESET))
    if parser.usage is None:
        presets = " [--config NAME]" if cls.PRESET_FILE else ""
        parser.usage = " ".join(["%(prog)s", *filter(None, usage)]) + presets + \
            " [--FLAG VALUE ...]"


def _add_field(group: argparse._ArgumentGroup, f: Any, hint: Any, shown: dict[str, Any],
               preset: str) -> str:
    """Add the field's argument(s); returns its usage words when positional or required."""
    meta = f.metadata
    text = meta["help"].replace("%", "%%")
    if f.name in shown:
        text += f" (default: {_shown(shown[f.name])} from preset {preset})"
    elif meta["required"]:
        text += " (required)"
    elif "default" not in text:
        text += f" (default: {_shown(field_default(f))})"
    many = typing.get_origin(hint) is list
    item = typing.get_args(hint)[0] if many else hint
    if typing.get_origin(item) in (Union, types.UnionType):
        item = next(a for a in typing.get_args(item) if a is not type(None))
    metavar = meta["metavar"] or ("{" + ",".join(typing.get_args(item)) + "}"
                                  if typing.get_origin(item) is Literal
                                  else {int: "N", float: "X"}.get(item, "TEXT"))
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "metavar": metavar,
                              "type": _arg_type(hint)}
    if many:
        kwargs["action"] = _ExtendLists
    if meta["positional"]:
        group.add_argument(f.name, nargs="*" if many else "?", **kwargs)
        return f"{metavar} [{metavar} ...]" if many else metavar
    if many:
        kwargs["nargs"] = "+"
    elif hint is bool:
        kwargs.update(nargs="?", const=True, metavar="BOOL")
    group.add_argument(flag_name(f.name), dest=f.name, **kwargs)
    if hint is bool:  # --no-X is listed where X is on by default, accepted everywhere
        group.add_argument(flag_name("no_" + f.name), dest=f.name, action="store_const",
                           const=False, default=argparse.SUPPRESS,
                           help=(f"same as {flag_name(f.name)} false" if field_default(f)
                                 else argparse.SUPPRESS))
    return f"{flag_name(f.name)} {metavar}" if meta["required"] else ""


def config_from_args(args: argparse.Namespace,
                     cls: type[RunConfig] = PretrainConfig) -> RunConfig:
    """defaults <- --config preset <- the flags actually given (not resolved)."""
    given = vars(args)
    overrides = {k: given[k] for k in cls.field_sections() if k in given}
    return load_config(given.get("config"), overrides, preset_file=given.get("config_file"),
                       cls=cls)
