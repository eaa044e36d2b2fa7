"""One source of configuration: GritConfig's fields, the Trainer's grit_* arguments and the CLI's --grit-*
flags agree on names, defaults, help and validation (grit_kernels.arguments generates the last two)."""

import argparse
import dataclasses
import math

import pytest

from grit_kernels import GritConfig, arguments
from grit_kernels.cli import build_parser
from grit_kernels.trainer import GritTrainingArguments

FIELDS = [f.name for f in dataclasses.fields(GritConfig)]
#: Trainer knobs that are not GritConfig fields (kept explicit in GritTrainingArguments)
TRAINER_ONLY = {"grit", "grit_fuse", "grit_optimizer", "grit_loraplus_ratio", "grit_packing"}


def _finetune_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["finetune"]


def test_every_field_has_help_and_is_documented():
    doc = GritConfig.__doc__
    for f in dataclasses.fields(GritConfig):
        assert f.metadata.get("brief"), f"GritConfig.{f.name}: no one-line help (metadata 'brief') in its field"
        assert f"{f.name}:" in doc or f"{f.name}," in doc, f"GritConfig.{f.name} is not in the class docstring"


def test_trainer_arguments_are_the_config_fields():
    trainer_fields = {f.name: f for f in dataclasses.fields(GritTrainingArguments) if f.name.startswith("grit")}
    assert set(trainer_fields) == {f"grit_{n}" for n in FIELDS} | TRAINER_ONLY
    defaults = GritConfig()
    for knob in arguments.knobs():
        if knob.name == "kl_clip":  # the Trainer's default is "auto" (it depends on grit_optimizer), test_kl_clip_auto
            continue
        f = trainer_fields[f"grit_{knob.name}"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected = getattr(defaults, knob.name)
        assert (tuple(default) if isinstance(default, list) else default) == expected, knob.name
        assert f.metadata["help"] == knob.help_text and knob.help in knob.help_text
        if knob.choices:
            assert all(c in knob.help_text for c in knob.choices), knob.name
    built = GritTrainingArguments(output_dir="unused", report_to="none")
    assert built.to_grit_config() == GritConfig(kl_clip=None)  # the default optimizer, EigenAdamW, runs unclipped
    wrapped = GritTrainingArguments(output_dir="unused", report_to="none", grit_optimizer="wrap")
    assert wrapped.to_grit_config() == defaults


@pytest.mark.parametrize(
    "optimizer, given, expected",
    [("eigen_adamw", "auto", None), ("auto", "auto", None), ("wrap", "auto", GritConfig().kl_clip),
     ("eigen_adamw", "0.05", 0.05), ("wrap", "none", None), ("auto", 0.2, 0.2), ("wrap", None, None)],
)
def test_kl_clip_auto(optimizer, given, expected):
    built = GritTrainingArguments(output_dir="unused", report_to="none", grit_optimizer=optimizer, grit_kl_clip=given)
    assert built.to_grit_config().kl_clip == expected


def test_kl_clip_rejects_words():
    with pytest.raises(ValueError, match="grit_kl_clip must be a number > 0, 'none' or 'auto'"):
        GritTrainingArguments(output_dir="unused", report_to="none", grit_kl_clip="often")


def test_cli_flags_are_the_config_fields():
    parser = _finetune_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for knob in arguments.knobs():
        action = by_dest[f"grit_{knob.name}"]
        assert knob.flag in action.option_strings, knob.name
        assert action.help == knob.help_text
        if knob.choices:
            assert set(knob.choices) <= set(action.choices), knob.name
    args = parser.parse_args(["--model", "m", "--data", "d"])
    assert arguments.config_from_flags(args) == GritConfig()  # flags not given keep the defaults


def test_backend_help_lists_every_backend():
    from grit_kernels.config import BACKENDS

    knob = next(k for k in arguments.knobs() if k.name == "backend")
    assert all(b in knob.help_text for b in BACKENDS) and len(BACKENDS) == 5
    targets = next(k for k in arguments.knobs() if k.name == "target_modules")
    assert targets.help_text.endswith("(default none)")


SET = {
    "update_freq": ("3", 3),
    "damping": ("0.01", 0.01),
    "damping_floor": ("0.25", 0.25),
    "eps_abs": ("1e-10", 1e-10),
    "ema_decay": ("0.5", 0.5),
    "retry_damping_factor": ("10", 10.0),
    "warmup_steps": ("0", 0),
    "kl_clip": ("none", None),
    "backend": ("torch", "torch"),
    "target_modules": ("q_proj,v_proj", ("q_proj", "v_proj")),
    "exclude_modules": ("layers.0.mlp.down_proj", ("layers.0.mlp.down_proj",)),
    "nonfinite_grads": ("raise", "raise"),
    "kfac_full_max_bytes": ("4096", 4096),
    "large_factor_rank": ("4", 4),
    "large_factor_sketch": ("8", 8),
    "reprojection_freq": ("7", 7),
    "reprojection_start": ("2", 2),
    "rank_schedule": ("none", None),
    "rank_start": ("0.9", 0.9),
    "rank_end": ("0.4", 0.4),
    "rank_schedule_steps": ("50", 50),
    "rank_energy": ("0.9", 0.9),
    "min_rank": ("2", 2),
    "reprojection_optimizer_state": ("rotate", "rotate"),
}


def test_every_field_is_settable_from_the_cli_and_the_trainer():
    """Each field, set through its flag and through its Trainer argument, reaches the GritConfig (the
    boolean and two whose valid values depend on other fields are set on their own below)."""
    parser = _finetune_parser()
    assert set(SET) | {"graft", "reprojection", "fisher"} == set(FIELDS)
    argv = ["--model", "m", "--data", "d", "--no-grit-graft"]
    for name, (text, _) in SET.items():
        argv += [f"--grit-{name.replace('_', '-')}", text]
    cfg = arguments.config_from_flags(parser.parse_args(argv))
    expected = {name: value for name, (_, value) in SET.items()}
    assert {k: getattr(cfg, k) for k in expected} == expected and cfg.graft is False
    targs = GritTrainingArguments(
        output_dir="unused", report_to="none", grit_graft=False, **{f"grit_{k}": v for k, v in expected.items()}
    )
    assert targs.to_grit_config() == cfg
    for flag, value in (("--grit-reprojection", "one_sided"), ("--grit-fisher", "kfac_lowrank")):
        parsed = parser.parse_args(["--model", "m", "--data", "d", flag, value])
        name = flag.removeprefix("--grit-")
        assert getattr(arguments.config_from_flags(parsed), name) == value
        wrap = GritTrainingArguments(output_dir="u", report_to="none", grit_optimizer="wrap", **{f"grit_{name}": value})
        assert wrap.to_grit_config() == (
            arguments.config_from_flags(parsed)
        )


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--grit-damping-floor", "2", "--grit-damping-floor must be in [0.0, 1.0]"),
        ("--update-freq", "0", "--grit-update-freq/--update-freq must be an integer >= 1"),
        ("--grit-ema-decay", "1", "--grit-ema-decay must be in [0.0, 1.0)"),
        ("--grit-kl-clip", "0", "--grit-kl-clip must be in (0.0, inf)"),
        ("--grit-rank-schedule-steps", "0", "--grit-rank-schedule-steps must be an integer >= 1"),
    ],
)
def test_cli_validation_is_the_config_s_naming_the_flag(flag, value, message):
    args = _finetune_parser().parse_args(["--model", "m", "--data", "d", flag, value])
    with pytest.raises(ValueError) as info:
        arguments.config_from_flags(args)
    assert str(info.value).startswith(message), str(info.value)
    name = flag.removeprefix("--grit-").removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError, match=rf"GritTrainingArguments\.grit_{name}\b"):
        GritTrainingArguments(output_dir="unused", report_to="none", **{f"grit_{name}": float(value)})


def test_a_new_field_reaches_the_trainer_and_the_cli(monkeypatch):
    """A field added to GritConfig appears in both front ends with its help and default (the generation
    reads the dataclass; nothing is listed by hand)."""

    @dataclasses.dataclass
    class Extended(GritConfig):
        new_knob: float = arguments.field(default=0.5, metadata={"brief": "a knob added later"})

    monkeypatch.setattr(arguments, "GritConfig", Extended)
    knob = next(k for k in arguments.knobs() if k.name == "new_knob")
    assert (knob.kind, knob.default, knob.help_text) == (float, 0.5, "a knob added later (default 0.5)")
    mixin = dataclasses.make_dataclass("M", [arguments._trainer_field(k) for k in arguments.knobs()])
    assert {f.name: f.default for f in dataclasses.fields(mixin)}["grit_new_knob"] == 0.5
    group = argparse.ArgumentParser()
    arguments.add_config_flags(group)
    parsed = group.parse_args(["--grit-new-knob", "0.25"])
    assert math.isclose(arguments.given_config_values(parsed)["new_knob"], 0.25)
