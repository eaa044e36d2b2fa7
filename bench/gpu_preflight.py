"""``bash bench/run_gpu_all.sh --preflight``: everything the GPU call needs, checked HERE before the call.

1. ``.whl/`` (ignored by git, carried): the wheels the GPU image lacks, i.e. bitsandbytes alone (the image
   has torch 2.11 + CUDA 13.0, triton, transformers, peft, pytest, pytest-timeout, ninja). Downloaded with
   pip for CPython 3.12 / manylinux x86-64 when absent, then slimmed to the native libraries that image can
   load (CPU + CUDA 13.x: about 8 MB instead of 43 MB). A carried wheel of a package the image already has
   is refused (it would shadow the image's build and plugins, pytest's included), and so are two versions
   of one package (pip stops the whole install).
2. The size of what travels: tracked files + untracked files git does not ignore + ``shared/`` + the
   carried paths, against the 64 MiB limit.
3. The exact ``carry`` list, ``timeout_s`` and command line (<= 2,000 characters) to paste into the
   device tool's ``run``, and a dry run of the plan (phases, caps, <= 8 files).

Exit status 0 when the call can be made as printed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LIMIT_BYTES = 64 * 2**20
MAX_COMMAND = 2000
MAX_TIMEOUT_S = 600
WHEEL_DIR = ".whl"
BITSANDBYTES = "bitsandbytes==0.50.2"
#: native libraries of bitsandbytes the image can load (torch 2.11.0+cu130): CPU and CUDA 13.x
KEEP_NATIVE = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
#: what the GPU image already has (.library/device/KINDS.md): never carried
IMAGE_HAS = {
    "torch", "triton", "transformers", "peft", "accelerate", "numpy", "packaging", "pytest", "pluggy", "iniconfig",
    "pytest-timeout", "pytest-xdist", "ninja", "safetensors", "tokenizers", "huggingface-hub", "filelock", "jinja2",
    "sympy", "networkx", "fsspec", "pyyaml", "regex", "requests", "tqdm", "typing-extensions", "psutil", "matplotlib",
}
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "any")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def project(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def download_bitsandbytes(wheels: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(wheels), BITSANDBYTES]
    for plat in PIP_PLATFORMS:
        cmd[5:5] = ["--platform", plat]
    print(f"preflight: downloading {BITSANDBYTES} for CPython 3.12 manylinux x86-64 into {wheels}/")
    subprocess.run(cmd, check=True)


def slim_wheel(wheel: Path) -> tuple[int, int]:
    """Rewrite ``wheel`` without the native libraries the image cannot load (RECORD updated); (before, after) bytes."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        drop = {n for n in names if n.endswith(".so") and not KEEP_NATIVE.search(n)}
        if not drop:
            return before, before
        tmp = wheel.with_suffix(".slim")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(ln for ln in lines if ln.split(",")[0] not in drop) + "\n").encode()
                dst.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def tree_bytes(root: Path, carry: list[str]) -> dict:
    def size(paths):
        total = 0
        for rel in paths:
            p = root / rel
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        return total

    tracked = [p for p in git(root, "ls-files", "-z").split("\0") if p]
    untracked = [p for p in git(root, "ls-files", "-z", "-o", "--exclude-standard").split("\0") if p]
    sizes = {"tracked": size(tracked), "untracked_not_ignored": size(untracked)}
    shared = root / "shared"
    if shared.is_dir():
        sizes["shared/"] = sum(p.stat().st_size for p in shared.rglob("*") if p.is_file() and not p.is_symlink())
    for c in carry:
        path = root / c
        sizes[c + "/"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else size([c])
    sizes["total"] = sum(sizes.values())
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deadline", type=int, default=540)
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing bitsandbytes wheel")
    args = p.parse_args(argv)
    root = Path(git(Path.cwd(), "rev-parse", "--show-toplevel").strip())
    problems: list[str] = []
    print(f"preflight: checkout {root} (the device tool sends the session's own checkout: run this there)")

    if subprocess.run(["git", "-C", str(root), "check-ignore", "-q", WHEEL_DIR + "/"]).returncode != 0:
        exclude = Path(git(root, "rev-parse", "--git-path", "info/exclude").strip())
        exclude = exclude if exclude.is_absolute() else root / exclude
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with open(exclude, "a") as f:
            f.write(f"/{WHEEL_DIR}/\n")
        print(f"preflight: /{WHEEL_DIR}/ added to {exclude}")
    wheels = root / WHEEL_DIR
    wheels.mkdir(exist_ok=True)
    if not any(project(w) == "bitsandbytes" for w in wheels.glob("*.whl")):
        if args.no_download:
            problems.append(f"no bitsandbytes wheel in {WHEEL_DIR}/ (QLoRA NF4 needs it; run without --no-download)")
        else:
            download_bitsandbytes(wheels)
    found = sorted(wheels.glob("*.whl"))
    by_project: dict[str, list[str]] = {}
    for w in found:
        by_project.setdefault(project(w), []).append(w.name)
        if project(w) == "bitsandbytes":
            before, after = slim_wheel(w)
            if after < before:
                print(f"preflight: {w.name} slimmed to CPU + CUDA 13.x libraries: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
            with zipfile.ZipFile(w) as z:
                if not any(re.search(r"libbitsandbytes_cuda130\.so$", n) for n in z.namelist()):
                    problems.append(f"{w.name} has no libbitsandbytes_cuda130.so (the image's torch is CUDA 13.0)")
    for name, files in by_project.items():
        if name in IMAGE_HAS:
            problems.append(f"{WHEEL_DIR}/{files[0]}: the image already has {name}; a carried copy would shadow it: delete it")
        if len(files) > 1:
            problems.append(f"{WHEEL_DIR}/: {len(files)} versions of {name} ({', '.join(files)}): keep one")
    for w in found:
        print(f"preflight: carried wheel {w.name} ({w.stat().st_size / 2**20:.1f} MiB)")

    carry = [WHEEL_DIR] if found else []
    sizes = tree_bytes(root, carry)
    for k, v in sizes.items():
        print(f"preflight: size {k:24s} {v / 2**20:8.2f} MiB")
    if sizes["total"] > LIMIT_BYTES:
        problems.append(f"what travels is {sizes['total'] / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB limit")

    head = git(root, "rev-parse", "HEAD").strip()
    dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no").strip())
    if dirty:
        print("preflight: WARNING: uncommitted changes travel too; the recorded commit is marked -dirty")
    commit = head + ("-dirty" if dirty else "")
    deadline = "" if args.deadline == 540 else f" --deadline {args.deadline}"
    command = f"GRIT_COMMIT={commit} bash bench/run_gpu_all.sh{deadline}"
    timeout_s = min(MAX_TIMEOUT_S, args.deadline + 45)
    if len(command) > MAX_COMMAND:
        problems.append(f"the command is {len(command)} characters, over {MAX_COMMAND}")
    if args.deadline + 20 > MAX_TIMEOUT_S:
        problems.append(f"deadline {args.deadline} s leaves no margin under the {MAX_TIMEOUT_S} s a command may run")

    with tempfile.TemporaryDirectory(prefix="run_gpu_all-preflight-") as tmp:
        dry = subprocess.run(["bash", str(root / "bench" / "run_gpu_all.sh"), "--dry-run", "--deadline", str(args.deadline),
                              "--out", tmp], capture_output=True, text=True, cwd=root)
        n_files = sum(1 for f in Path(tmp).rglob("*") if f.is_file())
    print("preflight: dry run of the plan (exit %d, %d files):" % (dry.returncode, n_files))
    print("\n".join("  " + ln for ln in dry.stdout.splitlines() if not ln.startswith("[dry-run]")))
    if dry.returncode != 0 or n_files > 8:
        problems.append(f"the dry run failed (exit {dry.returncode}) or wrote {n_files} > 8 files: {dry.stderr.strip()[-300:]}")

    print()
    print("device tool `run` arguments:")
    print(f"  carry:     {json.dumps(carry)}")
    print(f"  timeout_s: {timeout_s}")
    print(f"  command:   {command}")
    print(f"  ({len(command)} characters; the results come back as the files under $OUT; then "
          "`bash bench/run_gpu_all.sh --collect <files_at>` copies them into bench/results/<gpu-slug>/)")
    if problems:
        print()
        for msg in problems:
            print(f"preflight: PROBLEM: {msg}")
        return 1
    print("preflight: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
