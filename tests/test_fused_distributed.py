"""DDP + gk.fuse: two gloo processes with fused decoder blocks give the factors and parameters of one
unfused process on the concatenated batch (the pattern of tests/test_distributed.py)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import (
    ROWS_PER_RANK,
    WORLD,
    _free_port,
    global_batches,
    make_model_and_optimizer,
    max_relative_error,
    supervised,
)
from torch import nn

import grit_kernels as gk


def _fused_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, pre, opt = make_model_and_optimizer()
        report = gk.fuse(model)
        assert report.base_stack_blocks == report.num_blocks == 2
        ddp = nn.parallel.DistributedDataParallel(model)
        for ids, labels in global_batches():
            local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
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
    finally:
        dist.destroy_process_group()


def test_ddp_with_fuse_matches_one_unfused_process(tmp_path):
    model, pre, opt = make_model_and_optimizer()
    for ids, labels in global_batches():
        model(input_ids=ids, labels=labels, num_items_in_batch=supervised(labels)).loss.backward()
        opt.step()
        opt.zero_grad()
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mp.spawn(_fused_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, res in enumerate(results):
        # fp32 summation order differs (per-rank sums, DDP's average, fused Functions): the bound of
        # tests/test_distributed.py
        error = max_relative_error(res["factor"].flatten(0, 1), pre.bank.factor.flatten(0, 1))
        assert error < 1e-4, (r, error)
        for name, value in ref_params.items():
            error = max_relative_error(res["params"][name][None], value[None])
            assert error < 1e-4, (r, name, error)
    assert torch.equal(results[0]["factor"], results[1]["factor"])
