"""Kernel microbenchmarks: our Triton kernels vs torch batched ops vs the per-module prior-art loop.

For each bank of LoRA modules (Llama-3-8B r=16: 224 modules / 448 factors / 41.9M LoRA parameters;
the same at r=64; Llama-3-70B-sized r=16: 560 modules, d_model 8192, kv 1024, mlp 28672) and each op
of a GRIT step, three implementations are timed side by side in one run:

* ``triton``    -- ``grit_kernels.ops`` with ``backend="triton"`` (CUDA only; interpreter timings
  are meaningless, so the CPU run skips it);
* ``torch``     -- ``grit_kernels.ops`` with ``backend="torch"`` (batched ``cholesky_ex`` +
  ``cholesky_inverse``, grouped ``bmm``, ``addmm``);
* ``prior-art`` -- a per-module Python loop the way published GRIT code does it (``prior_art_*``
  below): host inversion with a device->host->device copy per factor, ``.item()`` per module, one
  or two small matmuls per module.

Ops: ``stats`` (``accumulate_gram_`` of every factor over ``tokens`` rows, 2 per module),
``fold`` (EMA fold of all factors), ``invert`` (damped inversion of all factors), ``precondition``
(all lora_A/lora_B gradients in place, with the KL-clip dot product).

GPU: ``triton.testing.do_bench`` (median and 20/80% quantiles, L2 flushed between calls). CPU:
``time.perf_counter`` medians and quantiles over ``reps`` calls after one warm-up call. Reported:
times, ratios to ours (to torch on CPU), achieved GB/s of the memory-bound ops against the measured
device copy bandwidth (``dst.copy_(src)`` of 1 GiB), the bandwidth floor (bytes / copy bandwidth),
and the docs/design.md §8 floors.

Writes ``./grit-results/<device-slug>/kernels.json`` (``--out DIR`` or the ``OUT`` environment
variable to choose; ``--out bench/results/<device-slug>`` updates the tracked results) and prints
a table. ``run(out_dir=None, quick=False) -> dict`` is the entry point for the ``grit-kernels``
CLI; ``python bench/bench_kernels.py --help`` lists the options.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROCESS_START = time.perf_counter()  #: what --time-budget counts from
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from grit_kernels import ops
from grit_kernels.ops import interpreter_active

IMPLS = ("triton", "cuda", "cpp", "torch", "prior-art")
OPS = ("stats", "fold", "invert", "precondition")
#: docs/design.md §8 floors (Llama-3-8B, r=16, ~32k tokens per step, H100), milliseconds
DESIGN_FLOORS_MS = {"stats": 0.15, "invert": 0.005, "precondition": 0.1}


# ----------------------------------------------------------------------------------- banks
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


# ------------------------------------------------------------------------------- prior art
# The per-module way of published GRIT code (docs/design.md §8, §11): a Python loop over modules,
# host inversion with a device->host copy and a host->device copy per factor, `.item()` per module.


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


# --------------------------------------------------------------------------------- timing
def _time_gpu(fn: Callable[[], object]) -> dict:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "method": "triton.testing.do_bench"}


def _time_cpu(fn: Callable[[], object], reps: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {
        "median_ms": statistics.median(times),
        "p20_ms": q[1],
        "p80_ms": q[7],
        "method": f"time.perf_counter, {reps} calls after 1 warm-up",
        "raw_ms": times,
    }


def _time_host(fn: Callable[[], object], calls: int = 30) -> dict:
    """Host-side cost of one call on CUDA: the time until it returns, the device queue drained before each
    call (so that no launch waits for queue space). A call that synchronises (the per-module loop's
    ``.item()``) includes its device time."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"host_median_ms": statistics.median(times), "host_p20_ms": q[1], "host_p80_ms": q[7]}


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
    t = _time_gpu(lambda: dst.copy_(src)) if device.startswith("cuda") else _time_cpu(lambda: dst.copy_(src), cfg.reps)
    del src, dst
    return {"bytes": nbytes, "median_ms": t["median_ms"], "gbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}


# ------------------------------------------------------------------------------- the cases
def _spd(n: int, r: int, cond: float, device: str) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, r, device=device))
    eigs = torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, r, device=device)
    return (q * eigs) @ q.transpose(1, 2)


def _orthogonal(n: int, r: int, device: str) -> torch.Tensor:
    """Random rotations: repeated in-place preconditioning keeps the gradients' scale (no inf/denormals)."""
    q, _ = torch.linalg.qr(torch.randn(n, r, r, device=device))
    return q.contiguous()


