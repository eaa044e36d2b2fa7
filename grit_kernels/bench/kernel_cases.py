"""The cases of the kernel microbenchmarks: the LoRA banks (:data:`BANKS`), the per-module loop of prior GRIT
code (``prior_art_*``), the callables each implementation runs per (bank, op) (:func:`cases`), and one timed
case with its ratios and bandwidth figures (:func:`bench_case`)."""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from .._device import interpreter_active
from . import harness

IMPLS = ("triton", "cuda", "cpp", "torch", "prior-art")
OPS = ("stats", "fold", "invert", "precondition")
#: docs/design.md §8 floors (Llama-3-8B, r=16, ~32k tokens per step, H100), milliseconds
DESIGN_FLOORS_MS = {"stats": 0.15, "invert": 0.005, "precondition": 0.1}


@dataclass(frozen=True)
class Bank:
    """A model's LoRA modules: ``layers`` x the 7 Llama projections, rank ``r``."""

    name: str
    layers: int
    d_model: int
    d_kv: int
    d_mlp: int
    r: int

    def shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every module: q, k, v, o, gate, up, down per layer."""
        d, kv, mlp = self.d_model, self.d_kv, self.d_mlp
        layer = [(d, d), (d, kv), (d, kv), (d, d), (d, mlp), (d, mlp), (mlp, d)]
        return layer * self.layers

    @property
    def modules(self) -> int:
        return 7 * self.layers

    @property
    def lora_params(self) -> int:
        return sum(self.r * (d_in + d_out) for d_in, d_out in self.shapes())


BANKS = {
    "llama3-8b-r16": Bank("llama3-8b-r16", 32, 4096, 1024, 14336, 16),
    "llama3-8b-r64": Bank("llama3-8b-r64", 32, 4096, 1024, 14336, 64),
    "llama3-70b-r16": Bank("llama3-70b-r16", 80, 8192, 1024, 28672, 16),
}


@dataclass
class BenchConfig:
    banks: tuple = tuple(BANKS)
    ops: tuple = OPS
    impls: tuple = IMPLS
    device: str = "cuda"
    tokens: int | None = None  #: rows per Gram matrix (CUDA 32768, CPU 4096)
    grad_dtype: str | None = None  #: LoRA gradient dtype (float32: PEFT keeps LoRA weights and grads in fp32)
    stats_dtype: str | None = None  #: rank-space activation dtype (CUDA bfloat16, CPU float32)
    reps: int | None = None  #: CPU: timed calls per measurement (GPU: do_bench chooses)
    prior_art_max_modules: int | None = None  #: CPU: time the per-module loop on this many modules, scale up
    threads: int | None = None  #: CPU: torch.set_num_threads (default: torch's choice)
    damping: float = 1e-3
    quick: bool = False
    host_launch: bool = False  #: CUDA: also time the host side of one call (enqueue only, queue empty)
    time_budget: float | None = None  #: seconds: later cases are not started past it (the JSON keeps the finished)
    notes: list = None  #: filled by resolve(): what was asked for but cannot run here, and why


    def resolve(self) -> BenchConfig:
        cuda = self.device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        if cuda and interpreter_active():
            raise ValueError("TRITON_INTERPRET=1 would time the interpreter: unset it (or =0) for GPU benchmarks")
        self.tokens = self.tokens or (32768 if cuda else 4096)
        self.grad_dtype = self.grad_dtype or "float32"
        self.stats_dtype = self.stats_dtype or ("bfloat16" if cuda else "float32")
        self.reps = self.reps or (5 if cuda else 7)
        if not cuda:
            self.impls = tuple(i for i in self.impls if i not in ("triton", "cuda"))
            if self.threads:
                torch.set_num_threads(self.threads)
            self.threads = torch.get_num_threads()
        from grit_kernels import _ext  # compiled csrc/ kernels: timed where built for this device

        compiled = {"cpp": not cuda and _ext.cpu_available(), "cuda": cuda and _ext.cuda_available()}
        self.notes = []
        for name in self.impls:
            if not compiled.get(name, True):
                self.notes.append(
                    f"{name} asked for but not timed: the compiled kernels are not available here ({_ext.load_error()}); "
                    "GRIT_KERNELS_JIT=1 builds them from csrc/"
                )
        self.impls = tuple(i for i in self.impls if compiled.get(i, True))
        unknown = set(self.banks) - set(BANKS) | set(self.ops) - set(OPS) | set(self.impls) - set(IMPLS)
        if unknown:
            raise ValueError(f"unknown bank/op/impl names: {sorted(unknown)}")
        return self


def prior_art_stats(stats: list[torch.Tensor], xs: list[torch.Tensor]) -> None:
    """One hook call per factor: ``stat += x^T x / n`` as a separate matmul (fp16 buffers)."""
    for stat, x in zip(stats, xs):
        stat.add_((x.T @ x).to(stat.dtype) / x.shape[0])


def prior_art_fold(factors: list[torch.Tensor], stats: list[torch.Tensor], decay: float) -> None:
    """Per-module EMA with a host-side NaN check (``.item()``: a device sync per module on GPUs)."""
    for factor, stat in zip(factors, stats):
        if torch.isfinite(stat).all().item():
            factor.mul_(decay).add_(stat, alpha=1.0 - decay)


def prior_art_invert(factors: list[torch.Tensor], inverses: list[torch.Tensor], damping: float) -> None:
    """Per factor: copy to the host, damp by its trace, ``torch.linalg.inv`` there, copy back."""
    for factor, inverse in zip(factors, inverses):
        c = factor.float().cpu()
        r = c.shape[0]
        lam = damping * float(torch.trace(c)) / r + 1e-12
        inv = torch.linalg.inv(c + lam * torch.eye(r))
        inverse.copy_(inv.to(inverse.device, inverse.dtype))


def prior_art_precondition(grads_a, grads_b, inv_d, inv_h) -> torch.Tensor:
    """Two small matmuls per module in a Python loop, plus the KL-clip dot product per module."""
    dot = torch.zeros((), device=inv_d[0].device)
    for ga, gb, pd, ph in zip(grads_a, grads_b, inv_d, inv_h):
        new_a = pd @ ga.float()
        new_b = gb.float() @ ph
        dot += (new_a * ga.float()).sum() + (new_b * gb.float()).sum()
        ga.copy_(new_a)
        gb.copy_(new_b)
    return dot


def triton_host_path(bank: Bank, calls: int = 300) -> dict | None:
    """Python cost of one Triton ``precondition_`` call over ``bank``'s 2M gradients, the kernel launch stubbed
    (no GPU needed): the front end's shape check plus the launcher's layout key, plan lookup and pointer
    tuple. Tiny tensors of the bank's count (the host path depends on the count, not the sizes)."""
    try:
        from grit_kernels.ops import precondition as front
        from grit_kernels.triton import precondition as launcher
    except Exception as exc:  # noqa: BLE001 -- triton missing: reported, not raised
        return {"error": f"{type(exc).__name__}: {exc}"}
    M, r = bank.modules, bank.r
    ga = [torch.empty(r, 8) for _ in range(M)]
    gb = [torch.empty(8, r) for _ in range(M)]
    inv = torch.eye(r).repeat(M, 1, 1)
    kernel = launcher._precondition_kernel
    launcher._precondition_kernel = type("Stub", (), {"__getitem__": lambda self, grid: (lambda *a, **k: None)})()
    try:
        def call():
            front._check_shapes(tuple(map(torch.Tensor.size, ga)), tuple(map(torch.Tensor.size, gb)), r)
            launcher.precondition_(ga, gb, inv, inv)

        call()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(calls // 7):
                call()
            times.append((time.perf_counter() - t0) / (calls // 7) * 1e6)
    finally:
        launcher._precondition_kernel = kernel
    return {"gradients": 2 * M, "us_per_call_best_of_7": min(times), "us_per_call_median_of_7": statistics.median(times),
            "what": "shape check + layout key + plan lookup + pointer tuple, kernel launch stubbed, CPU tensors"}


def measure_copy_bandwidth(device: str, cfg: BenchConfig) -> dict | None:
    """GB/s of ``dst.copy_(src)`` (read + write counted) for a 1 GiB (CPU: 256 MiB) tensor."""
    nbytes = (1 << 30) if device.startswith("cuda") else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    t = harness.time_gpu(copy) if device.startswith("cuda") else harness.time_cpu(copy, cfg.reps)
    del src, dst, copy
    return {"bytes": nbytes, "median_ms": t["median_ms"], "gbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}


def _spd(n: int, r: int, cond: float, device: str) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, r, device=device))
    eigs = torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, r, device=device)
    return (q * eigs) @ q.transpose(1, 2)


def _orthogonal(n: int, r: int, device: str) -> torch.Tensor:
    """Random rotations: repeated in-place preconditioning keeps the gradients' scale (no inf/denormals)."""
    q, _ = torch.linalg.qr(torch.randn(n, r, r, device=device))
    return q.contiguous()


def cases(bank: Bank, op: str, cfg: BenchConfig) -> tuple[dict[str, Callable], dict]:
    """Callables per implementation for one (bank, op), and facts about the work (bytes moved)."""
    dev, r, M = cfg.device, bank.r, bank.modules
    n = 2 * M  # factors: forward and backward per module
    gdt = getattr(torch, cfg.grad_dtype)
    sdt = getattr(torch, cfg.stats_dtype)
    impl: dict[str, Callable] = {}
    facts: dict = {"factors": n, "modules": M, "r": r}

    if op == "stats":
        xs = [torch.randn(cfg.tokens, r, device=dev).to(sdt) for _ in range(n)]
        bank_sums = torch.zeros(n, r, r, device=dev)
        half_sums = [torch.zeros(r, r, device=dev, dtype=torch.float16) for _ in range(n)]
        w = 1.0 / cfg.tokens

        def gram_all(backend):
            def go():
                if backend == "triton":  # the grouped op: every factor in one launch
                    ops.accumulate_grams_(list(bank_sums.unbind(0)), xs, w, backend=backend)
                    return
                for i in range(n):
                    ops.accumulate_gram_(bank_sums[i], xs[i], w, backend=backend)

            return go

        impl = {"triton": gram_all("triton"), "torch": gram_all("torch"), "prior-art": lambda: prior_art_stats(half_sums, xs)}
        impl.update({b: gram_all(b) for b in ("cpp", "cuda")})
        facts.update(bytes=sum(x.numel() * x.element_size() for x in xs), rows=cfg.tokens, launches_triton=1, launches_torch=n)
    elif op == "fold":
        factor = _spd(n, r, 1e2, dev)
        stat = _spd(n, r, 1e2, dev)
        weight = torch.ones(n, device=dev)
        init = torch.ones(n, dtype=torch.bool, device=dev)
        factors, stats = list(factor.clone().unbind(0)), list(stat.clone().unbind(0))
        impl = {
            "triton": lambda: ops.ema_fold_(factor, stat, weight, 0.95, init, backend="triton"),
            "torch": lambda: ops.ema_fold_(factor, stat, weight, 0.95, init, backend="torch"),
            "cpp": lambda: ops.ema_fold_(factor, stat, weight, 0.95, init, backend="cpp"),
            "cuda": lambda: ops.ema_fold_(factor, stat, weight, 0.95, init, backend="cuda"),
            "prior-art": lambda: prior_art_fold(factors, stats, 0.95),
        }
        facts.update(bytes=3 * n * r * r * 4)
    elif op == "invert":
        mats = _spd(n, r, 1e3, dev)
        prev = torch.eye(r, device=dev).repeat(n, 1, 1)
        prev_valid = torch.ones(n, dtype=torch.bool, device=dev)
        inverses = [torch.empty(r, r, device=dev) for _ in range(n)]
        factors = list(mats.unbind(0))

        def ours(backend):
            return lambda: ops.damped_cholesky_inverse(
                mats, cfg.damping, 1e-12, None, prev, prev_valid, 100.0, backend=backend
            )

        impl = {"triton": ours("triton"), "torch": ours("torch"), "prior-art": lambda: prior_art_invert(factors, inverses, cfg.damping)}
        impl.update({b: ours(b) for b in ("cpp", "cuda")})
        facts.update(bytes=3 * n * r * r * 4)
    elif op == "precondition":
        grads_a = [torch.randn(r, d_in, device=dev).to(gdt) for d_in, _ in bank.shapes()]
        grads_b = [torch.randn(d_out, r, device=dev).to(gdt) for _, d_out in bank.shapes()]
        inv_d, inv_h = _orthogonal(M, r, dev), _orthogonal(M, r, dev)
        impl = {
            "triton": lambda: ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="triton"),
            "torch": lambda: ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="torch"),
            "cpp": lambda: ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="cpp"),
            "cuda": lambda: ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="cuda"),
            "prior-art": lambda: prior_art_precondition(grads_a, grads_b, list(inv_d), list(inv_h)),
        }
        grad_bytes = sum(g.numel() * g.element_size() for g in grads_a + grads_b)
        facts.update(bytes=2 * grad_bytes, lora_params=bank.lora_params, grad_dtype=cfg.grad_dtype)
    return {k: v for k, v in impl.items() if k in cfg.impls}, facts


