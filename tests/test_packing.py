"""Padding-free packing is exact: a packed row gives, for every supervised token, the loss of the
unpacked run (each sequence alone, and a dynamically padded batch), the same LoRA gradients, and the
same GRIT statistics -- with PEFT's path and with ``gk.fuse``, under the ``sdpa`` and ``eager``
attention implementations (fp32)."""

import pytest
import torch
from helpers import TINY_OPT, small_llama

import grit_kernels as gk
from grit_kernels.data import IGNORE_INDEX, DynamicPaddingCollator, PackedCollator, packing_isolates

RTOL = 1e-5  # fp32: same math, attention over a different (masked) key range -> rounding only
LENGTHS = (9, 4, 13, 6)


def features(seed=0, lengths=LENGTHS):
    """Rows with a masked prompt of 1-3 tokens and a supervised response (byte-tokenizer ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, 260, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def token_losses(logits, labels):
    """Per-token next-token CE ``[T-1]`` of one row (0 where the target is ignored) and the target mask."""
    targets = labels[1:]
    ce = torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="none")
    return ce, targets != IGNORE_INDEX


def unpacked_losses(model, feats):
    """Per-token losses of every sequence run alone (batch of one, no padding)."""
    out = []
    for f in feats:
        logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        out.append(token_losses(logits, torch.tensor(f["labels"])))
    return out


def padded_losses(model, feats):
    batch = DynamicPaddingCollator(0)(feats)
    logits = model(**batch).logits
    return [
        token_losses(logits[i, : len(f["input_ids"])], batch["labels"][i, : len(f["input_ids"])])
        for i, f in enumerate(feats)
    ]


def packed_losses(model, feats):
    batch = PackedCollator()(feats)
    logits = model(**batch).logits[0]
    out, start = [], 0
    for f in feats:
        n = len(f["input_ids"])
        out.append(token_losses(logits[start : start + n], torch.tensor(f["labels"])))
        start += n
    return out


def set_attention(model, impl):
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_per_token_losses_equal_unpacked(impl, fused):
    model = small_llama(num_layers=2, seed=1).eval()
    set_attention(model, impl)
    if fused:
        gk.fuse(model)
    feats = features()
    with torch.no_grad():
        alone, padded, packed = (fn(model, feats) for fn in (unpacked_losses, padded_losses, packed_losses))
    n_supervised = 0
    for (ce_a, m_a), (ce_d, m_d), (ce_p, m_p) in zip(alone, padded, packed):
        assert torch.equal(m_a, m_p) and torch.equal(m_a, m_d)
        n_supervised += int(m_a.sum())
        torch.testing.assert_close(ce_p[m_p], ce_a[m_a], rtol=RTOL, atol=0)
        torch.testing.assert_close(ce_d[m_d], ce_a[m_a], rtol=RTOL, atol=0)
    assert n_supervised == sum(sum(x != IGNORE_INDEX for x in f["labels"][1:]) for f in feats) > 0
    # the mean loss the model reports is the mean of the same per-token losses
    with torch.no_grad():
        packed_loss = model(**PackedCollator()(feats)).loss
    mean = torch.cat([ce[m] for ce, m in alone]).mean()
    assert packed_loss.item() == pytest.approx(mean.item(), rel=RTOL)


@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_gradients_and_grit_statistics_equal_padded(impl, fused):
    """Same tokens, same mean loss: the LoRA gradients and GRIT's sum h h^T, sum delta delta^T and row
    counts (rows that carry gradient) of a packed micro-batch equal those of the padded one."""
    results = {}
    for name, collate in (
        ("padded", DynamicPaddingCollator(0, pad_to_multiple_of=8)),
        ("packed", PackedCollator()),
    ):
        model = small_llama(num_layers=2, seed=2).train()
        set_attention(model, impl)
        if fused:
            gk.fuse(model)
        pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0, update_freq=1))
        model(**collate(features(seed=3))).loss.backward()
        results[name] = (lora_grads(model), pre.bank.stat_sum.clone(), pre.bank.rows.clone())
        pre.remove()
    grads_d, stats_d, rows_d = results["padded"]
    grads_p, stats_p, rows_p = results["packed"]
    # every LoRA tensor has a gradient, and packed == padded
    assert grads_p.keys() == grads_d.keys() and grads_d
    for n, g in grads_d.items():
        assert g.abs().sum() > 0, n
        assert rel(grads_p[n], g) < RTOL, n
    # rows that carry gradient: the supervised targets' predecessors (padding and each sequence's
    # last token carry none), identical in both layouts
    assert torch.equal(rows_p, rows_d) and rows_d.sum() > 0
    assert rel(stats_p, stats_d) < RTOL


def test_the_check_detects_leaking_attention():
    """Negative control: with a KV cache (``use_cache=True``, what PackedCollator turns off) transformers
    does not isolate packed sequences, and the comparison above sees it on every later sequence."""
    model = small_llama(num_layers=2, seed=1).eval()
    feats = features()
    batch = PackedCollator()(feats)
    batch["use_cache"] = True
    with torch.no_grad():
        alone = unpacked_losses(model, feats)
        logits = model(**batch).logits[0]
    start = len(feats[0]["input_ids"])
    for f, (ce_a, m_a) in zip(feats[1:], alone[1:]):
        n = len(f["input_ids"])
        ce_p, _ = token_losses(logits[start : start + n], torch.tensor(f["labels"]))
        assert rel(ce_p[m_a], ce_a[m_a]) > 1e-3
        start += n


def test_packing_isolates_tells_llama_from_opt():
    """The probe finetune uses to choose its default: Llama (and the fused model) detects packed rows
    from position_ids; OPT derives positions and masks from attention_mask only, so packing leaks there."""
    from transformers import AutoModelForCausalLM, OPTConfig

    llama = small_llama(num_layers=1, seed=0).train()
    assert packing_isolates(llama) and llama.training
    gk.fuse(llama)
    assert packing_isolates(llama)
    torch.manual_seed(0)
    opt_config = OPTConfig(**TINY_OPT)
    opt = AutoModelForCausalLM.from_config(opt_config).eval()
    assert not packing_isolates(opt) and not opt.training
    with pytest.raises(ValueError, match="two lengths >= 2"):
        packing_isolates(opt, lengths=(1, 3))


def test_packed_collator_drops_padding_and_refuses_non_text_keys():
    from grit_kernels.data import IGNORE_INDEX, PackedCollator

    padded = [
        {"input_ids": [0, 0, 5, 6, 7], "attention_mask": [0, 0, 1, 1, 1], "labels": [-100, -100, 5, 6, 7]},
        {"input_ids": [8, 9, 0], "attention_mask": [1, 1, 0]},
    ]
    batch = PackedCollator()(padded)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="pixel_values"):
        PackedCollator()([{"input_ids": [1, 2], "pixel_values": [0.0]}])
    with pytest.raises(ValueError, match="attention_mask of 2"):
        PackedCollator()([{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}])
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        PackedCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
