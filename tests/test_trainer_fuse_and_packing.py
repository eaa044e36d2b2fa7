"""GritTrainer / enable_grit on CPU, part 2: enable/disable_grit, fusion by default and its fallbacks, refusals,
model_init, default packing, on the 2-layer model. (Part 1, tests/test_trainer.py: arguments, training,
checkpoints, numerics; shared helpers: tests/trainer_helpers.py.)
"""

import os

import pytest
import torch
from trainer_helpers import (
    SEQ,
    _factors,
    assert_params_close,
    lora_params,
    losses,
    make_args,
    make_features,
    run,
    small_model,
)
from transformers import Trainer, TrainingArguments

from grit_kernels import GritConfig
from grit_kernels.data import DynamicPaddingCollator
from grit_kernels.fused.patch import is_fused
from grit_kernels.trainer import (
    GRIT_CHECKPOINT_NAME,
    GritCallback,
    GritTrainer,
    PackingCollator,
    TrainerGritOptimizer,
    disable_grit,
    enable_grit,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

def test_enable_grit_on_plain_trainer_matches_grit_trainer(tmp_path):
    feats = make_features(6, seed=6)
    cfg = GritConfig(warmup_steps=1, update_freq=1)
    plain_args = make_args(tmp_path / "plain", cls=TrainingArguments, save_strategy="steps", save_steps=3)
    trainer = Trainer(
        model=small_model(), args=plain_args, train_dataset=feats, data_collator=DynamicPaddingCollator(0)
    )
    assert enable_grit(trainer, cfg, optimizer="wrap") is trainer and isinstance(trainer, Trainer)
    assert type(trainer).__name__ == "GritTrainer" and type(trainer) is not GritTrainer
    assert any(isinstance(cb, GritCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert trainer.grit_preconditioner.step_count == 3
    assert isinstance(trainer.optimizer.optimizer, TrainerGritOptimizer)  # accelerate wraps *our* optimizer
    assert os.path.isfile(tmp_path / "plain" / "checkpoint-3" / GRIT_CHECKPOINT_NAME)
    assert "grit/damping" in trainer.state.log_history[0]
    reference = run(small_model(), make_args(tmp_path / "grit"), feats, grit_config=cfg)
    assert_params_close(lora_params(trainer.model), lora_params(reference.model), rtol=0, atol=0)
    assert enable_grit(trainer) is trainer  # idempotent


def test_grit_false_is_a_plain_trainer(tmp_path):
    """grit=False: no GRIT. With grit_fuse=False it is exactly a plain Trainer; by default it still fuses
    (A/B runs compare like for like), which changes the arithmetic order only."""
    feats = make_features(6, seed=7)
    off = run(small_model(), make_args(tmp_path / "off", grit=False, grit_fuse=False), feats)
    assert off.grit_preconditioner is None and off.grit_optimizer is None and off.grit_fusion is None
    plain = run(
        small_model(), make_args(tmp_path / "plain", cls=TrainingArguments), feats, trainer_cls=Trainer
    )
    assert_params_close(lora_params(off.model), lora_params(plain.model), rtol=0, atol=0)
    fused = run(small_model(), make_args(tmp_path / "fused", grit=False), feats)
    assert fused.grit_preconditioner is None and fused.grit_fusion.fused_modules == 14 and is_fused(fused.model)
    assert_params_close(lora_params(fused.model), lora_params(plain.model), rtol=1e-4, atol=1e-6)
    grit = run(small_model(), make_args(tmp_path / "on"), feats)
    assert not torch.equal(
        next(iter(lora_params(grit.model).values())), next(iter(lora_params(plain.model).values()))
    )


# ------------------------------------------------------------------------------------------ fused by default
def _fusion_records(caplog):
    return [r for r in caplog.records if r.name == "grit_kernels.trainer" and "grit_fuse" in r.getMessage()]


def test_trainer_fuses_by_default_logs_once_and_opts_out(tmp_path, caplog):
    caplog.set_level("INFO", logger="grit_kernels.trainer")
    feats = make_features(4, seed=11)
    trainer = run(small_model(), make_args(tmp_path / "on", max_steps=2), feats)
    assert trainer.grit_fusion.fused_modules == 14 and not trainer.grit_fusion.unfused and is_fused(trainer.model)
    (record,) = _fusion_records(caplog)  # once, though create_optimizer checks again
    assert record.levelname == "INFO" and "fused 2/2 blocks (14 LoRA modules)" in record.getMessage()
    assert trainer.grit_preconditioner.step_count == 2
    # the statistics come from the fused Functions: the same factors as PEFT's path
    caplog.clear()
    peft = run(small_model(), make_args(tmp_path / "off", max_steps=2, grit_fuse=False), feats)
    assert peft.grit_fusion is None and not is_fused(peft.model) and not _fusion_records(caplog)
    torch.testing.assert_close(_factors(trainer), _factors(peft), rtol=1e-4, atol=1e-8)
    assert_params_close(lora_params(trainer.model), lora_params(peft.model), rtol=1e-4, atol=1e-6)


def test_trainer_falls_back_to_peft_with_the_reason(tmp_path, caplog):
    caplog.set_level("INFO", logger="grit_kernels.trainer")
    feats = make_features(4, seed=12)
    trainer = run(small_model(dropout=0.1), make_args(tmp_path / "dropout", max_steps=1), feats)
    assert trainer.grit_fusion.fused_modules == 0 and not is_fused(trainer.model)
    (record,) = _fusion_records(caplog)
    assert record.levelname == "WARNING" and "lora_dropout > 0" in record.getMessage()
    assert "PEFT's path" in record.getMessage() and trainer.grit_preconditioner.step_count == 1
    caplog.clear()
    schedule = dict(grit_reprojection="one_sided", grit_reprojection_freq=1)
    trainer = run(small_model(), make_args(tmp_path / "reproject", max_steps=1, **schedule), feats)
    (record,) = _fusion_records(caplog)
    assert trainer.grit_fusion is None and not is_fused(trainer.model)
    assert record.levelname == "WARNING" and "grit_reprojection='one_sided'" in record.getMessage()


def test_enable_grit_fuses_and_disable_grit_undoes_it(tmp_path):
    feats = make_features(4, seed=13)
    model = small_model()
    trainer = Trainer(
        model=model, args=make_args(tmp_path, cls=TrainingArguments, max_steps=2), train_dataset=feats,
        data_collator=DynamicPaddingCollator(0),
    )
    enable_grit(trainer, GritConfig(warmup_steps=1), optimizer="wrap")
    assert is_fused(model) and trainer.grit_fusion.fused_modules == 14
    trainer.train()
    assert trainer.grit_preconditioner.step_count == 2
    inner = trainer.grit_optimizer.optimizer
    assert disable_grit(trainer) is trainer and type(trainer) is Trainer
    assert not is_fused(model) and not any(isinstance(cb, GritCallback) for cb in trainer.callback_handler.callbacks)
    assert not any("_grit" in k for m in model.modules() for k in m.__dict__)  # plain PEFT layers again
    assert trainer.optimizer is inner and not hasattr(trainer, "grit_preconditioner")
    x = torch.randint(4, 260, (1, 12))
    reference = small_model()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, rtol=0, atol=0)
    trainer.args.max_steps = 3
    trainer.train()  # a plain Trainer again (GRIT-free steps from the trained weights)
    assert trainer.state.global_step == 3 and not is_fused(model)
    off = enable_grit(Trainer(model=small_model(), args=make_args(tmp_path / "y", cls=TrainingArguments)), fuse=False)
    assert off.grit_fusion is None and not is_fused(off.model)


def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2_and_ddp(tmp_path):
    trainer = Trainer(model=small_model(), args=make_args(tmp_path, cls=TrainingArguments), train_dataset=[])
    trainer.is_fsdp_enabled = True  # no fsdp_plugin: accelerate's default, FSDP1
    with pytest.raises(NotImplementedError, match=r"FSDP1 .*FlatParameter.*fsdp_version': 2.*or DDP"):
        enable_grit(trainer)
    trainer = Trainer(model=small_model(), args=make_args(tmp_path, cls=TrainingArguments), train_dataset=[])
    trainer.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match=r"DeepSpeed: its engine owns the optimizer step.*FSDP2.*or DDP"):
        enable_grit(trainer)


def test_model_init_rebuilds_the_preconditioner_for_each_new_model(tmp_path):
    feats = make_features(4, seed=8)
    trainer = GritTrainer(
        model_init=lambda: small_model(),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=feats,
        data_collator=DynamicPaddingCollator(0),
    )
    trainer.train()
    first = trainer.grit_preconditioner
    trainer.train()  # model_init builds a new model: the old preconditioner must not be reused
    second = trainer.grit_preconditioner
    assert second is not first and second.step_count == 2
    assert any(p is second.modules[0].lora_A for p in trainer.model.parameters())


def test_default_batches_are_packed_and_train_like_padded_batches(tmp_path):
    """No data_collator: GritTrainer packs text features padding-free (the model keeps packed sequences
    apart), and training matches the dynamically padded run (same targets, same statistics)."""
    feats = make_features(6, seed=8, vary_length=True)
    packed = GritTrainer(model=small_model(), args=make_args(tmp_path / "packed"), train_dataset=feats)
    assert isinstance(packed.data_collator, PackingCollator)
    batch = packed.data_collator(feats[:2])
    assert batch["input_ids"].shape == (1, len(feats[0]["input_ids"]) + len(feats[1]["input_ids"]))
    assert batch["position_ids"][0, len(feats[0]["input_ids"])] == 0  # the second sequence restarts
    packed.train()
    padded = run(small_model(), make_args(tmp_path / "padded"), feats)
    torch.testing.assert_close(
        torch.tensor(list(losses(packed).values())), torch.tensor(list(losses(padded).values())), rtol=1e-5, atol=0
    )
    assert_params_close(lora_params(packed.model), lora_params(padded.model), rtol=1e-4, atol=1e-6)


def test_packing_modes_and_non_text_batches(tmp_path):
    feats = make_features(4, seed=9)
    off = GritTrainer(model=small_model(), args=make_args(tmp_path / "off", grit_packing="off"), train_dataset=feats)
    assert not isinstance(off.data_collator, PackingCollator)  # Trainer's own default
    given = DynamicPaddingCollator(0)
    explicit = GritTrainer(model=small_model(), args=make_args(tmp_path / "x"), train_dataset=feats, data_collator=given)
    assert explicit.data_collator is given  # a collator the user passes is never replaced
    auto = GritTrainer(model=small_model(), args=make_args(tmp_path / "auto"), train_dataset=feats)
    with_pixels = [{"input_ids": f["input_ids"], "pixel_values": torch.zeros(3)} for f in feats[:2]]
    batch = auto.data_collator(with_pixels)  # not text-only: Trainer's collator, never silently packed
    assert batch["input_ids"].shape == (2, SEQ) and "pixel_values" in batch and "position_ids" not in batch
    with pytest.raises(ValueError, match="grit_packing"):
        make_args(tmp_path / "bad", grit_packing="yes")


def test_packing_on_refuses_a_model_that_leaks(tmp_path, monkeypatch):
    import grit_kernels.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "packing_isolates", lambda model: False)  # as for OPT (test_packing)
    feats = make_features(2, seed=10)
    auto = GritTrainer(model=small_model(), args=make_args(tmp_path / "auto"), train_dataset=feats)
    assert not isinstance(auto.data_collator, PackingCollator)  # auto falls back to Trainer's collator
    with pytest.raises(ValueError, match="does not keep packed sequences apart"):
        GritTrainer(model=small_model(), args=make_args(tmp_path / "on", grit_packing="on"), train_dataset=feats)
