"""One source for GRIT's knobs: :class:`GritConfig`'s fields become the Trainer's ``grit_*`` arguments and
the CLI's ``--grit-*`` flags.

Every :class:`~grit_kernels.GritConfig` field ``name`` (its type, default, and the one-line ``brief`` help
and ``choices`` in the field's metadata) gives

* ``GritTrainingArguments.grit_<name>`` (:data:`GritConfigArguments`, a dataclass mixin), and
* ``grit-kernels finetune --grit-<name-with-dashes>`` (:func:`add_config_flags`; a few older short
  spellings stay as aliases, :data:`FLAG_ALIASES`).

Validation is :class:`GritConfig`'s own: both front ends build the config and rename the field in its
error message to their own spelling (:func:`config_from_values`). A new field reaches all three with no
edit here.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, make_dataclass

from .config import GritConfig

#: older flag spellings of ``grit-kernels finetune`` kept as aliases of ``--grit-<name>``
FLAG_ALIASES = {"update_freq": ("--update-freq",), "damping": ("--damping",)}


@dataclass(frozen=True)
class Knob:
    """One :class:`GritConfig` field, as the front ends see it.

    Attributes:
        name: the field name.
        kind: ``bool``, ``int``, ``float``, ``str`` or ``list`` (a sequence of names).
        optional: ``None`` is an allowed value.
        default: the field's default.
        help: the one-line help of the field (its metadata's ``brief``).
        choices: allowed strings of a ``str`` field, else ``None``.
    """

    name: str
    kind: type
    optional: bool
    default: typing.Any
    help: str
    choices: tuple[str, ...] | None

    @property
    def flag(self) -> str:
        return "--grit-" + self.name.replace("_", "-")

    @property
    def help_text(self) -> str:
        """``help`` plus the choices and the default, as both front ends print it."""
        text = self.help
        if self.choices:
            text += f"; one of {', '.join(self.choices)}"
        if self.kind is list:
            default = ",".join(self.default) if self.default else ("none" if self.default is None else "empty")
        else:
            default = "none" if self.default is None else self.default
        return f"{text} (default {default})"


def _kind(hint) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) in (list, tuple, Sequence) or hint in (list, tuple):
        return list, optional
    if hint not in (bool, int, float, str):
        raise TypeError(f"GritConfig: no front-end mapping for the type {hint!r}")
    return hint, optional


def knobs() -> list[Knob]:
    """Every :class:`GritConfig` field as a :class:`Knob`, in declaration order."""
    hints = typing.get_type_hints(GritConfig)
    out = []
    for f in fields(GritConfig):
        kind, optional = _kind(hints[f.name])
        help_ = f.metadata.get("brief")
        if not help_:
            raise TypeError(f"GritConfig.{f.name} has no one-line help (metadata 'brief') in its field")
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(Knob(f.name, kind, optional, default, help_, f.metadata.get("choices")))
    return out


def config_from_values(values: dict, spell: Callable[[str], str]) -> GritConfig:
    """``GritConfig(**values)``; a ``ValueError`` names each field as ``spell(name)`` spells it."""
    try:
        return GritConfig(**values)
    except ValueError as exc:
        message = str(exc)
        for name in sorted((k.name for k in knobs()), key=len, reverse=True):  # rank_schedule_steps first
            message = message.replace(f"GritConfig.{name}", spell(name))
        raise ValueError(message) from None


# --------------------------------------------------------------------------------------------- Trainer
def _trainer_field(knob: Knob):
    kind = list[str] if knob.kind is list else knob.kind
    hint = kind | None if knob.optional or knob.kind is list else kind
    metadata = {"help": knob.help_text}
    if knob.kind is list:
        default = knob.default
        spec = field(default=None, metadata=metadata) if default is None else field(
            default_factory=lambda default=default: list(default), metadata=metadata
        )
    else:
        spec = field(default=knob.default, metadata=metadata)
    return f"grit_{knob.name}", hint, spec


#: dataclass mixin of ``GritTrainingArguments``: one ``grit_<name>`` field per ``GritConfig`` field
GritConfigArguments = make_dataclass(
    "GritConfigArguments", [_trainer_field(k) for k in knobs()], repr=False, eq=False
)
GritConfigArguments.__module__ = __name__
GritConfigArguments.__doc__ = "One ``grit_<name>`` field per :class:`~grit_kernels.GritConfig` field (generated)."


def trainer_config(arguments, **overrides) -> GritConfig:
    """The :class:`GritConfig` that ``arguments``' ``grit_<name>`` fields describe, ``overrides`` (by field
    name) replacing some (``None`` for a non-optional list field means its default); errors name
    ``GritTrainingArguments.grit_<name>``."""
    values = {}
    for knob in knobs():
        value = overrides[knob.name] if knob.name in overrides else getattr(arguments, f"grit_{knob.name}")
        if value is None and knob.kind is list and not knob.optional:
            value = knob.default
        values[knob.name] = value
    return config_from_values(values, lambda name: f"GritTrainingArguments.grit_{name}")


# --------------------------------------------------------------------------------------------- CLI
def _optional(parse: Callable) -> Callable:
    def convert(text: str):
        return None if text.lower() == "none" else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its error
    return convert


def _names(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def add_config_flags(group) -> None:
    """Add ``--grit-<name>`` for every :class:`GritConfig` field to an argparse parser or group.

    Flags not given are absent from the namespace (``default=SUPPRESS``): :func:`config_from_flags` then
    keeps :class:`GritConfig`'s default, and callers can tell "given" from "default".
    """
    for knob in knobs():
        names = (knob.flag, *FLAG_ALIASES.get(knob.name, ()))
        kwargs = dict(dest=f"grit_{knob.name}", default=argparse.SUPPRESS, help=knob.help_text)
        if knob.kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if knob.kind is list:
            parse, metavar = _names, "NAME[,NAME]"
        elif knob.choices:
            parse, metavar = str, "{" + ",".join(knob.choices + (("none",) if knob.optional else ())) + "}"
            kwargs["choices"] = list(knob.choices) + ([None] if knob.optional else [])
        else:
            parse, metavar = knob.kind, knob.kind.__name__.upper()
        group.add_argument(
            *names, type=_optional(parse) if knob.optional else parse, metavar=metavar, **kwargs
        )


def given_config_values(namespace: argparse.Namespace) -> dict:
    """``{field: value}`` of the ``--grit-*`` flags given on the command line."""
    return {k.name: getattr(namespace, f"grit_{k.name}") for k in knobs() if hasattr(namespace, f"grit_{k.name}")}


def flag_spelling(name: str) -> str:
    """How the CLI names a field in an error: ``--grit-<name>`` (and its older alias)."""
    knob = next(k for k in knobs() if k.name == name)
    return "/".join((knob.flag, *FLAG_ALIASES.get(name, ())))


def config_from_flags(namespace: argparse.Namespace, **overrides) -> GritConfig:
    """The :class:`GritConfig` of the given ``--grit-*`` flags over ``overrides`` over the defaults; a
    ``ValueError`` names the flag."""
    return config_from_values({**overrides, **given_config_values(namespace)}, flag_spelling)


__all__ = [
    "FLAG_ALIASES",
    "GritConfigArguments",
    "Knob",
    "add_config_flags",
    "config_from_flags",
    "config_from_values",
    "given_config_values",
    "knobs",
    "trainer_config",
]
