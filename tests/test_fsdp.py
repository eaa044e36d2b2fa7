"""FSDP2 (``fully_shard``): two gloo processes on CPU give one process's training on the concatenated batch
(PEFT's layers with gradient accumulation; gk.fuse with activation checkpointing; the gradient KL-clip; QLoRA with
a float quant storage, fused), a sharded checkpoint resumes bit for bit, GritTrainer runs and resumes under
accelerate's FSDP2, and every refusal says why and what works. One spawn of two processes per group of checks
(process start-up dominates)."""

import datetime
import functools
import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import (
    LR,
    STEPS,
    WORLD,
    _free_port,
    finish_ranks,
    global_batches,
    spawn_ranks,
    supervised,
)
from torch import nn

import grit_kernels as gk
from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner
from grit_kernels.distributed import check_fsdp_supported
from grit_kernels.models import build_lora_model, tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RANK = 3  #: uneven shards of lora_A: rows [0, 2) on rank 0, [2, 3) on rank 1
CONFIG = {"warmup_steps": 1, "update_freq": 1, "kl_clip": 1e-4}
#: name -> (gk.fuse before / after fully_shard or not, activation checkpointing, micro-batches per step, graft, gradient-level KL-clip, 4-bit storage)
SCENARIOS = {
    "peft_accumulation": (False, False, 2, True, False, None),
    "fused_checkpointing": ("before", True, 1, True, False, None),
    "gradient_clip_no_graft": (False, False, 1, False, True, None),
    "qlora_fused": ("after", False, 1, True, False, "float32"),
}


def fused(model):
    report = gk.fuse(model)
    assert report.base_stack_blocks == report.num_blocks == 2, report


def make(fuse=False, checkpointing=False, graft=True, shard=False, storage=None, mp_policy=None):
    quant = {"quantize_4bit": True, "quant_storage": getattr(torch, storage)} if storage else {}
    model = build_lora_model(tiny_llama_config(num_layers=2), r=RANK, seed=0, init_lora_weights=False, **quant)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fuse == "before":  # as a Trainer does: the fused blocks must notice that fully_shard replaced the weights
        fused(model)
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
    if fuse == "after":  # on DTensor weights
        fused(model)
    pre = GritPreconditioner(model, GritConfig(**CONFIG, graft=graft))
    opt = GritOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR), pre)
    return model, pre, opt


def train_step(model, pre, opt, ids, labels, micro, gradient_clip, rows=None, world=1):
    """One optimizer step on ``ids[rows]`` in ``micro`` micro-batches, the loss normalised by the global token
    count (times the world size: FSDP averages the gradients over ranks, like DDP)."""
    rows = rows if rows is not None else slice(None)
    local_ids, local_labels = ids[rows], labels[rows]
    n = supervised(labels)
    parts = list(zip(local_ids.chunk(micro), local_labels.chunk(micro)))
    for i, (x, y) in enumerate(parts):
        if hasattr(model, "set_requires_gradient_sync"):  # what accelerate's no_sync does under FSDP2
            model.set_requires_gradient_sync(i == len(parts) - 1)
        (model(input_ids=x, labels=y, num_items_in_batch=n).loss * world).backward()
    if gradient_clip:  # the gradient-level KL-clip: GritPreconditioner.step(lr) before a plain optimizer step
        pre.step(lr=LR)
        opt.optimizer.step()
    else:
        opt.step()
    opt.zero_grad()


