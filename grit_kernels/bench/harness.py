"""What every benchmark shares: the machine it ran on (device, package versions, git commit), the CPU load
and thread choice, peak memory (RSS), timing statistics, the interleaved order of arms, and where results
are written.

Results go to ``./grit-results/<device-slug>/`` by default (never the tracked ``bench/results``); every
result file records :func:`device_info`, :func:`versions` and :func:`git_commit`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

PROCESS_START = time.perf_counter()  #: what a benchmark's --time-budget counts from (close to the process start)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  #: the grit_kernels package directory


# ----------------------------------------------------------------------------------- the machine
def slug(text: str) -> str:
    """``text`` as a directory name: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` where that is unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_slug() -> str:
    """A CPU slug that names the model and the core count (``cpu-<model>-<n>c``)."""
    return f"cpu-{slug(cpu_model())}-{os.cpu_count()}c"


def device_info(device: str) -> dict:
    """What ``device`` is: type, name, slug (``cpu`` for any CPU; the GPU's name), sizes and counts."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {
            "type": "cuda",
            "name": props.name,
            "slug": slug(props.name),
            "count": torch.cuda.device_count(),
            "sm_count": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
        }
    return {
        "type": "cpu",
        "name": cpu_model(),
        "slug": "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def versions() -> dict:
    """Python, the installed versions of the packages a benchmark touches (None: not installed), the
    running grit_kernels' own version and torch's CUDA version."""
    from importlib.metadata import PackageNotFoundError, version

    import grit_kernels

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton", "unsloth"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["grit_kernels"] = grit_kernels.__version__
    out["cuda"] = torch.version.cuda
    return out


def git_commit() -> str | None:
    """HEAD of the checkout the package runs from; ``GRIT_COMMIT`` where .git did not travel (the GPU
    machine: bench/run_gpu_all.sh sets it); None for an installed package (no checkout around it)."""
    if os.environ.get("GRIT_COMMIT"):
        return os.environ["GRIT_COMMIT"]
    root = PACKAGE_ROOT.parent
    if not (root / ".git").exists():  # site-packages: not a checkout (and never ask a repository around it)
        return None
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


# ----------------------------------------------------------------------------------- CPU load
def other_busy_cores(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes: ``(1 - idle fraction) x cores`` from ``/proc/stat`` over
    ``seconds`` while this process sleeps. None where /proc/stat is unavailable (not Linux)."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads(default: int, busy: float | None) -> int:
    """Intra-op threads for a CPU run: the cores other processes leave idle, at most ``default``.

    On a 2-core machine with another job running, 2 threads stall in OpenMP barriers: measured here
    0.77 s vs 17 s per step (8-layer tiny model) for 1 vs 2 threads under a load average of 6."""
    if busy is None:
        return default
    return max(1, min(default, round((os.cpu_count() or 1) - busy)))


def machine_load(busy_before: float | None, busy_after: float | None, load_after: float, threads: int) -> dict:
    """Whether other processes competed for the CPU during the run (their cores, before and after)."""
    others = [b for b in (busy_before, busy_after) if b is not None]
    # the 1-minute load average counts this process's threads too
    others.append(max(0.0, load_after - threads))
    worst = max(others)
    return {"other_busy_cores_max": worst, "loaded": worst >= 0.5}


# ----------------------------------------------------------------------------------- memory
def rss_mb(key: str = "VmRSS") -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB from /proc (None where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark (Linux ``/proc/self/clear_refs``); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb(since_reset: bool) -> tuple[float, str]:
    """``(peak RSS in MiB, how it was read)``: ``VmHWM`` after :func:`reset_peak_rss`, else ``ru_maxrss``."""
    import resource

    peak = rss_mb("VmHWM") if since_reset else None
    if peak is not None:
        return peak, "VmHWM after reset"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss (whole process)"  # Linux: KiB


# ----------------------------------------------------------------------------------- timing
def quantiles(values: Sequence[float]) -> dict:
    """``p20_s``, ``median_s``, ``p80_s`` and ``mean_s`` of ``values`` (seconds, linear interpolation)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20_s": q[0], "median_s": q[1], "p80_s": q[2], "mean_s": float(t.mean())}


def time_cpu(fn: Callable[[], object], reps: int) -> dict:
    """Median and 20/80% quantiles (ms) of ``reps`` calls of ``fn`` after one warm-up call."""
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


def time_gpu(fn: Callable[[], object]) -> dict:
    """Median and 20/80% quantiles (ms) from ``triton.testing.do_bench`` (L2 flushed between calls)."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "method": "triton.testing.do_bench"}


def time_host(fn: Callable[[], object], calls: int = 30) -> dict:
    """Host-side cost of one call on CUDA: the time until it returns, the device queue drained before each
    call (so that no launch waits for queue space). A call that synchronises includes its device time."""
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


def rotated(names: Sequence[str], step: int) -> list[str]:
    """The order of interleaved arms at ``step``: rotated by one each step, so no arm always follows another."""
    return [names[(step + k) % len(names)] for k in range(len(names))]


# ----------------------------------------------------------------------------------- output
def result_dir(out_dir: str | os.PathLike | None, device_slug: str) -> Path:
    """``out_dir`` if given, else ``./grit-results/<device_slug>/`` (never the tracked bench/results)."""
    return Path(out_dir) if out_dir else Path.cwd() / "grit-results" / device_slug


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` as indented JSON (the parent directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar with a fixed total (remaining time shown), off when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, disable=not enabled, leave=False,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}",
    )
