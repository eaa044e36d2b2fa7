"""DDP: two gloo processes on CPU (PEFT's layers, or gk.fuse on every rank) give the factors and parameters
of one unfused process on the concatenated batch."""

import functools
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import grit_kernels as gk
from grit_kernels import GritConfig, GritPreconditioner
from grit_kernels.bank import FactorBank
from grit_kernels.data import IGNORE_INDEX
from grit_kernels.distributed import (
    all_reduce_statistics,
    world_size,
)
from grit_kernels.models import build_lora_model, tiny_llama_config
from grit_kernels.trainer import TrainerGritOptimizer

WORLD, ROWS_PER_RANK, SEQ, STEPS, LR = 2, 2, 16, 3, 0.05
CONFIG = dict(warmup_steps=1, update_freq=1, kl_clip=1e-3)




def global_batches():
    """STEPS global batches of WORLD * ROWS_PER_RANK rows with prompts of different lengths masked
    (so ranks hold different numbers of supervised tokens)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(4, 260, (WORLD * ROWS_PER_RANK, SEQ), generator=g)
        labels = ids.clone()
        for row in range(ids.shape[0]):
            labels[row, : int(torch.randint(2, SEQ - 2, (1,), generator=g))] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def max_relative_error(a, b):
    """Largest relative Frobenius error over the leading index (e.g. over r x r matrices)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())


def supervised(labels):
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def make_model_and_optimizer(fisher="kfac"):
    model = build_lora_model(tiny_llama_config(num_layers=2), r=4, seed=0)
    pre = GritPreconditioner(model, GritConfig(**CONFIG, fisher=fisher))
    # SGD: its step scales with the preconditioned gradient (Adam would hide a mis-scaled factor)
    opt = TrainerGritOptimizer(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR), pre
    )
    return model, pre, opt


