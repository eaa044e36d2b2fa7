import pytest

from grit_kernels import GritConfig


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("damping", -1, r"GritConfig.damping must be in \[0.0, 1000000.0\], got -1"),
        ("update_freq", 0, "update_freq must be an integer >= 1"),
        ("update_freq", 2.5, "update_freq must be an integer"),
        ("ema_decay", 1.0, r"ema_decay must be in \[0.0, 1.0\)"),
        ("kl_clip", 0.0, r"kl_clip must be in \(0.0, inf\)"),
        ("backend", "cuda-magic", "backend must be one of"),
        ("nonfinite_grads", "pray", "nonfinite_grads must be one of"),
        ("target_modules", "q_proj", "must be a list of names"),
        ("damping", float("nan"), "damping must be in"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        GritConfig(**{field: value})


def test_damping_and_eps_cannot_both_vanish():
    with pytest.raises(ValueError, match="cannot both be 0"):
        GritConfig(damping=0.0, eps_abs=0.0)


def test_round_trip_and_unknown_fields():
    cfg = GritConfig(update_freq=5, target_modules=["q_proj"])
    assert GritConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        GritConfig.from_dict({"kfac_damping": 1e-3})