def _prior_art_subset(bank: Bank, cfg: BenchConfig) -> Bank | None:
    """CPU: the per-module loop scales linearly in modules; time it on fewer layers when asked."""
    if cfg.prior_art_max_modules is None or bank.modules <= cfg.prior_art_max_modules:
        return None
    layers = max(1, cfg.prior_art_max_modules // 7)
    return Bank(bank.name + f"-first{layers}layers", layers, bank.d_model, bank.d_kv, bank.d_mlp, bank.r)


def bench_case(bank: Bank, op: str, cfg: BenchConfig, copy_gbps: float | None) -> dict:
    cuda = cfg.device.startswith("cuda")
    impls, facts = cases(bank, op, cfg)
    timings = {}
    for name, fn in impls.items():
        if name == "prior-art" and not cuda and _prior_art_subset(bank, cfg) is not None:
            continue
        t = harness.time_gpu(fn) if cuda else harness.time_cpu(fn, cfg.reps)
        if cuda and cfg.host_launch:
            t.update(harness.time_host(fn))
        timings[name] = t
    del impls
    gc.collect()
    subset = _prior_art_subset(bank, cfg) if not cuda else None
    if subset is not None and "prior-art" in cfg.impls:
        sub_impls, _ = cases(subset, op, cfg)
        t = harness.time_cpu(sub_impls["prior-art"], cfg.reps)
        scale = bank.modules / subset.modules
        t = {**t, "median_ms": t["median_ms"] * scale, "p20_ms": t["p20_ms"] * scale, "p80_ms": t["p80_ms"] * scale}
        t["extrapolated_from_modules"] = subset.modules
        timings["prior-art"] = t
        del sub_impls
        gc.collect()

    base = "triton" if "triton" in timings else "torch"
    row = {"bank": bank.name, "op": op, **facts, "timings": timings, "baseline": base}
    if base in timings:
        row["ratios_to_" + base] = {
            name: t["median_ms"] / timings[base]["median_ms"] for name, t in timings.items() if name != base
        }
    if op in ("stats", "precondition"):
        row["achieved_gbps"] = {name: facts["bytes"] / (t["median_ms"] * 1e-3) / 1e9 for name, t in timings.items()}
        if copy_gbps:
            row["bandwidth_floor_ms"] = facts["bytes"] / (copy_gbps * 1e9) * 1e3
            row["fraction_of_copy_bandwidth"] = {name: g / copy_gbps for name, g in row["achieved_gbps"].items()}
    if op in DESIGN_FLOORS_MS and bank.name == "llama3-8b-r16" and cuda:
        row["design_floor_ms"] = DESIGN_FLOORS_MS[op]
    return row