def _worker(rank, port, out_dir, fuse=False, fisher="kfac"):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, pre, opt = make_model_and_optimizer(fisher)
        if fuse:  # fused decoder blocks on every rank; the reference stays one unfused process
            report = gk.fuse(model)
            assert report.base_stack_blocks == report.num_blocks == 2
        ddp = nn.parallel.DistributedDataParallel(model)
        for ids, labels in global_batches():
            local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
            # the Trainer's convention (average_tokens_across_devices): normalise by the GLOBAL count of
            # supervised tokens and multiply by W, because DDP averages the gradients over ranks
            out = ddp(input_ids=ids[local], labels=labels[local], num_items_in_batch=supervised(labels))
            (out.loss * WORLD).backward()
            opt.step()
            opt.zero_grad()
        torch.save(
            {
                "factor": pre.bank.factor.clone(),
                "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        finish_ranks()
    finally:
        if dist.is_initialized():  # an exception above: tear down without waiting for the peer
            dist.destroy_process_group()


def finish_ranks() -> None:
    """End a worker's process group: a barrier first, so no rank tears gloo down while a peer still talks
    to it (seen once: a rank left blocked in teardown after both had saved their results)."""
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(fn, args: tuple, timeout_s: float = 300.0) -> None:
    """``mp.spawn(fn, args, nprocs=WORLD)`` with a deadline: ranks still running after ``timeout_s`` (a hung
    collective) are terminated and the test fails, instead of blocking the whole suite."""
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            pytest.fail(f"{WORLD} ranks of {fn.__name__} did not finish in {timeout_s:.0f} s; terminated")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def single_process(fisher="kfac"):
    """One process on the concatenated batch: the answer DDP must reproduce."""
    model, pre, opt = make_model_and_optimizer(fisher)
    for ids, labels in global_batches():
        model(input_ids=ids, labels=labels, num_items_in_batch=supervised(labels)).loss.backward()
        opt.step()
        opt.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return pre.bank.factor.clone(), params


@pytest.mark.parametrize(
    "fuse, fisher", [(False, "kfac"), (True, "kfac"), (False, "kfac_lowrank")], ids=["peft", "fused", "kfac_lowrank"]
)
def test_ddp_two_processes_match_one_process_on_concatenated_batch(tmp_path, fuse, fisher):
    """GritPreconditioner.step all-reduces the statistics (scaled by 1/W^2) right before its fold; with
    gk.fuse on every rank, the fused Functions' statistics and gradients give the same answer; with
    fisher="kfac_lowrank" the large factors' sketches are all-reduced the same way."""
    spawn_ranks(_worker, (_free_port(), str(tmp_path), fuse, fisher))
    ref_factor, ref_params = single_process(fisher)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, res in enumerate(results):
        # fp32 summation order differs (per-rank sums, DDP's gradient average): compare each r x r factor
        # and each LoRA weight by relative Frobenius error (measured ~2e-6; without the 1/W^2 factor D
        # would be W^2 = 4 times too large, see test_world_size_factor_on_simulated_ranks)
        error = max_relative_error(res["factor"].flatten(0, 1), ref_factor.flatten(0, 1))
        assert error < 1e-4, (r, error)
        for name, value in ref_params.items():
            error = max_relative_error(res["params"][name][None], value[None])
            assert error < 1e-4, (r, name, error)
    assert torch.equal(results[0]["factor"], results[1]["factor"])  # ranks stay identical


def test_world_size_factor_on_simulated_ranks():
    """The math without processes: summing per-rank statistics (what the all-reduce does) and scaling the
    backward sums by 1/W^2 gives exactly the statistics of one process on the whole batch; without the
    factor the backward sums are W^2 too large."""
    model, pre, _ = make_model_and_optimizer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B = 0 at init would make every delta zero
    ids, labels = global_batches()[0]
    n = supervised(labels)
    per_rank = []
    for r in range(WORLD):
        rows = slice(r * ROWS_PER_RANK, (r + 1) * ROWS_PER_RANK)
        (model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=n).loss * WORLD).backward()
        per_rank.append(pre.bank.accumulators.clone())
        pre.discard_step()
    model(input_ids=ids, labels=labels, num_items_in_batch=n).loss.backward()
    one_process = FactorBank(pre.bank.module_ranks)
    one_process.accumulators.copy_(pre.bank.accumulators)
    reduced = FactorBank(pre.bank.module_ranks)
    reduced.accumulators.copy_(sum(per_rank))
    unscaled_backward = reduced.stat_sum[1].clone()
    reduced.stat_sum[1].mul_(1.0 / WORLD**2)  # the factor all_reduce_statistics applies
    for stat in (0, 1):  # each r x r sum within fp32 summation-order error
        assert max_relative_error(reduced.stat_sum[stat], one_process.stat_sum[stat]) < 1e-5
    assert torch.equal(reduced.rows, one_process.rows)
    assert one_process.stat_sum[1].abs().sum() > 0
    ratio = unscaled_backward.sum() / one_process.stat_sum[1].sum()
    assert float(ratio) == pytest.approx(WORLD**2, rel=1e-4)


def test_all_reduce_statistics_is_a_noop_without_process_group():
    assert world_size() == 1
    bank = FactorBank([4, 2])
    bank.accumulators.copy_(torch.randn_like(bank.accumulators))
    before = bank.accumulators.clone()
    all_reduce_statistics(bank)
    assert torch.equal(bank.accumulators, before)


# ---------------------------------------------------------------------------------- the Trainer under DDP
def _trainer_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    from trainer_helpers import make_args, make_features, run, small_model

    trainer = run(
        small_model(),
        make_args(
            out_dir, ddp_backend="gloo", optim="sgd", learning_rate=LR, grit_kl_clip=1e-3, max_steps=STEPS
        ),
        make_features(16, seed=9),
    )
    assert trainer.args.world_size == WORLD
    torch.save(
        {
            "factor": trainer.grit_preconditioner.bank.factor.clone(),
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        },
        os.path.join(out_dir, f"trainer-rank{rank}.pt"),
    )


def test_grit_trainer_under_ddp_matches_one_process_with_the_global_batch(tmp_path):
    """GritTrainer with two gloo ranks x 2 rows == one process with 4 rows per step (accelerate shards
    consecutive batches of the same seeded sampler; the Trainer normalises by the global token count)."""
    from trainer_helpers import make_args, make_features, run, small_model

    spawn_ranks(_trainer_worker, (_free_port(), str(tmp_path)))
    single = run(
        small_model(),
        make_args(
            tmp_path / "single",
            per_device_train_batch_size=2 * WORLD,
            optim="sgd",
            learning_rate=LR,
            grit_kl_clip=1e-3,
            max_steps=STEPS,
        ),
        make_features(16, seed=9),
    )
    ref_factor = single.grit_preconditioner.bank.factor
    ref_params = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
    for r in range(WORLD):
        res = torch.load(tmp_path / f"trainer-rank{r}.pt", weights_only=True)
        error = max_relative_error(res["factor"].flatten(0, 1), ref_factor.flatten(0, 1))
        assert error < 1e-4, (r, error)
        for name, value in ref_params.items():
            error = max_relative_error(res["params"][name][None], value[None])
            assert error < 1e-4, (r, name, error)
