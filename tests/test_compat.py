"""grit_kernels.compat runs the published GRIT notebook's call sequences (Trainer and hand-written loop)."""

import pytest
import torch
from trainer_helpers import lora_params, make_features
from transformers import TrainingArguments

from grit_kernels import GritConfig, GritPreconditioner
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
            # up to a scale per tensor (the KL-clip's common factor, and GritConfig.graft's per-tensor norm)
            for got, want in ((m.lora_A.grad, out_a), (m.lora_B.grad, out_b)):
                nu = (got.flatten() @ want.flatten()) / want.flatten().pow(2).sum()
                torch.testing.assert_close(got, nu * want, rtol=1e-4, atol=1e-12)
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


# --------------------------------------------------------------------------------------------- grit-vlm
def test_grit_lora_config_maps_with_warnings_where_meanings_differ():
    from grit_kernels.compat import GRITLoRAConfig

    with pytest.warns(UserWarning, match="block_diagonal.*kfac_full"):
        cfg = GRITLoRAConfig(fisher_approximation="block_diagonal", enable_projection=False).to_grit_config()
    assert cfg.fisher == "kfac_full" and cfg.reprojection == "off"
    with pytest.warns(UserWarning, match="relative"):
        cfg = GRITLoRAConfig(
            fisher_approximation="kfac",
            fisher_update_freq=7,
            natural_gradient_damping=1e-2,
            fisher_damping=1e-6,
            fisher_ema_decay=0.9,
            projection_budget_start=16,
            projection_budget_end=4,
            projection_schedule="cosine",
        ).to_grit_config()
    assert (cfg.fisher, cfg.update_freq, cfg.damping, cfg.eps_abs, cfg.ema_decay) == (
        "kfac",
        7,
        1e-2,
        1e-6,
        0.9,
    )
    assert (cfg.reprojection, cfg.rank_schedule, cfg.rank_end) == ("one_sided", "cosine", 0.25)
    with pytest.warns(UserWarning, match="grows"):
        assert GRITLoRAConfig().to_grit_config().fisher == "diagonal"  # grit-vlm's default
    with pytest.raises(ValueError, match="fisher_approximation"):
        GRITLoRAConfig(fisher_approximation="full").to_grit_config()
    lora = GRITLoRAConfig(r=4).lora_config()
    assert lora.r == 4 and lora.lora_alpha == 32 and "down_proj" in lora.target_modules


def test_grit_vlm_documented_call_sequence(tmp_path):
    """GRITLoRAConfig -> gk.create_vlm_grit_adapter(model, config=...) -> GRITTrainingArguments ->
    create_grit_trainer(model, adapter, train_dataset=..., training_args=...) -> train()."""
    from test_vlm import tiny_llava

    import grit_kernels as gk
    from grit_kernels.compat import GRITLoRAConfig, GRITTrainingArguments, create_grit_trainer

    torch.manual_seed(0)
    vlm, batch, _ = tiny_llava()
    dataset = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 2
    config = GRITLoRAConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        fisher_approximation="kfac",
        fisher_update_freq=2,
        enable_projection=False,
    )
    with pytest.warns(UserWarning, match="relative"):
        model, adapter = gk.create_vlm_grit_adapter(vlm, config=config)
    assert {m.lora_A.shape[0] for m in adapter.modules} == {4} and set(adapter.groups) == {
        "vision",
        "projector",
        "language",
    }
    args = GRITTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        fisher_update_freq=2,
        fisher_approximation="kfac",
        enable_projection=False,
        grit_optimizer_type="adam",
        disable_tqdm=True,
    )
    assert args.grit_update_freq == 2 and args.to_grit_config().fisher == "kfac"
    trainer = create_grit_trainer(model, adapter, train_dataset=dataset, training_args=args)
    trainer.train()
    assert trainer.grit_preconditioner is adapter and adapter.step_count == 2
    logged = [h for h in trainer.state.log_history if "grit/language/damping" in h]
    assert logged and "grit/vision/trace_forward" in logged[-1]


def test_create_grit_trainer_without_natural_gradient_is_plain_lora(tmp_path):
    from grit_kernels.compat import GRITTrainingArguments, create_grit_trainer

    model = small_model()
    pre = GritPreconditioner(model, GritConfig())
    args = GRITTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        report_to="none",
        use_cpu=True,
        enable_natural_gradient=False,
        enable_projection=False,
    )
    assert args.grit is False and args.optim == "sgd"
    with pytest.warns(UserWarning, match="plain LoRA"):
        trainer = create_grit_trainer(
            model,
            pre,
            train_dataset=make_features(2),
            training_args=args,
            data_collator=DynamicPaddingCollator(0),
        )
    assert trainer.grit_preconditioner is None and trainer.grit_config is None
