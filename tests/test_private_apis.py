"""Every private torch (and PEFT / transformers) API the package relies on, checked for what the code expects
(docs/design.md, "Private APIs"). A failure here means a dependency changed under us: fix the code that
uses the API (listed in each test's docstring) before anything else, since most of these degrade silently."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from grit_kernels.fisher import _checkpoint_phase

FOREACH_USED = (  # grit_kernels/{preconditioner,eigen_adam,trainer}.py, fisher/, ops/{precondition,step}.py
    "_foreach_add", "_foreach_add_", "_foreach_addcmul_", "_foreach_clamp_min", "_foreach_copy_",
    "_foreach_div", "_foreach_div_", "_foreach_lerp_", "_foreach_mul", "_foreach_mul_", "_foreach_norm",
    "_foreach_sqrt", "_foreach_sub",
)


def test_top_saved_tensors_default_hooks_tells_checkpoint_phases():
    """fisher.capture._checkpoint_phase (fisher="kfac_full"/"kfac_lowrank" input capture under activation
    checkpointing) reads ``torch._C._autograd._top_saved_tensors_default_hooks`` and matches the qualnames of
    torch.utils.checkpoint's ``_checkpoint_hook`` / ``_recomputation_hook``. If this breaks, the code falls back
    to holding every LoRA input (memory grows, nothing else says so)."""
    assert callable(getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None))
    phases = []

    def block(x):
        phases.append(_checkpoint_phase())
        return (x * 2).sin()

    x = torch.randn(4, 3, requires_grad=True)
    assert _checkpoint_phase() is None
    out = checkpoint(block, x, use_reentrant=False)
    assert phases == ["forward"]
    out.sum().backward()
    assert phases == ["forward", "recompute"]
    phases.clear()
    checkpoint(block, x, use_reentrant=True).sum().backward()  # reentrant: no hooks, plain phases
    assert phases == [None, None]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # other hooks are not checkpoint's
        assert _checkpoint_phase() is None


def test_current_graph_task_id_and_queue_callback():
    """layers.StatsRecorder (every GRIT step) batches the statistics of one backward: it reads
    ``torch._C._current_graph_task_id()`` (-1 outside a backward, one id per backward) and queues its flush with
    ``torch.autograd.Variable._execution_engine.queue_callback`` (runs once when that backward ends).
    fisher.capture._LargeFactorCapture._meet keys recomputed inputs by the same task id."""
    assert torch._C._current_graph_task_id() == -1
    seen, flushed = [], []

    def hook(grad):
        task = torch._C._current_graph_task_id()
        seen.append(task)
        if len(seen) == 1:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: flushed.append(len(seen)))
        return grad

    x = torch.randn(3, requires_grad=True)
    a, b = x * 2, x * 3
    a.register_hook(hook)
    b.register_hook(hook)
    (a + b).sum().backward()
    assert len(seen) == 2 and seen[0] == seen[1] >= 0
    assert flushed == [2]  # after every hook of that backward, once
    first = seen[0]
    seen.clear()
    a, b = x * 2, x * 3
    a.register_hook(hook)
    b.register_hook(hook)
    (a + b).sum().backward()
    assert seen[0] != first  # a new backward, a new id


def test_dispatch_has_kernel_for_dispatch_key():
    """_ext._registered: whether the compiled ``grit_kernels_cpp`` ops have a CPU / CUDA kernel; an undefined
    operator must raise RuntimeError (caught there as "not registered")."""
    fn = torch._C._dispatch_has_kernel_for_dispatch_key
    assert fn("aten::add.Tensor", "CPU") is True
    with pytest.raises(RuntimeError):
        fn("grit_kernels_no_such_namespace::op", "CPU")


def test_grad_scaler_scale_is_readable():
    """GritOptimizer._loss_scale divides the AMP loss scale out of the backward factor without a host sync:
    ``scaler._get_scale_async()`` if it exists, else ``scaler._scale``."""
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale
    assert isinstance(scale, torch.Tensor) and float(scale) == 8.0


def test_foreach_ops_exist_and_agree_with_loops():
    """The ``torch._foreach_*`` ops (grouped arithmetic over hundreds of LoRA tensors: preconditioning, KL-clip,
    grafting, EigenAdamW, gradient norms)."""
    missing = [n for n in FOREACH_USED if not callable(getattr(torch, n, None))]
    assert not missing, missing
    ts = [torch.randn(3, 2), torch.randn(5)]
    assert all(torch.allclose(n, t.norm()) for n, t in zip(torch._foreach_norm(ts), ts))
    assert all(torch.equal(m, t * 2) for m, t in zip(torch._foreach_mul(ts, 2.0), ts))


def test_optimizer_step_hook_dicts():
    """GritOptimizer subclasses torch.optim.Optimizer without its __init__ (it shares the inner optimizer's
    param_groups) and sets ``_optimizer_step_pre_hooks`` / ``_optimizer_step_post_hooks``, the dicts
    Optimizer's step wrapper and ``register_step_*_hook`` use."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert isinstance(opt._optimizer_step_pre_hooks, dict) and isinstance(opt._optimizer_step_post_hooks, dict)
    handle = opt.register_step_pre_hook(lambda *a: None)
    assert len(opt._optimizer_step_pre_hooks) == 1
    handle.remove()


def test_module_private_dicts():
    """fused/ reads ``Module._parameters`` / ``_modules`` (a flat list of hundreds of LoRA weights without
    ``__getattr__``) and ``_forward_hooks`` / ``_forward_pre_hooks`` (a block with user hooks is not fused)."""
    lin = torch.nn.Linear(2, 3)
    seq = torch.nn.Sequential(lin)
    assert seq._modules["0"] is lin and lin._parameters["weight"] is lin.weight
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    lin.register_forward_hook(lambda *a: None)
    lin.register_forward_pre_hook(lambda *a: None)
    assert lin._forward_hooks and lin._forward_pre_hooks


def test_peft_lora_layer_private_attributes():
    """layers._grit_forward calls ``LoraLayer._cast_input_dtype``; fused/functions.py reads
    ``_disable_adapters`` and ``_active_adapter`` (the per-call checks of a fused block)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(r=2, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    assert callable(layer._cast_input_dtype)
    assert layer._disable_adapters is False and layer._active_adapter in ("default", ["default"])


def test_transformers_private_hooks():
    """trainer.GritTrainer overrides ``Trainer._save_checkpoint`` / ``_load_optimizer_and_scheduler`` and calls
    ``_get_output_dir`` (the preconditioner checkpoint beside the optimizer's); fused/patch.py reads
    ``config._attn_implementation``."""
    transformers = pytest.importorskip("transformers")
    for name in ("_save_checkpoint", "_load_optimizer_and_scheduler", "_get_output_dir"):
        assert callable(getattr(transformers.Trainer, name, None)), name
    cfg = transformers.LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=16
    )
    assert hasattr(cfg, "_attn_implementation")
