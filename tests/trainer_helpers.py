"""Shared helpers of the Trainer tests (tests/test_trainer*.py): tiny models, features, arguments, a run."""

import torch

from grit_kernels.data import IGNORE_INDEX, DynamicPaddingCollator
from grit_kernels.models import build_lora_model, tiny_llama_config
from grit_kernels.trainer import GritTrainer, GritTrainingArguments

SEQ = 24




def make_features(n, seed=0, seq=SEQ, vary_length=False):
    """Random byte-token rows; the first 3..10 tokens are a masked 'prompt'."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g)) if vary_length else seq
        ids = torch.randint(4, 260, (length,), generator=g).tolist()
        n_prompt = int(torch.randint(3, 11, (1,), generator=g))
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return feats


def make_args(out, cls=GritTrainingArguments, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if cls is GritTrainingArguments:  # the mechanics of the "wrap" path (preconditioned gradients); the default
        # EigenAdamW path has its own tests (test_trainer.py: test_default_optimizer_is_eigen_adamw, ...)
        base.update(grit_warmup_steps=1, grit_update_freq=1, grit_optimizer="wrap")
    base.update(kw)
    return cls(**base)


def small_model(num_layers=2, **kw):
    return build_lora_model(tiny_llama_config(num_layers=num_layers), r=4, **kw)


def run(model, args, feats, trainer_cls=GritTrainer, callbacks=None, resume=None, **kw):
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=feats,
        data_collator=DynamicPaddingCollator(pad_token_id=0),
        callbacks=callbacks,
        **kw,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def assert_params_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


# ------------------------------------------------------------------------------------------ arguments


def _factors(trainer):
    return trainer.grit_preconditioner.bank.factor.clone()