def _cases(bank: Bank, op: str, cfg: BenchConfig) -> tuple[dict[str, Callable], dict]:
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
    impls, facts = _cases(bank, op, cfg)
    timings = {}
    for name, fn in impls.items():
        if name == "prior-art" and not cuda and _prior_art_subset(bank, cfg) is not None:
            continue
        t = _time_gpu(fn) if cuda else _time_cpu(fn, cfg.reps)
        if cuda and cfg.host_launch:
            t.update(_time_host(fn))
        timings[name] = t
    del impls
    gc.collect()
    subset = _prior_art_subset(bank, cfg) if not cuda else None
    if subset is not None and "prior-art" in cfg.impls:
        sub_impls, _ = _cases(subset, op, cfg)
        t = _time_cpu(sub_impls["prior-art"], cfg.reps)
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


# ----------------------------------------------------------------------------- environment
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {
            "type": "cuda",
            "name": props.name,
            "slug": _slug(props.name),
            "sm_count": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
        }
    model, cores = _cpu_model(), os.cpu_count()
    return {
        "type": "cpu",
        "name": model,
        "slug": f"cpu-{_slug(model)}-{cores}c",
        "cpu_count": cores,
        "torch_threads": torch.get_num_threads(),
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    import grit_kernels

    out["grit_kernels"] = grit_kernels.__version__
    out["cuda"] = torch.version.cuda
    return out


def git_commit() -> str | None:
    """HEAD of the checkout; ``GRIT_COMMIT`` where .git did not travel (the GPU machine: run_gpu_all.sh sets it)."""
    if os.environ.get("GRIT_COMMIT"):
        return os.environ["GRIT_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or None
    except Exception:
        return None


# ---------------------------------------------------------------------------------- report
def _fmt_ms(t: dict | None) -> str:
    if t is None:
        return "-"
    m = t["median_ms"]
    s = f"{m * 1e3:.1f} us" if m < 1 else f"{m:.2f} ms"
    return s + ("*" if "extrapolated_from_modules" in t else "")


def format_table(result: dict) -> str:
    impls = [i for i in IMPLS if i in result["config"]["impls"]]
    base = "triton" if "triton" in impls else "torch"
    head = ["bank", "op"] + impls + [f"{i}/{base}" for i in impls if i != base] + ["GB/s (ours)", "floor"]
    rows = []
    for row in result["results"]:
        t = row["timings"]
        ours = base if base in t else None
        cells = [row["bank"], row["op"]] + [_fmt_ms(t.get(i)) for i in impls]
        ratios = row.get("ratios_to_" + row["baseline"], {})
        cells += [(f"{ratios[i]:.1f}x" if ratios[i] >= 0.1 else f"{ratios[i]:.3f}x") if i in ratios else "-" for i in impls if i != base]
        gbps = row.get("achieved_gbps", {}).get(ours) if ours else None
        frac = row.get("fraction_of_copy_bandwidth", {}).get(ours) if ours else None
        if gbps is not None:
            cells.append((f"{gbps:.0f}" if gbps >= 10 else f"{gbps:.2f}") + (f" ({100 * frac:.0f}% copy)" if frac else ""))
        else:
            cells.append("-")
        floors = []
        if "bandwidth_floor_ms" in row:
            floors.append(f"bw {_fmt_ms({'median_ms': row['bandwidth_floor_ms']})}")
        if "design_floor_ms" in row:
            floors.append(f"§3 {_fmt_ms({'median_ms': row['design_floor_ms']})}")
        cells.append(", ".join(floors) or "-")
        rows.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(c) for c in rows]
    return "\n".join(out)


def _report(result: dict) -> str:
    cfg, dev = result["config"], result["device"]
    bw = result.get("copy_bandwidth")
    lines = [
        f"Kernel microbenchmarks on {dev['name']} ({cfg['device']}), torch {result['versions']['torch']}, "
        f"triton {result['versions']['triton']}; tokens/factor {cfg['tokens']}, grads {cfg['grad_dtype']}, "
        f"stats {cfg['stats_dtype']}",
        (f"measured copy bandwidth: {bw['gbps']:.0f} GB/s" if bw else "copy bandwidth: not measured")
        + f"; host load average {result['host_load_average_1_5_15min']['start'][0]:.1f} at start",
        "",
        format_table(result),
        "",
    ]
    if any("extrapolated_from_modules" in t for row in result["results"] for t in row["timings"].values()):
        lines.append("* per-module loop timed on fewer modules and scaled linearly to the whole bank")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"wrote {result['json_path']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- entry points
def result_path(device: dict, out_dir: str | None) -> Path:
    out_dir = out_dir or os.environ.get("OUT")
    directory = Path(out_dir) if out_dir else Path.cwd() / "grit-results" / device["slug"]  # never tracked files
    return directory / "kernels.json"


def run(out_dir: str | None = None, quick: bool = False, config: BenchConfig | None = None, argv=None) -> dict:
    """Run the microbenchmarks, write ``kernels.json`` and return the result dict.

    ``quick``: the Llama-3-8B r=16 bank only, fewer repetitions (a smoke run).
    """
    cfg = config or BenchConfig(device="cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        cfg.quick = True
        cfg.banks = ("llama3-8b-r16",)
        cfg.reps = cfg.reps or 3
    cfg.resolve()
    device = device_info(cfg.device)
    notes = []
    if not cfg.device.startswith("cuda"):
        notes.append("CPU run: Triton kernels skipped (interpreter timings are meaningless); torch backend is the baseline")
    if cfg.prior_art_max_modules is not None and not cfg.device.startswith("cuda"):
        notes.append(f"per-module loop timed on at most {cfg.prior_art_max_modules} modules and scaled linearly")
    notes.extend(cfg.notes or [])
    torch.manual_seed(0)
    load_start = os.getloadavg()
    bw = measure_copy_bandwidth(cfg.device, cfg)
    rows = []
    result = {
        "benchmark": "kernels",
        "device": device,
        "versions": versions(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": argv,
        "config": {**asdict(cfg), "banks_detail": {b: {**asdict(BANKS[b]), "modules": BANKS[b].modules, "lora_params": BANKS[b].lora_params} for b in cfg.banks}},
        "host_load_average_1_5_15min": {"start": load_start, "end": None},
        "copy_bandwidth": bw,
        "design_floors_ms": DESIGN_FLOORS_MS,
        "triton_precondition_host_path": triton_host_path(BANKS[cfg.banks[0]]) if cfg.banks else None,
        "results": rows,
        "notes": notes,
    }
    path = result_path(device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    result["json_path"] = str(path)

    def write(partial: bool) -> None:
        result["partial"] = partial
        result["host_load_average_1_5_15min"]["end"] = os.getloadavg()
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    cases = [(b, op) for b in cfg.banks for op in cfg.ops]
    for k, (bank_name, op) in enumerate(cases):
        if cfg.time_budget is not None and time.perf_counter() - PROCESS_START > cfg.time_budget:
            notes.append(f"time budget of {cfg.time_budget:.0f} s spent: not run: " + ", ".join(f"{b}/{o}" for b, o in cases[k:]))
            break
        rows.append(bench_case(BANKS[bank_name], op, cfg, bw["gbps"] if bw else None))
        print(f"  {bank_name:15s} {op:13s} " + "  ".join(f"{k}={_fmt_ms(v)}" for k, v in rows[-1]["timings"].items()), file=sys.stderr, flush=True)
        write(partial=True)  # a run cut short keeps the finished cases
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    write(partial=False)
    result["table"] = format_table(result)
    return result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--banks", default=",".join(BANKS), help=f"comma-separated subset of {','.join(BANKS)}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--tokens", type=int, help="rows per Gram matrix (CUDA 32768, CPU 4096)")
    p.add_argument("--grad-dtype", choices=("float32", "bfloat16", "float16"), help="default float32 (PEFT LoRA grads)")
    p.add_argument("--stats-dtype", choices=("float32", "bfloat16", "float16"), help="CUDA bfloat16, CPU float32")
    p.add_argument("--reps", type=int, help="CPU: timed calls per measurement (default 7)")
    p.add_argument("--prior-art-max-modules", type=int, help="CPU: time the per-module loop on fewer modules, scale up")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice)")
    p.add_argument("--out", metavar="DIR", help="output directory (default $OUT, else ./grit-results/<device-slug>/)")
    p.add_argument("--quick", action="store_true", help="smoke run: Llama-3-8B r=16 bank only")
    p.add_argument("--host-launch", action="store_true", help="CUDA: also time the host side of each call (queue empty)")
    p.add_argument("--time-budget", type=float, metavar="S", help="seconds: later cases are not started past it")
    return p


def main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())
    cfg = BenchConfig(
        banks=split(args.banks),
        ops=split(args.ops),
        impls=split(args.impls),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        tokens=args.tokens,
        grad_dtype=args.grad_dtype,
        stats_dtype=args.stats_dtype,
        reps=args.reps,
        prior_art_max_modules=args.prior_art_max_modules,
        threads=args.threads,
        host_launch=args.host_launch,
        time_budget=args.time_budget,
    )
    try:
        result = run(out_dir=args.out, quick=args.quick, config=cfg, argv=list(sys.argv if argv is None else argv))
    except ValueError as exc:
        print(f"{prog or 'bench_kernels'}: error: {exc}", file=sys.stderr)
        return 2
    print(_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
