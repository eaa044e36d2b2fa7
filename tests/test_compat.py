"""grit_kernels.compat runs the published GRIT notebook's call sequences (Trainer and hand-written loop)."""

import pytest
import torch
from test_trainer import lora_params, make_features
from transformers import TrainingArguments

from grit_kernels import GritConfig
from grit_kernels.bank import BACKWARD, FORWARD
from grit_kernels.compat import PAIRING_WARNING, GritCallback, GRITConfig, GRITManager, GritTrainer
from grit_kernels.data import ByteTokenizer, DynamicPaddingCollator
from grit_kernels.models import build_lora_model, tiny_llama_config
from grit_kernels.trainer import GritTrainer as NativeGritTrainer


def small_model():
    return build_lora_model(tiny_llama_config(num_layers=2), r=4)


def notebook_config():
    config = GRITConfig()  # the notebook sets attributes after construction
    config.lora_rank = 4
    config.kfac_update_freq = 2
    config.kfac_damping = 1e-3
    config.kfac_min_samples = 16
    config.learning_rate = 1e-3
    return config


def test_grit_config_maps_onto_grit_config():
    cfg = notebook_config().to_grit_config()
    assert (cfg.update_freq, cfg.damping, cfg.warmup_steps) == (2, 1e-3, 2)
    published = GRITConfig().to_grit_config()  # published defaults: first inversion at step 50
    assert (published.update_freq, published.warmup_steps) == (50, 50)
    late = GRITConfig(kfac_update_freq=5, ng_warmup_steps=20).to_grit_config()
    assert late.warmup_steps == 20
    lora = notebook_config().lora_config()
    assert lora.r == 4 and lora.lora_alpha == 32 and "gate_proj" in lora.target_modules


def test_notebook_trainer_sequence(tmp_path):
    """GRITConfig -> GRITManager(model, config, device) -> GritTrainer(grit_manager=..., tokenizer=...,
    callbacks=[GritCallback(manager)]) -> train(): preconditioning runs once per step, inside the optimizer,
    exactly as the native GritTrainer with the mapped config does."""
    feats = make_features(8, seed=1)
    args = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    config = notebook_config()
    model = small_model()
    with pytest.warns(UserWarning, match="factor pairing corrected"):
        manager = GRITManager(model=model, config=config, device="cpu")
    assert len(manager.optimized_modules) == 14 and manager.factors_are_ready
    trainer = GritTrainer(
        grit_manager=manager,
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "compat"), **args),
        train_dataset=feats,
        data_collator=DynamicPaddingCollator(0),
        tokenizer=ByteTokenizer(),
        callbacks=[GritCallback(manager)],
    )
    assert isinstance(trainer.processing_class, ByteTokenizer)
    trainer.train()
    assert manager.global_step == 4 and manager.preconditioner.step_count == 4
    assert trainer.grit_preconditioner is manager.preconditioner
    native = NativeGritTrainer(
        model=small_model(),
        args=TrainingArguments(output_dir=str(tmp_path / "native"), **args),
        train_dataset=feats,
        data_collator=DynamicPaddingCollator(0),
        grit_config=config.to_grit_config(),
    )
    native.train()
    after, expected = lora_params(model), lora_params(native.model)
    for name in expected:
        assert torch.equal(after[name], expected[name]), name
    h = manager.a_covs[manager.optimized_modules[0]]
    assert torch.equal(h, manager.preconditioner.bank.factor[FORWARD, 0])
    ranks = manager.log_final_effective_ranks()
    assert len(ranks) == 14 and all(0 < a <= 4 for a, _ in ranks.values())


def test_notebook_manual_loop_sequence():
    """The published README loop; the pairing is the corrected one (grad_A by D, grad_B by H)."""
    model = small_model()
    config = notebook_config()
    with pytest.warns(UserWarning, match="factor pairing corrected"):
        manager = GRITManager(model, config, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    pre = manager.preconditioner
    feats = make_features(10, seed=2)
    collate = DynamicPaddingCollator(0)
    checked = False
    for step in range(5):
        batch = collate(feats[2 * step : 2 * step + 2])
        loss = model(**batch).loss
        loss.backward()
        if step % config.kfac_update_freq == 0:
            manager.update_and_invert_factors()
        raw = {m.index: (m.lora_A.grad.clone(), m.lora_B.grad.clone()) for m in pre.modules}
        if manager.factors_are_ready:
            manager.precondition_gradients()
            manager.precondition_gradients()  # a second call in the same step changes nothing
        if pre.step_count > pre.config.warmup_steps and not checked:
            m = pre.modules[3]
            grad_a, grad_b = raw[m.index]
            inv_d, inv_h = pre.bank.inverse[BACKWARD, m.index], pre.bank.inverse[FORWARD, m.index]
            out_a, out_b = inv_d @ grad_a, grad_b @ inv_h
            # up to the KL-clip's common scale factor nu
            nu = (m.lora_B.grad.flatten() @ out_b.flatten()) / out_b.flatten().pow(2).sum()
            torch.testing.assert_close(m.lora_A.grad, nu * out_a, rtol=1e-4, atol=1e-12)
            torch.testing.assert_close(m.lora_B.grad, nu * out_b, rtol=1e-4, atol=1e-12)
            checked = True
        optimizer.step()
        optimizer.zero_grad()
        manager.step(loss.item())
    assert checked and manager.global_step == 5 and pre.step_count == 5
    assert len(manager.loss_history) == 5 and torch.isfinite(pre.bank.factor).all()
    # a step whose gradients were never preconditioned leaves no statistics behind
    model(**collate(feats[:2])).loss.backward()
    manager.step()
    assert pre.bank.accumulators.abs().sum() == 0


def test_pairing_warning_is_one_line():
    assert "\n" not in PAIRING_WARNING and "A with H and B with D" in PAIRING_WARNING


def test_compat_trainer_without_manager_uses_grit_config(tmp_path):
    trainer = GritTrainer(
        model=small_model(),
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1),
        train_dataset=make_features(2),
        data_collator=DynamicPaddingCollator(0),
        grit_config=GRITConfig(kfac_update_freq=3),
    )
    assert trainer.grit_config == GritConfig(update_freq=3, warmup_steps=3)