def lora_state(model, full=True):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p = p.detach()
            out[name] = (p.full_tensor() if full else p.to_local()).clone() if hasattr(p, "to_local") else p.clone()
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(  # (RANK, ... for accelerate, which reuses this process group)
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
    )
    # a rank that takes another decision than its peer fails its next collective within a minute, not 30
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    rows = slice(rank * 2, (rank + 1) * 2)
    try:
        results = {}
        for name, (fuse, ckpt, micro, graft, gclip, storage) in SCENARIOS.items():
            model, pre, opt = make(fuse, ckpt, graft, shard=True, storage=storage)
            assert pre.sharded
            for ids, labels in global_batches():
                train_step(model, pre, opt, ids, labels, micro, gclip, rows, WORLD)
            results[name] = {"params": lora_state(model), "factor": pre.bank.factor.clone()}
            if fuse:  # the fused blocks read FSDP's gathered weights and dropped their full stacked / packed copies
                for layer in model.base_model.model.model.layers:
                    weights = layer.self_attn.o_proj.__dict__["_grit_fused"].group.weights
                    assert weights.live and weights.stacked is None and weights.packed is None
        # resume: 2 steps, a sharded checkpoint (torch.distributed.checkpoint), a fresh process state, 1 step
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        batches = global_batches()
        model, pre, opt = make(shard=True)
        for ids, labels in batches[:2]:
            train_step(model, pre, opt, ids, labels, 1, False, rows, WORLD)
        model_sd, optim_sd = get_state_dict(model, opt.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
        grit_state = pre.state_dict()
        train_step(model, pre, opt, *batches[2], 1, False, rows, WORLD)
        uninterrupted = lora_state(model, full=False)
        model, pre, opt = make(shard=True)
        model_sd, optim_sd = get_state_dict(model, opt.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
        set_state_dict(model, opt.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        pre.load_state_dict(grit_state)
        train_step(model, pre, opt, *batches[2], 1, False, rows, WORLD)
        resumed = lora_state(model, full=False)
        results["resume_equal"] = all(torch.equal(uninterrupted[n], resumed[n]) for n in uninterrupted)
        # a NaN in one rank's gradient shard only: every rank skips the step (the check is all-reduced)
        model, pre, opt = make(shard=True)
        before = lora_state(model, full=False)
        ids, labels = batches[0]
        (model(input_ids=ids[rows], labels=labels[rows]).loss * WORLD).backward()
        if rank == 1:
            next(p for p in model.parameters() if p.requires_grad).grad.to_local().view(-1)[0] = float("nan")
        with pytest.warns(RuntimeWarning, match="NaN/Inf in LoRA gradients, step skipped"):
            opt.step()
        after = lora_state(model, full=False)
        results["nan_skipped"] = opt.skipped_steps == 1 and all(torch.equal(before[n], after[n]) for n in before)
        results["refusals"] = refusals()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        _trainer_part(rank, out_dir)
        finish_ranks()
    finally:
        if dist.is_initialized():  # an exception above: tear down without waiting for the peer
            dist.destroy_process_group()


@functools.cache
def single_process(fuse, ckpt, micro, graft, gclip, storage):
    """One process, unsharded, on the concatenated batch (PEFT's path, no checkpointing, one micro-batch)."""
    model, pre, opt = make(graft=graft, storage=storage)  # (unfused: fuse is checked against PEFT's path)
    init = lora_state(model)
    for ids, labels in global_batches():
        train_step(model, pre, opt, ids, labels, 1, gclip)
    return init, lora_state(model), pre.bank.factor.clone()


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_worker, (_free_port(), str(out)))
    return out


@pytest.fixture(scope="module")
def fsdp_results(fsdp_dir):
    return [torch.load(fsdp_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fsdp2_matches_one_process_on_concatenated_batch(fsdp_results, scenario):
    """Statistics all-reduced once per step (1/W^2), grad_B preconditioned on local rows, grad_A gathered, the
    grafting norms, the KL-clips and the gradient check reduced: the weights move as in one process. Errors are
    measured against the distance the weights moved (the LR is small: a wrong factor still moves them)."""
    init, ref, ref_factor = single_process(*SCENARIOS[scenario])
    for res in fsdp_results:
        got = res[scenario]
        factor_error = (got["factor"] - ref_factor).norm() / ref_factor.norm()
        assert factor_error < 1e-4, factor_error
        for name, value in ref.items():
            moved = (value - init[name]).norm()
            assert moved > 0, name
            error = (got["params"][name] - value).norm() / moved
            assert error < 1e-3, (scenario, name, float(error))
    assert all(torch.equal(fsdp_results[0][scenario]["factor"], r[scenario]["factor"]) for r in fsdp_results)


def test_fsdp2_resume_from_sharded_checkpoint_is_bit_for_bit(fsdp_results):
    assert all(r["resume_equal"] for r in fsdp_results)


def test_fsdp2_nan_in_one_shard_skips_the_step_on_every_rank(fsdp_results):
    assert all(r["nan_skipped"] for r in fsdp_results)


# ------------------------------------------------------------------------------------------------ refusals
def test_fsdp1_is_refused_and_fsdp2_modules_pass():
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].__class__ = type("FSDPLinear", (FullyShardedDataParallel, nn.Linear), {})
    with pytest.raises(NotImplementedError, match=r"FSDP1 \(FullyShardedDataParallel, module '1'\).*FlatParameter.*"
                       r"Use FSDP2 .*fully_shard.*or DDP"):
        check_fsdp_supported(model)
    model[1].__class__ = type("FSDPLinear2", (FSDPModule, nn.Linear), {})  # what fully_shard does
    check_fsdp_supported(model)


def refusals() -> dict[str, str]:
    """Build each refused FSDP2 setup (inside the workers' process group); ``{case: error message}``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    messages = {}

    def refused(key, fn):
        try:
            fn()
        except NotImplementedError as e:
            messages[key] = str(e)

    def sharded(**cfg):
        model = build_lora_model(tiny_llama_config(num_layers=1), r=2, seed=0)
        fully_shard(model)
        return GritPreconditioner(model, GritConfig(**cfg))

    refused("diagonal", lambda: sharded(fisher="diagonal"))
    refused("reprojection", lambda: sharded(reprojection="one_sided"))

    def partial():
        model = build_lora_model(tiny_llama_config(num_layers=2), r=2, seed=0)
        fully_shard(model.base_model.model.model.layers[0])
        GritPreconditioner(model)

    refused("partial", partial)

    def hsdp():
        from torch.distributed.device_mesh import init_device_mesh

        model = build_lora_model(tiny_llama_config(num_layers=1), r=2, seed=0)
        fully_shard(model, mesh=init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
        GritPreconditioner(model)

    refused("hsdp", hsdp)

    def eigen():
        pre = sharded()
        model = pre._model
        opt = GritOptimizer(gk.EigenAdamW([p for p in model.parameters() if p.requires_grad], pre, lr=1e-3), pre)
        ids = torch.randint(4, 200, (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    refused("eigen_adamw", eigen)
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    refused("qlora_storage_cast", lambda: make(shard=True, storage="float32", mp_policy=bf16))

    def no_module_state():
        model = build_lora_model(tiny_llama_config(num_layers=1), r=2, seed=0, quantize_4bit=True,
                                 quant_storage=torch.float32)
        fully_shard(model)
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.quant_state = None  # a Params4bit built without module=layer
        GritPreconditioner(model)

    refused("qlora_no_module_state", no_module_state)
    make(shard=True, storage="uint8", mp_policy=bf16)  # integer storage: FSDP never casts it; accepted
    return messages


def test_fsdp2_refusals_name_the_reason_and_what_works(fsdp_results):
    messages = fsdp_results[0]["refusals"]
    assert set(messages) == {
        "diagonal", "reprojection", "partial", "hsdp", "eigen_adamw", "qlora_storage_cast", "qlora_no_module_state"
    }, messages
    assert "needs a 1-D mesh" in messages["hsdp"] and "2-D mesh" in messages["hsdp"]
    assert "fisher='diagonal'" in messages["diagonal"] and "or DDP" in messages["diagonal"]
    assert "reprojection='one_sided'" in messages["reprojection"]
    assert "are not sharded" in messages["partial"] and "fully_shard every decoder layer" in messages["partial"]
    assert "EigenAdamW" in messages["eigen_adamw"] and "default GritOptimizer" in messages["eigen_adamw"]
    assert "torch.float32 (bnb_4bit_quant_storage)" in messages["qlora_storage_cast"]
    assert "corrupts the packed bytes" in messages["qlora_storage_cast"]
    assert "bnb_4bit_quant_storage=torch.bfloat16" in messages["qlora_storage_cast"]
    assert "no quant_state" in messages["qlora_no_module_state"]
    assert "module=layer" in messages["qlora_no_module_state"]


# ------------------------------------------------------------------------------------------------ the Trainer
def _accelerate_fsdp_on_cpu():
    """accelerate turns its FSDP plugin on for accelerator devices only (``MULTI_GPU``, ...), never for
    ``MULTI_CPU``: set the state as its GPU branch does (``distributed_type = FSDP``, ``fsdp_plugin``), so the
    Trainer's FSDP2 path (prepare -> fully_shard, sharded checkpoints) runs here with gloo."""
    from accelerate.state import AcceleratorState, DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def _trainer_part(rank, out_dir):
    """GritTrainer under accelerate's FSDP2 (3 steps, sharded checkpoint at 2), then a Trainer with enable_grit
    resuming from it; in the workers' process group (one spawn for all of this file's multi-process checks)."""
    from trainer_helpers import make_args, make_features, run, small_model

    _accelerate_fsdp_on_cpu()
    fsdp_args = dict(
        ddp_backend="gloo", optim="sgd", learning_rate=LR, grit_kl_clip=1e-3, max_steps=STEPS,
        fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                     "state_dict_type": "SHARDED_STATE_DICT"},
        save_strategy="steps", save_steps=2,
    )
    run_dir = os.path.join(out_dir, "trainer")
    trainer = run(small_model(), make_args(run_dir, **fsdp_args), make_features(16, seed=9))
    assert trainer.args.world_size == WORLD and trainer.grit_preconditioner.sharded
    final = lora_state(trainer.model)
    # the resumed run: a plain Trainer with enable_grit (the same GRIT path as GritTrainer's)
    from transformers import Trainer

    from grit_kernels.data import DynamicPaddingCollator

    resumed = Trainer(model=small_model(), args=make_args(run_dir, **fsdp_args), train_dataset=make_features(16, seed=9),
                      data_collator=DynamicPaddingCollator(pad_token_id=0))
    gk.enable_grit(resumed)
    resumed.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2"))
    assert resumed.grit_preconditioner.sharded
    torch.save(
        {
            "factor": trainer.grit_preconditioner.bank.factor.clone(),
            "params": final,
            "resumed_params": lora_state(resumed.model),
            "resumed_factor": resumed.grit_preconditioner.bank.factor.clone(),
        },
        os.path.join(out_dir, f"trainer-rank{rank}.pt"),
    )


def test_grit_trainer_under_fsdp2_matches_one_process_and_resumes(fsdp_dir, tmp_path):
    """GritTrainer with accelerate's FSDP2 (fsdp_version 2, two gloo ranks x 2 rows) == one process with 4 rows per
    step; a Trainer with enable_grit resuming from its sharded checkpoint-2 reproduces step 3 bit for bit."""
    from trainer_helpers import make_args, make_features, run, small_model

    init = lora_state(small_model())
    single = run(
        small_model(),
        make_args(tmp_path / "single", per_device_train_batch_size=2 * WORLD, optim="sgd", learning_rate=LR,
                  grit_kl_clip=1e-3, max_steps=STEPS),
        make_features(16, seed=9),
    )
    ref_factor = single.grit_preconditioner.bank.factor
    for r in range(WORLD):
        res = torch.load(fsdp_dir / f"trainer-rank{r}.pt", weights_only=True)
        assert (res["factor"] - ref_factor).norm() / ref_factor.norm() < 1e-4
        for name, value in lora_state(single.model).items():
            key = name if name in res["params"] else name.replace("base_model.model.", "", 1)
            error = (res["params"][key] - value).norm() / (value - init[name]).norm()
            assert error < 1e-3, (r, name, float(error))
        assert all(torch.equal(res["params"][n], res["resumed_params"][n]) for n in res["params"])
        assert torch.equal(res["factor"], res["resumed_factor"])


def test_trainer_under_fsdp2_accepts_kfac_and_refuses_what_cannot_shard(tmp_path, monkeypatch):
    """The Trainer-level decision, before any sharding: FSDP2 (fsdp_version 2) is accepted, the options that need
    whole LoRA tensors are refused at once (not at the first step)."""
    from types import SimpleNamespace

    from trainer_helpers import make_args, make_features, small_model
    from transformers import Trainer, TrainingArguments

    def fsdp2_trainer(**kw):
        trainer = Trainer(model=small_model(), args=make_args(tmp_path, **kw), train_dataset=make_features(2))
        monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
        plugin = SimpleNamespace(fsdp_version=2)  # what accelerate's state holds under fsdp_version 2
        monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
        return trainer

    assert gk.enable_grit(fsdp2_trainer(cls=TrainingArguments)).grit_config is not None
    with pytest.raises(NotImplementedError, match=r"FSDP2 \(fully_shard\) does not support fisher='diagonal'.*or DDP"):
        gk.enable_grit(fsdp2_trainer(cls=TrainingArguments), GritConfig(fisher="diagonal"))
    with pytest.raises(NotImplementedError, match=r"does not support grit_optimizer='eigen_adamw'"):
        gk.enable_grit(fsdp2_trainer(grit_optimizer="eigen_adamw"))
