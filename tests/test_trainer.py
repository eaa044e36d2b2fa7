"""GritTrainer / GritTrainingArguments / enable_grit on CPU with the tiny Llama.

The 224-module runs (plain and NF4) train, checkpoint and resume; the smaller properties (gradient
accumulation, loss scale, skipped steps, checkpointing, clipping, logging) use a 2-layer model.
"""

import os
import subprocess
import sys
import textwrap

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
from transformers import HfArgumentParser, TrainerCallback

import grit_kernels as gk
from grit_kernels import GritConfig, GritPreconditioner
from grit_kernels.bank import BACKWARD, FORWARD
from grit_kernels.data import DynamicPaddingCollator
from grit_kernels.models import build_lora_model, tiny_llama_config
from grit_kernels.trainer import (
    GRIT_CHECKPOINT_NAME,
    GritTrainer,
    GritTrainingArguments,
    TrainerGritOptimizer,
)
from grit_kernels.trainer_optimizer import _find_grit_optimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

def test_training_arguments_map_onto_grit_config(tmp_path):
    args = make_args(
        tmp_path,
        grit_update_freq=3,
        grit_damping=1e-2,
        grit_ema_decay=0.9,
        grit_warmup_steps=4,
        grit_kl_clip=None,
        grit_backend="torch",
        grit_target_modules=["q_proj", "v_proj"],
        grit_exclude_modules=["layers.0.self_attn.q_proj"],
        grit_nonfinite_grads="raise",
    )
    cfg = args.to_grit_config()
    assert (cfg.update_freq, cfg.damping, cfg.ema_decay, cfg.warmup_steps, cfg.kl_clip) == (
        3,
        1e-2,
        0.9,
        4,
        None,
    )
    assert cfg.backend == "torch" and cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.exclude_modules == ("layers.0.self_attn.q_proj",) and cfg.nonfinite_grads == "raise"
    defaults = make_args(
        tmp_path, grit_warmup_steps=GritConfig().warmup_steps, grit_update_freq=GritConfig().update_freq
    ).to_grit_config()
    assert defaults == GritConfig()
    with pytest.raises(ValueError, match=r"GritTrainingArguments\.grit_update_freq"):
        make_args(tmp_path, grit_update_freq=0)
    with pytest.raises(ValueError, match=r"GritTrainingArguments\.grit_backend"):
        make_args(tmp_path, grit_backend="opencl")
    (parsed,) = HfArgumentParser(GritTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--grit_update_freq",
            "5",
            "--grit_target_modules",
            "q_proj",
            "k_proj",
        ]
    )
    assert parsed.to_grit_config().update_freq == 5 and parsed.grit_target_modules == ["q_proj", "k_proj"]


FISHER_AND_RANK_ARGS = dict(
    fisher="kfac",
    kfac_full_max_bytes=12345,
    large_factor_rank=8,
    large_factor_sketch=12,
    reprojection="two_sided",
    reprojection_freq=7,
    reprojection_start=3,
    rank_schedule="cosine",
    rank_start=0.9,
    rank_end=0.3,
    rank_schedule_steps=40,
    rank_energy=0.95,
    min_rank=2,
    reprojection_optimizer_state="rotate",
)


