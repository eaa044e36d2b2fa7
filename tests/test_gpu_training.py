"""Training paths on a CUDA device against the same run on the CPU: fused blocks vs PEFT (fp32 and bf16), one
GRIT step per fisher option, EigenAdamW. GPU-only (``pytest -m gpu``, run by bench/run_gpu_all.sh); the CPU
versions of these checks are in test_fused.py, test_fisher.py and test_eigen_adam.py.

Each test builds one model, copies it to the device, and compares what the device computes with what the
CPU computes from the same weights and batch. Tolerances: fp32 with TF32 off (torch's default for matmul),
so only the summation order differs; bf16 as test_fused.py's bounds.
"""

import copy

import pytest
import torch
from helpers import gemma_model, small_llama

import grit_kernels as gk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"  #: the device under test (the CPU is the reference)
FP32_RTOL = 1e-4  # device vs CPU (or fused vs PEFT on the device), fp32: summation order only
BF16_RTOL = 5e-2  # bf16 base: 3.1e-2 measured on the CPU for this batch (k_proj lora_A of layer 1)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def batch(device, seed=0, rows=2, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded row
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}


def model_of(arch, seed=0, **kwargs):
    if arch == "llama":
        return small_llama(num_layers=2, seed=seed, **kwargs)
    return gemma_model(arch, num_layers=2, seed=seed, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fused_matches_peft_on_cuda(arch):
    """fp32 on the device: the fused blocks (liger's RMSNorm/RoPE where installed) give PEFT's loss and every
    LoRA gradient."""
    model = model_of(arch).to(DEVICE).train()
    inputs = batch(DEVICE)
    loss, grads = forward_backward(model, inputs)
    report = gk.fuse(model)
    assert len(report.fused_blocks) == 2, report.summary
    f_loss, f_grads = forward_backward(model, inputs)
    assert rel(f_loss, loss) < FP32_RTOL
    assert f_grads.keys() == grads.keys() and len(grads) == 28
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert rel(f_grads[name], g) < FP32_RTOL, name


def test_fused_bf16_on_cuda_within_bounds():
    model = small_llama(num_layers=2, dtype=torch.bfloat16).to(DEVICE).train()
    inputs = batch(DEVICE)
    loss, grads = forward_backward(model, inputs)
    gk.fuse(model)
    f_loss, f_grads = forward_backward(model, inputs)
    assert rel(f_loss.float(), loss.float()) < BF16_RTOL
    for name, g in grads.items():
        assert f_grads[name].dtype == torch.float32 and rel(f_grads[name], g) < BF16_RTOL, name


def grit_sgd_steps(model, config, steps, device, fuse=False):
    """``steps`` GRIT+SGD steps on ``device``; the LoRA parameters after them and the preconditioner."""
    model = model.to(device).train()
    if fuse:
        gk.fuse(model)
    pre = gk.GritPreconditioner(model, config)
    opt = gk.GritOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2), pre)
    for s in range(steps):
        model(**batch(device, seed=s)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().cpu() for n, p in lora_params(model).items()}, pre


@pytest.mark.parametrize(
    ("fisher", "fuse"),
    [("kfac", False), ("kfac", True), ("kfac_lowrank", False), ("kfac_lowrank", True), ("diagonal", False)],
    ids=["kfac", "kfac-fused", "kfac_lowrank", "kfac_lowrank-fused", "diagonal"],
)
def test_grit_steps_on_cuda_match_the_cpu(fisher, fuse):
    """Three GRIT+SGD steps (warm-up 0, refresh every step, backend auto: the Triton/CUDA kernels on the
    device, C++/torch on the CPU) move the adapters alike on both devices, and the factors agree."""
    config = gk.GritConfig(warmup_steps=0, update_freq=1, fisher=fisher, large_factor_rank=4)
    reference = small_llama(num_layers=2, seed=7)
    before = {n: p.detach().clone() for n, p in lora_params(reference).items()}
    on_cuda = copy.deepcopy(reference)
    cpu_params, cpu_pre = grit_sgd_steps(reference, config, 3, "cpu", fuse=fuse)
    cuda_params, cuda_pre = grit_sgd_steps(on_cuda, config, 3, DEVICE, fuse=fuse)
    assert cuda_pre.bank.device.type == torch.device(DEVICE).type
    assert rel(cuda_pre.bank.factor, cpu_pre.bank.factor) < FP32_RTOL
    for name, p in cpu_params.items():
        assert not torch.equal(p, before[name]), f"{name} did not move"
        assert rel(cuda_params[name] - before[name], p - before[name]) < 1e-3, name  # the update itself


def test_eigen_adamw_on_cuda_matches_the_cpu():
    reference = small_llama(num_layers=2, seed=11)
    on_cuda = copy.deepcopy(reference)
    before = {n: p.detach().clone() for n, p in lora_params(reference).items()}
    results = {}
    for device, model in (("cpu", reference), (DEVICE, on_cuda)):
        model.to(device).train()
        pre = gk.GritPreconditioner(model, gk.GritConfig(kl_clip=None))
        opt = gk.GritOptimizer(gk.EigenAdamW(model.parameters(), pre, lr=1e-3), pre)
        for s in range(3):
            model(**batch(device, seed=s)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[device] = {n: p.detach().cpu() for n, p in lora_params(model).items()}
    for name, p in results["cpu"].items():
        assert rel(results[DEVICE][name] - before[name], p - before[name]) < 1e-3, name
