"""The tiny 224-module Llama (32 layers x q,k,v,o,gate,up,down, r=16), plain and NF4, from PEFT's init."""

import pytest
import torch

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner
from grit_kernels.models import build_lora_model, tiny_llama_config


@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["lora", "qlora-nf4"])
def test_tiny_llama_224_modules_trains_50_steps(quantize_4bit):
    model = build_lora_model(tiny_llama_config(), r=16, quantize_4bit=quantize_4bit, seed=0)
    pre = GritPreconditioner(model, GritConfig())
    assert pre.num_modules == 224 and not pre.skipped
    if quantize_4bit:
        assert all("4bit" in type(m.layer).__name__ for m in pre.modules)
    opt = GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 512, (4, 4, 32), generator=gen)  # 4 batches, cycled
    losses = []
    for step in range(50):
        ids = data[step % 4]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, (first, last)
    assert torch.isfinite(pre.bank.storage).all()
    assert (pre.bank.status == 0).all()  # every inversion succeeded without fallback
    assert all(torch.isfinite(p).all() for p in pre.parameters())


def sgd_run(kl_clip, steps=12):
    """SGD + GRIT from PEFT's init (B = 0). Returns losses and the largest per-step change of any
    layer's effective weight s*B*A relative to the layer's base weight norm."""
    model = build_lora_model(tiny_llama_config(num_layers=4), r=8, seed=1)
    # graft=False: the raw natural-gradient step, the one the clip has to bound (grafting bounds it by itself)
    pre = GritPreconditioner(model, GritConfig(warmup_steps=2, update_freq=1, kl_clip=kl_clip, graft=False))
    opt = GritOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), pre)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))

    def deltas():
        return [m.layer.scaling["default"] * (m.lora_B @ m.lora_A).detach() for m in pre.modules]

    losses, worst = [], 0.0
    for _ in range(steps):
        before = deltas()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        for m, old, new in zip(pre.modules, before, deltas()):
            worst = max(worst, ((new - old).norm() / m.layer.base_layer.weight.norm()).item())
    return losses, worst


def test_sgd_from_peft_init_kl_clip_bounds_the_step():
    """B = 0 at PEFT init makes D ~ 0 and natural-gradient steps large in directions the loss hardly
    sees. The KL-clip (computed on the device) bounds them; without it the same run moves weights
    several times further per step."""
    clipped_losses, clipped = sgd_run(kl_clip=1e-5)
    _, unclipped = sgd_run(kl_clip=None)
    assert all(torch.isfinite(torch.tensor(clipped_losses)))
    assert clipped_losses[-1] < clipped_losses[0] and max(clipped_losses) <= clipped_losses[0] + 1e-3
    assert clipped < 0.25, clipped
    assert unclipped > 3 * clipped, (unclipped, clipped)
