"""Misuse that used to fail silently or with a misleading message: an adapter switched after the
preconditioner was built, an all-DoRA model, an empty training set."""

import warnings

import pytest
import torch
from helpers import small_llama

import grit_kernels as gk


def _backward(model, seed=0):
    ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()


def test_adapter_switch_is_named_with_the_way_out():
    from peft import LoraConfig

    model = small_llama(num_layers=1)
    pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0))
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.set_adapter("second")
    _backward(model)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "active adapter changed from 'default' to 'second'" in message
    assert (
        "model.set_adapter('default')" in message
        and "pre.remove(); pre = GritPreconditioner(model" in message
    )
    assert "-100" not in message and opt.skipped_steps == 0
    with pytest.raises(RuntimeError, match="active adapter changed"):
        pre.step()  # a custom loop without GritOptimizer is told too

    # switching back: GRIT steps again
    opt.zero_grad()
    model.set_adapter("default")
    _backward(model)
    opt.step()
    assert pre.step_count == 1 and opt.skipped_steps == 0

    # following the switch, as the message says
    model.set_adapter("second")
    pre.remove()
    pre2 = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0))
    opt2 = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre2)
    assert pre2.num_modules == 2  # "second" targets q_proj and v_proj of the one layer
    assert all(m.lora_A is m.layer.lora_A["second"].weight for m in pre2.modules)
    opt2.zero_grad()
    before = [p.detach().clone() for p in pre2.parameters()]
    _backward(model, seed=1)
    opt2.step()
    assert pre2.step_count == 1 and bool(pre2.bank.initialized.all())
    assert any(not torch.equal(b, p) for b, p in zip(before, pre2.parameters()))


def test_all_dora_model_says_dora_is_unsupported():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from grit_kernels.models import tiny_llama_config

    base = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=1))
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as info:
            gk.GritPreconditioner(dora)
    message = str(info.value)
    assert "none of the model's 2 LoRA layer(s) is supported" in message
    assert "DoRA" in message and "use_dora=False" in message and "get_peft_model" not in message


def _trainer(dataset, tmp_path):
    from grit_kernels.data import DynamicPaddingCollator

    args = gk.GritTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        report_to="none",
        remove_unused_columns=False,
        save_strategy="no",
    )
    return gk.GritTrainer(
        model=small_llama(num_layers=1),
        args=args,
        train_dataset=dataset,
        data_collator=DynamicPaddingCollator(0),
    )


def test_empty_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        _trainer([], tmp_path)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 2
    trainer = _trainer(rows, tmp_path)
    trainer.train_dataset = []  # emptied after construction: caught when training starts
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        trainer.train()
