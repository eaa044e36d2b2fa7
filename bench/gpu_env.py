"""The ``env`` phase of ``bench/run_gpu_all.sh`` (what the machine is) and its ``--collect`` step.

``python bench/gpu_env.py --out env.json``: GPU, driver, CUDA, compiler, Python package versions, the commit;
exit status 2 when torch sees no CUDA device (nothing after this phase can run), 0 otherwise. Every probe is
guarded: a missing tool or package is recorded as such, never an exception.

``python bench/gpu_env.py --collect DIR``: copy the files a run returned (DIR, as fetched from the device
machine) into ``bench/results/<gpu-slug>/``, the slug read from DIR/env.json (results are never hand-edited:
the files are copied as they came back).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "pytest", "pytest-timeout", "ninja")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    return (proc.stdout or proc.stderr).strip()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _imports(name: str) -> str:
    try:
        importlib.import_module(name)
        return "ok"
    except Exception as exc:  # noqa: BLE001 -- recorded, not raised: the phase reports the machine as found
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def commit() -> str | None:
    if os.environ.get("GRIT_COMMIT"):
        return os.environ["GRIT_COMMIT"]
    out = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    return out if out and re.fullmatch(r"[0-9a-f]{40}", out) else None


def environment(deadline: int | None = None, plan: str | None = None) -> dict:
    import torch

    info: dict = {
        "commit": commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {name: _version(name) for name in PACKAGES},
        "imports": {name: _imports(name) for name in ("triton", "transformers", "peft", "bitsandbytes")},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvcc": _run(["nvcc", "--version"]),
        "ninja": _run(["ninja", "--version"]),
        "nvidia_smi": _run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,pci.bus_id",
             "--format=csv,noheader"]
        ),
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TORCH_CUDA_ARCH_LIST", "GRIT_KERNELS_JIT", "PYTHONPATH")},
        "deadline_s": deadline,
        "plan": plan,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": props.name,
            "slug": slug(props.name),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 2),
            "l2_cache_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "count": torch.cuda.device_count(),
        }
    return info


def collect(directory: Path) -> int:
    env_file = directory / "env.json"
    try:
        device_slug = json.loads(env_file.read_text())["device"]["slug"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"collect: no device slug in {env_file} ({exc}); nothing copied", file=sys.stderr)
        return 1
    dest = REPO_ROOT / "bench" / "results" / device_slug
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        shutil.copy2(f, dest / f.name)
        print(f"collect: {f.name} -> {dest.relative_to(REPO_ROOT)}/")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the environment JSON here")
    p.add_argument("--deadline", type=int)
    p.add_argument("--plan")
    p.add_argument("--collect", type=Path, metavar="DIR", help="copy a returned run into bench/results/<gpu-slug>/")
    args = p.parse_args(argv)
    if args.collect:
        return collect(args.collect)
    info = environment(args.deadline, args.plan)
    if args.out:
        args.out.write_text(json.dumps(info, indent=1) + "\n")
    dev = info.get("device", {})
    print(f"env: {dev.get('name', 'no CUDA device')} (sm {dev.get('capability')}), torch {info['versions']['torch']} "
          f"CUDA {info['torch_cuda']}, triton {info['versions']['triton']}, bitsandbytes {info['versions']['bitsandbytes']}, "
          f"commit {info['commit']}")
    if not info["cuda_available"]:
        print("env: torch.cuda.is_available() is False: no CUDA device", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
