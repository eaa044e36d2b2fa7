"""The patched LoRA layers compute exactly what PEFT computes, and capture statistics only in backward."""

import pytest
import torch
from helpers import small_llama

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(use_rslora=True), dict(quantize_4bit=True), dict(dtype=torch.bfloat16)],
    ids=["lora", "rslora", "nf4", "bf16-base"],
)
def test_patched_forward_equals_peft(kwargs):
    model = small_llama(num_layers=1, seed=2, **kwargs)
    ids = torch.randint(0, 512, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pre = GritPreconditioner(model, GritConfig())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert pre.bank.accumulators.abs().sum() == 0  # no-grad forwards add nothing
    pre.remove()


def test_bf16_activations_fp32_adapters_accumulate_in_fp32():
    model = small_llama(num_layers=1, seed=3, dtype=torch.bfloat16, dropout=0.1)
    pre = GritPreconditioner(model, GritConfig(warmup_steps=0, update_freq=1))
    assert all(p.dtype == torch.float32 for p in pre.parameters())  # PEFT keeps adapters in fp32
    opt = GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.dtype == torch.bfloat16 or loss.dtype == torch.float32
    loss.backward()
    assert pre.bank.stat_sum.dtype == torch.float32
    # every module saw the 2 x 12 tokens once, less the rows with no gradient: the last position of each
    # row predicts nothing, and q_proj at position 0 has delta = 0 (a softmax over one key is constant)
    assert pre.bank.rows.tolist() == [20.0] + [22.0] * 6
    assert (torch.diagonal(pre.bank.stat_sum[0], dim1=1, dim2=2).sum(dim=1) > 0).all()
    opt.step()
    assert torch.isfinite(pre.bank.storage).all() and pre.bank.initialized.all()


def test_backward_counts_each_micro_batch_once():
    model = small_llama(num_layers=1, seed=4)
    pre = GritPreconditioner(model, GritConfig())
    ids = torch.randint(0, 512, (3, 10))
    model(input_ids=ids, labels=ids)  # a forward whose graph is dropped: no statistics
    assert pre.bank.rows.sum() == 0
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    assert pre.bank.rows.tolist() == [2 * 3 * 8] + [2 * 3 * 9] * 6  # see the test above


def test_padding_does_not_change_the_factors():
    """Right padding (masked in attention and labels) adds rows with delta = 0: they are not counted."""
    ids = torch.randint(0, 512, (2, 10))
    model = small_llama(num_layers=1, seed=4)
    pre = GritPreconditioner(model, GritConfig())
    model(input_ids=ids, labels=ids).loss.backward()
    plain = pre.bank.stat_sum.clone(), pre.bank.rows.clone()
    pre.bank.reset_accumulators()
    model.zero_grad()
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], dim=1).long()
    labels = torch.where(mask.bool(), padded, torch.full_like(padded, -100))
    model(input_ids=padded, attention_mask=mask, labels=labels).loss.backward()
    assert torch.equal(pre.bank.rows, plain[1])
    assert torch.allclose(pre.bank.stat_sum, plain[0], rtol=1e-4, atol=1e-6)