def test_fisher_and_rank_schedule_arguments_map_and_name_the_field(tmp_path):
    cfg = make_args(tmp_path, **{f"grit_{k}": v for k, v in FISHER_AND_RANK_ARGS.items()}).to_grit_config()
    assert {k: getattr(cfg, k) for k in FISHER_AND_RANK_ARGS} == FISHER_AND_RANK_ARGS
    assert make_args(tmp_path, grit_fisher="kfac_full").to_grit_config().fisher == "kfac_full"
    bad = {
        "fisher": "block_diagonal",
        "kfac_full_max_bytes": 0,
        "large_factor_rank": 0,
        "reprojection": "three_sided",
        "reprojection_freq": 0,
        "reprojection_start": -1,
        "rank_schedule": "step",
        "rank_energy": 1.5,
        "min_rank": 0,
        "reprojection_optimizer_state": "keep",
    }
    for name, value in bad.items():
        extra = {"grit_reprojection": "one_sided"} if name not in ("reprojection", "fisher") else {}
        with pytest.raises(ValueError, match=rf"GritTrainingArguments\.grit_{name}\b"):
            make_args(tmp_path, **{f"grit_{name}": value}, **extra)
    schedule = dict(grit_reprojection="one_sided", grit_rank_schedule="linear")
    with pytest.raises(ValueError, match=r"GritTrainingArguments\.grit_rank_schedule_steps\b"):
        make_args(tmp_path, **schedule, grit_reprojection_start=5, grit_rank_schedule_steps=5)
    with pytest.raises(ValueError, match=r"GritTrainingArguments\.grit_rank_end\b"):
        make_args(tmp_path, **schedule, grit_rank_start=0.5, grit_rank_end=0.8)
    with pytest.raises(ValueError, match=r"GritTrainingArguments\.grit_rank_schedule needs"):
        make_args(tmp_path, grit_rank_schedule="linear")
    (parsed,) = HfArgumentParser(GritTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--grit_optimizer", "wrap", "--grit_fisher", "diagonal", "--grit_rank_end", "0.25",
         "--grit_kl_clip", "0.05"]
    )
    cfg = parsed.to_grit_config()
    assert (cfg.fisher, cfg.rank_end, cfg.kl_clip) == ("diagonal", 0.25, 0.05)
    (default,) = HfArgumentParser(GritTrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (default.grit_optimizer, default.to_grit_config().kl_clip) == ("auto", None)


def test_trainer_trains_with_diagonal_fisher(tmp_path):
    model = small_model()
    before = lora_params(model)
    trainer = run(model, make_args(tmp_path, grit_fisher="diagonal"), make_features(6))
    pre = trainer.grit_preconditioner
    assert pre.config.fisher == "diagonal" and pre.step_count == 3
    moments = pre.state_dict()["fisher_state"]["second_moment"]
    assert len(moments) == len(pre.parameters()) and all(torch.isfinite(v).all() and (v > 0).any() for v in moments)
    after = lora_params(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_A" in n)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(trainer).values()) and len(losses(trainer)) == 3


def test_trainer_trains_with_low_rank_kfac(tmp_path):
    """fisher="kfac_lowrank" through GritTrainer (packing on by default): sketches fill, adapters move."""
    model = small_model()
    before = lora_params(model)
    args = make_args(tmp_path, grit_fisher="kfac_lowrank", grit_large_factor_rank=4, grit_warmup_steps=0)
    trainer = run(model, args, make_features(6))
    pre = trainer.grit_preconditioner
    assert pre.config.fisher == "kfac_lowrank" and pre.step_count == 3
    low = pre._fisher
    assert all(t > 0 for t in low.input_trace) and all(v.abs().max() > 0 for v in low.input_vectors)
    after = lora_params(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_A" in n)

def _group_lrs(optimizer, model):
    """``{"A": {lr}, "B": {lr}}`` over the parameter groups holding lora_A / lora_B tensors."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {"A": set(), "B": set()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "lora_" in names[id(p)]:
                out["B" if ".lora_B." in names[id(p)] else "A"].add(group["lr"])
    return out


def test_default_optimizer_is_eigen_adamw_unclipped(tmp_path):
    """GritTrainingArguments' defaults (no grit_optimizer, no grit_kl_clip): EigenAdamW, KL-clip off, and the
    logs say the factors are in use."""
    model = small_model()
    args = make_args(tmp_path, grit_optimizer="auto", grit_kl_clip="auto")  # the dataclass defaults
    assert GritTrainingArguments(output_dir=str(tmp_path), report_to="none").grit_optimizer == "auto"
    trainer = run(model, args, make_features(6))
    assert type(trainer.grit_optimizer.optimizer).__name__ == "EigenAdamW"
    assert trainer.grit_config.kl_clip is None
    logged = [h for h in trainer.state.log_history if "grit/preconditioning_active" in h]
    assert logged and logged[-1]["grit/preconditioning_active"] == 1


@pytest.mark.parametrize("optimizer, inner, clip", [(None, "EigenAdamW", None), ("auto", "EigenAdamW", None),
                                                    ("wrap", "AdamW", 0.1)])
def test_enable_grit_default_optimizer(tmp_path, optimizer, inner, clip):
    from transformers import Trainer, TrainingArguments

    model = small_model()
    trainer = Trainer(model=model, args=make_args(tmp_path, cls=TrainingArguments), train_dataset=make_features(6),
                      data_collator=DynamicPaddingCollator(pad_token_id=0))
    gk.enable_grit(trainer, optimizer=optimizer)
    trainer.train()
    assert type(_find_grit_optimizer(trainer.optimizer).optimizer).__name__ == inner
    assert trainer.grit_config.kl_clip == clip
    gk.disable_grit(trainer)  # EigenAdamW's moments are in the eigenbasis: dropped, not handed to a plain Trainer
    assert (trainer.optimizer is None) == (inner == "EigenAdamW")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        gk.enable_grit(Trainer(model=small_model(), args=make_args(tmp_path, cls=TrainingArguments)), optimizer="sgd")


@pytest.mark.parametrize("optimizer", ["wrap", "eigen_adamw"])
def test_loraplus_ratio_gives_lora_b_its_own_lr(tmp_path, optimizer):
    model = small_model()
    args = make_args(tmp_path, grit_optimizer=optimizer, grit_loraplus_ratio=16.0, grit_kl_clip=None)
    trainer = run(model, args, make_features(6))
    inner = trainer.grit_optimizer.optimizer
    assert type(inner).__name__ == ("EigenAdamW" if optimizer == "eigen_adamw" else "AdamW")
    assert _group_lrs(inner, model) == {"A": {1e-3}, "B": {16e-3}}  # constant schedule: the lrs as set
    assert all(g["params"] for g in inner.param_groups)
    assert trainer.grit_preconditioner.step_count == 3 and len(losses(trainer)) == 3
    assert all(torch.isfinite(p).all() for p in lora_params(model).values())


def test_eigen_adamw_in_the_trainer_resumes_bit_for_bit(tmp_path):
    """grit_optimizer="eigen_adamw": the inner optimizer is EigenAdamW; its eigenbases and moments are in the
    plain optimizer checkpoint, so a run resumed at step 2 ends where the uninterrupted run does."""
    kw = dict(grit_optimizer="eigen_adamw", grit_kl_clip=None, max_steps=4, save_strategy="steps", save_steps=2)
    full_model = small_model()
    before = lora_params(full_model)
    full = run(full_model, make_args(tmp_path, **kw), make_features(8))
    inner = full.grit_optimizer.optimizer
    assert type(inner).__name__ == "EigenAdamW" and inner.steps == 4
    assert not torch.equal(inner.basis[0, 0], torch.eye(inner.basis.shape[-1]))  # bases from statistics
    after = lora_params(full_model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    resumed_model = small_model()
    run(resumed_model, make_args(tmp_path, **kw), make_features(8), resume=os.path.join(tmp_path, "checkpoint-2"))
    for name, value in lora_params(resumed_model).items():
        assert torch.equal(value, after[name]), name


def test_loraplus_ratio_without_grit_is_plain_loraplus(tmp_path):
    model = small_model()
    trainer = run(model, make_args(tmp_path, grit=False, grit_loraplus_ratio=4.0), make_features(4))
    assert trainer.grit_preconditioner is None and type(trainer.optimizer.optimizer).__name__ == "AdamW"
    assert _group_lrs(trainer.optimizer, model) == {"A": {1e-3}, "B": {4e-3}}
    trainer.create_optimizer()  # a second call does not split again
    assert _group_lrs(trainer.optimizer, model) == {"A": {1e-3}, "B": {4e-3}}


def test_optimizer_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="grit_optimizer must be one of"):
        make_args(tmp_path, grit_optimizer="sgd")
    plain = GritTrainingArguments(output_dir=str(tmp_path), report_to="none", grit=False, grit_optimizer="eigen_adamw")
    assert plain.grit_optimizer == "eigen_adamw"  # unused without GRIT: no error
    with pytest.raises(ValueError, match="needs grit_fisher='kfac' and grit_reprojection='off'.*grit_optimizer='wrap'"):
        GritTrainingArguments(output_dir=str(tmp_path), report_to="none", grit_fisher="kfac_lowrank",
                              grit_optimizer="eigen_adamw")
    auto = GritTrainingArguments(output_dir=str(tmp_path), report_to="none", grit_fisher="kfac_lowrank")
    assert auto.grit_optimizer == "auto" and auto.to_grit_config().kl_clip == GritConfig().kl_clip  # auto -> wrap
    assert make_args(tmp_path, grit_optimizer="wrap", grit_fisher="kfac_lowrank").grit_fisher == "kfac_lowrank"
    for bad in (0.0, -1.0, "16"):
        with pytest.raises(ValueError, match="grit_loraplus_ratio must be a number > 0"):
            make_args(tmp_path, grit_loraplus_ratio=bad)


def test_trainer_rank_schedule_arguments_cut_ranks(tmp_path):
    schedule = dict(grit_reprojection="one_sided", grit_reprojection_freq=2, grit_reprojection_start=2,
                    grit_rank_schedule="linear", grit_rank_end=0.5, grit_rank_schedule_steps=4)
    trainer = run(small_model(), make_args(tmp_path, max_steps=4, **schedule), make_features(8))
    pre = trainer.grit_preconditioner
    assert pre.bank.module_ranks == [2] * pre.num_modules  # r=4 cut to rank_end * 4 at step 4
    assert pre.rank_adapter.history == [(2, 4 * pre.num_modules), (4, 2 * pre.num_modules)]
    assert all(p.shape[0] == 2 for n, p in trainer.model.named_parameters() if "lora_A" in n)
    assert len(losses(trainer)) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses(trainer).values())


# ------------------------------------------------------------------------------------------ 224 modules
def _train_224(tmp_path, quantize_4bit, resume_step=None, max_steps=8):
    model = build_lora_model(tiny_llama_config(), quantize_4bit=quantize_4bit, seed=0)
    args = make_args(
        tmp_path,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=4,
        grit_warmup_steps=2,
        grit_update_freq=2,
    )
    resume = None if resume_step is None else os.path.join(tmp_path, f"checkpoint-{resume_step}")
    return run(model, args, make_features(16, seed=1), resume=resume)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "nf4"])
def run_224(request, tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints at 4 and 8) and a run resumed from checkpoint-4."""
    out = tmp_path_factory.mktemp("nf4" if request.param else "plain")
    full = _train_224(out, request.param)
    full_params = lora_params(full.model)
    full_bank = full.grit_preconditioner.bank.state_dict()
    resumed = _train_224(out, request.param, resume_step=4)
    return dict(
        out=out, full=full, resumed=resumed, full_params=full_params, full_bank=full_bank, nf4=request.param
    )


def test_224_modules_train_with_grit(run_224):
    full = run_224["full"]
    pre = full.grit_preconditioner
    assert pre.num_modules == 224 and pre.step_count == 8
    assert isinstance(full.grit_optimizer, TrainerGritOptimizer)
    steps = losses(full)
    assert sorted(steps) == list(range(1, 9)) and all(torch.isfinite(torch.tensor(list(steps.values()))))
    # preconditioning really happened: inverses are not the identity any more, factors are finite
    eye = torch.eye(pre.bank.max_rank)
    assert not torch.allclose(pre.bank.inverse[FORWARD, 0], eye) and torch.isfinite(pre.bank.factor).all()
    if run_224["nf4"]:
        layer = pre.modules[0].layer
        assert "4bit" in type(layer).__name__


def test_224_modules_resume_matches_uninterrupted_run(run_224):
    full, resumed = run_224["full"], run_224["resumed"]
    for step in (4, 8):
        assert os.path.isfile(os.path.join(run_224["out"], f"checkpoint-{step}", GRIT_CHECKPOINT_NAME))
    full_losses, resumed_losses = losses(full), losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 9))  # 1-4 come from the checkpoint's trainer state
    for step in (5, 6, 7, 8):  # exact: same data order, dropout 0, state restored bit for bit
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    after = lora_params(resumed.model)
    for name, value in run_224["full_params"].items():
        assert torch.equal(after[name], value), name
    bank = resumed.grit_preconditioner.bank.state_dict()
    assert torch.equal(bank["storage"], run_224["full_bank"]["storage"])
    assert resumed.grit_preconditioner.step_count == 8


def test_optimizer_checkpoint_is_plain_and_preconditioner_file_restores(run_224):
    ckpt = os.path.join(run_224["out"], "checkpoint-4")
    opt_state = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    assert set(opt_state) == {"state", "param_groups"}  # plain torch format, loadable without GRIT
    state = torch.load(os.path.join(ckpt, GRIT_CHECKPOINT_NAME), weights_only=True)
    assert state["step_count"] == 4 and len(state["module_names"]) == 224


def test_saved_adapter_is_plain_peft_loadable_without_grit_kernels(run_224, tmp_path):
    """adapter_model.safetensors from a GRIT checkpoint loads with PeftModel.from_pretrained in a fresh
    interpreter that never imports grit_kernels, and reproduces the trained model's logits. (NF4: the
    file holds exactly the plain PEFT keys; the subprocess rebuilds only the fp32 base.)"""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = os.path.join(run_224["out"], "checkpoint-8")
    saved = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    model = run_224["full"].model
    expected = get_peft_model_state_dict(model)
    assert set(saved) == set(expected) and not any("grit" in k for k in saved)
    for key, value in expected.items():
        assert torch.equal(saved[key], value.cpu()), key
    if run_224["nf4"]:
        return
    ids = torch.arange(4, 4 + SEQ)[None]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    tiny_llama_config().to_json_file(tmp_path / "config.json")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, LlamaConfig
        from peft import PeftModel
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(LlamaConfig.from_json_file({str(tmp_path / "config.json")!r}))
        model = PeftModel.from_pretrained(base, {ckpt!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.arange(4, 4 + {SEQ})[None]).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        assert not any(m.startswith("grit_kernels") for m in sys.modules), "grit_kernels was imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=1e-5, atol=1e-5)


def test_logs_carry_grit_metrics(run_224):
    logs = [h for h in run_224["full"].state.log_history if "loss" in h]
    assert len(logs) == 8
    for h in logs:
        for key in ("grit/damping", "grit/condition_max", "grit/inverse_failures", "grit/grad_norm_ratio"):
            assert key in h, (h["step"], key)
        assert h["grit/condition_max"] >= 1.0 and h["grit/inverse_failures"] >= 0
    by_step = {h["step"]: h for h in logs}
    assert by_step[1]["grit/preconditioning_active"] == 0 and by_step[1]["grit/grad_norm_ratio"] == 1.0
    # GritConfig.graft (default) keeps each LoRA tensor's gradient norm, so the ratio stays ~1 when active
    assert by_step[3]["grit/preconditioning_active"] == 1
    assert by_step[3]["grit/grad_norm_ratio"] == pytest.approx(1.0, rel=1e-3)


# ------------------------------------------------------------------------------------------ logging cadence
def test_metrics_and_grad_norm_ratio_computed_on_logging_steps_only(tmp_path, monkeypatch):
    calls = {"summary": 0, "measured": []}
    original_summary = GritPreconditioner.curvature_summary
    original_step = TrainerGritOptimizer.step

    def summary(self):
        calls["summary"] += 1
        return original_summary(self)

    def step(self, closure=None):
        calls["measured"].append(self.measure_grad_norm_ratio)
        return original_step(self, closure)

    monkeypatch.setattr(GritPreconditioner, "curvature_summary", summary)
    monkeypatch.setattr(TrainerGritOptimizer, "step", step)
    trainer = run(small_model(), make_args(tmp_path, max_steps=7, logging_steps=3), make_features(14))
    logged = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [3, 6] and calls["summary"] == 2
    assert calls["measured"] == [False, False, True, False, False, True, True]  # steps 3, 6 and the last


# ------------------------------------------------------------------------------------------ invariances
def test_gradient_accumulation_1x8_equals_4x2(tmp_path):
    """Same optimizer-step batches: factors agree to fp32 rounding (rtol 1e-5), params after 3 steps to
    rtol 1e-4 / atol 1e-6 (micro-batch gradients are summed in a different order)."""
    feats = make_features(24, seed=2)
    one = run(small_model(), make_args(tmp_path / "a", per_device_train_batch_size=8), feats)
    four = run(
        small_model(),
        make_args(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4),
        feats,
    )
    assert one.grit_preconditioner.step_count == four.grit_preconditioner.step_count == 3
    torch.testing.assert_close(_factors(four), _factors(one), rtol=1e-5, atol=1e-9)
    assert_params_close(lora_params(four.model), lora_params(one.model), rtol=1e-4, atol=1e-6)
    for a, b in zip(losses(one).values(), losses(four).values()):
        assert a == pytest.approx(b, rel=1e-5)


class _InfGradAtStep(TrainerCallback):
    """Makes one LoRA gradient infinite during backward of optimizer step ``step`` (1-based)."""

    def __init__(self, param, step):
        self.step, self.active = step, False
        param.register_hook(lambda g: g * float("inf") if self.active else g)

    def on_step_begin(self, args, state, control, **kw):
        self.active = state.global_step + 1 == self.step


def test_fp16_loss_scale_is_divided_out_and_skipped_steps_fold_nothing(tmp_path):
    """A GradScaler's loss scale is divided out of the factors; a step it skips folds no statistics.

    accelerate creates no GradScaler on CPU, so one is installed by hand. accelerate only unscales before
    clipping when its mixed precision is fp16 (true on GPU, not here), so this test runs without
    max_grad_norm: clipping would otherwise act on the still-scaled gradients.
    """
    feats = make_features(8, seed=3)
    ref = run(small_model(), make_args(tmp_path / "ref", max_grad_norm=0.0), feats)

    def scaled_trainer(out, callbacks=None, model=None):
        model = model or small_model()
        trainer = GritTrainer(
            model=model,
            args=make_args(out, max_grad_norm=0.0),
            train_dataset=feats,
            data_collator=DynamicPaddingCollator(0),
            callbacks=callbacks,
        )
        # CPU has no fp16 GradScaler in accelerate; install one so the AMP path is exercised as on GPU
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
        return trainer

    scaled = scaled_trainer(tmp_path / "scaled")
    scaled.train()
    assert scaled.grit_optimizer.grad_scaler is scaled.accelerator.scaler
    torch.testing.assert_close(_factors(scaled), _factors(ref), rtol=1e-5, atol=1e-9)
    assert_params_close(lora_params(scaled.model), lora_params(ref.model), rtol=1e-5, atol=1e-7)

    # an overflow at step 2: the scaler skips the step; its statistics must not reach the factors
    model = small_model()
    target = next(p for n, p in model.named_parameters() if "lora_B" in n)
    inf_cb = _InfGradAtStep(target, step=2)
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            pre = trainer.grit_preconditioner
            seen[state.global_step] = (float(pre.bank.accumulators.abs().sum()), pre.step_count)

    trainer = scaled_trainer(tmp_path / "skip", callbacks=[inf_cb, Probe()], model=model)
    trainer.train()
    assert seen[2] == (0.0, 1)  # step 2 skipped: nothing pending, preconditioner did not advance
    assert seen[1][1] == 1 and seen[3] == (0.0, 2)
    assert trainer.accelerator.scaler.get_scale() == 2.0**11  # the scaler did see the overflow
    assert torch.isfinite(_factors(trainer)).all()


def test_bf16_and_gradient_checkpointing(tmp_path):
    feats = make_features(6, seed=4)
    ref = run(small_model(), make_args(tmp_path / "ref"), feats)
    ckpt = run(
        small_model(),
        make_args(
            tmp_path / "gc",
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        ),
        feats,
    )
    # statistics captured once per micro-batch even though the forward is recomputed
    torch.testing.assert_close(_factors(ckpt), _factors(ref), rtol=1e-5, atol=1e-9)
    assert_params_close(lora_params(ckpt.model), lora_params(ref.model), rtol=1e-5, atol=1e-7)
    bf16 = run(small_model(), make_args(tmp_path / "bf16", bf16=True), feats)
    bank = bf16.grit_preconditioner.bank
    assert bank.factor.dtype == torch.float32 and torch.isfinite(bank.factor).all()
    assert bf16.grit_preconditioner.step_count == 3
    # bf16 autocast changes the numbers, not the scale of the factors
    rel = (_factors(bf16) - _factors(ref)).norm() / _factors(ref).norm()
    assert rel < 0.05, float(rel)


# ------------------------------------------------------------------------------------------ max_grad_norm
class _GradRecorder(TrainerCallback):
    def __init__(self, model):
        self.model, self.before, self.after = model, {}, {}

    def _grads(self):
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.before[state.global_step + 1] = self._grads()

    def on_optimizer_step(self, args, state, control, **kw):
        self.after[state.global_step + 1] = self._grads()


@pytest.mark.parametrize("kl_clip", [None, 1e-4])
def test_max_grad_norm_clips_raw_gradients_before_preconditioning(tmp_path, kl_clip):
    """The Trainer's clip acts on RAW gradients; the preconditioned gradient is P(clip(g)), whose norm the
    clip does not bound. The KL-clip does bound the preconditioned step: lr^2 * g_pre.g <= kl_clip."""
    max_norm, lr = 1e-3, 0.05
    model = small_model()
    rec = _GradRecorder(model)
    args = make_args(
        tmp_path,
        optim="sgd",
        learning_rate=lr,
        max_grad_norm=max_norm,
        grit_warmup_steps=0,
        grit_kl_clip=kl_clip,
        grit_graft=False,  # the natural-gradient step itself
    )
    trainer = run(model, args, make_features(6, seed=5), callbacks=[rec])
    pre = trainer.grit_preconditioner
    step = 3
    raw, out = rec.before[step], rec.after[step]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()]))
    assert raw_norm <= max_norm * (1 + 1e-4)  # clipped: the unclipped norm is far larger
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert logged[step]["grad_norm"] > 10 * max_norm  # the logged grad_norm is the raw, pre-clip norm
    names = {m.lora_A: m for m in pre.modules}
    by_name = {n: p for n, p in model.named_parameters()}
    dot, out_sq = 0.0, 0.0
    expected = {}
    for name, g in raw.items():
        p = by_name[name]
        m = names.get(p)
        if m is not None:
            expected[name] = pre.bank.inverse[BACKWARD, m.index] @ g
            b_name = name.replace("lora_A", "lora_B")
            expected[b_name] = raw[b_name] @ pre.bank.inverse[FORWARD, m.index]
    assert len(expected) == 2 * pre.num_modules
    for name, e in expected.items():
        dot += float((out[name] * raw[name]).sum())
        out_sq += float(out[name].pow(2).sum())
        if kl_clip is None:
            torch.testing.assert_close(out[name], e, rtol=1e-4, atol=1e-10)
    out_norm = out_sq**0.5
    if kl_clip is None:
        assert out_norm > 10 * max_norm  # max_grad_norm does not bound the preconditioned gradient
        ratio = logged[step]["grit/grad_norm_ratio"]
        assert ratio == pytest.approx(out_norm / float(raw_norm), rel=1e-3)
    else:
        assert lr**2 * dot <= kl_clip * (1 + 1e-4)


# ------------------------------------------------------------------------------------------ enable_grit
