"""bench/run_gpu_all.sh on a machine without a GPU: the plan's deadline arithmetic, at most 8 result files, a
failing or timed-out phase recorded while the later phases still run (``--dry-run`` replaces every phase by a
stub that writes the phase's files, sleeps ``STUB_SLEEP_<phase>`` and exits ``STUB_RC_<phase>``), the no-CUDA
abort of the real script, and the preflight's wheel slimming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "run_gpu_all.sh"
PHASES = ["setup", "env", "build", "tests", "kernels", "e2e"]
FILES = {"summary.txt", "summary.json", "env.json", "build.log", "tests.log", "kernels.json", "e2e-qlora.json", "bench.log"}
#: small caps for the stub runs: a phase's timeout is its cap minus the kill grace plus what earlier phases left
SMALL = {"CAP_setup": "2", "CAP_env": "2", "CAP_build": "2", "CAP_tests": "3", "CAP_kernels": "2", "CAP_e2e": "2",
         "KILL_GRACE_S": "1", "REPORT_RESERVE_S": "1"}


def run(out: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CAP_", "STUB_", "DEADLINE_S"))}
    return subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True, timeout=timeout,
        env={**clean, **env}, cwd=ROOT,
    )


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def check_arithmetic(s: dict) -> None:
    """Every phase's timeout, kill grace and the caps of the phases after it fit before the deadline."""
    deadline, grace, reserve = s["deadline_s"], s["kill_grace_s"], s["report_reserve_s"]
    caps = [p["cap_s"] for p in s["phases"]]
    assert sum(caps) + reserve <= deadline
    for i, p in enumerate(s["phases"]):
        if p["timeout_s"] is None:
            continue
        later = sum(caps[i + 1 :])
        assert p["start_s"] + p["timeout_s"] + grace + later + reserve <= deadline + 1, p  # +1: whole seconds
        assert p["timeout_s"] >= p["cap_s"] - grace, p  # never less than its own cap


def test_dry_run_default_plan(tmp_path):
    proc = run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caps 530 s + report 10 s = 540 s <= deadline 540 s" in proc.stdout
    s = summary(tmp_path)
    assert s["deadline_s"] == 540 and [p["name"] for p in s["phases"]] == PHASES
    assert all(p["status"] == "ok" for p in s["phases"])
    check_arithmetic(s)
    written = {f.name for f in tmp_path.rglob("*") if f.is_file()}
    assert written == FILES and len(written) <= 8


def test_dry_run_scales_caps_to_a_shorter_deadline(tmp_path):
    proc = run(tmp_path, "--dry-run", "--deadline", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(tmp_path)
    assert sum(p["cap_s"] for p in s["phases"]) + s["report_reserve_s"] <= 300
    check_arithmetic(s)


def test_failing_and_timed_out_phases_keep_files_and_later_phases_run(tmp_path):
    # setup sleeps past its timeout (killed), kernels fails: every other phase still runs and passes
    proc = run(tmp_path, "--dry-run", "--deadline", "14", STUB_SLEEP_setup="30", STUB_RC_kernels="1", **SMALL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    s = summary(tmp_path)
    status = {p["name"]: p["status"] for p in s["phases"]}
    assert status == {"setup": "timeout", "env": "ok", "build": "ok", "tests": "ok", "kernels": "failed", "e2e": "ok"}
    check_arithmetic(s)
    written = {f.name for f in tmp_path.rglob("*") if f.is_file()}
    assert written == FILES  # the files of the phases before and after the failures are all there
    assert "[dry-run] kernels" in (tmp_path / "bench.log").read_text()  # written before it failed
    assert "[dry-run] e2e" in (tmp_path / "bench.log").read_text()
    text = (tmp_path / "summary.txt").read_text()
    assert "setup    timeout" in text and "kernels  failed" in text and "some phase did not pass" in text


def test_summary_is_written_after_each_phase(tmp_path):
    """A phase that never returns (the device call's own limit) leaves the summary of the phases before it."""
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--dry-run", "--deadline", "40", "--out", str(tmp_path)], cwd=ROOT,
        env={**os.environ, **SMALL, "CAP_e2e": "20", "STUB_SLEEP_e2e": "60"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            path = tmp_path / "summary.json"
            if path.exists() and '"name": "kernels", "cap_s": 2' in path.read_text() and '"ok"' in path.read_text().split('"kernels"')[1]:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        s = summary(tmp_path)
        assert [p["status"] for p in s["phases"]][:5] == ["ok"] * 5 and s["phases"][5]["status"] == "pending"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_caps_over_the_deadline_are_refused(tmp_path):
    proc = run(tmp_path, "--dry-run", "--deadline", "100", CAP_e2e="95")
    assert proc.returncode == 3
    assert "exceed the deadline" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA abort")
def test_real_run_without_cuda_aborts_after_env(tmp_path):
    """The real script on this machine: setup and env run, env finds no CUDA device, nothing else runs (exit 2)."""
    proc = run(tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    s = summary(tmp_path)
    status = {p["name"]: p["status"] for p in s["phases"]}
    assert status["setup"] == "ok" and status["env"] == "failed (no CUDA device)"
    assert all(status[p] == "skipped (no CUDA device)" for p in PHASES[2:])
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["cuda_available"] is False and env["versions"]["torch"]
    assert "no CUDA device" in (tmp_path / "summary.txt").read_text()
    assert len([f for f in tmp_path.rglob("*") if f.is_file()]) <= 8


def test_preflight_slims_the_bitsandbytes_wheel(tmp_path):
    """Only the native libraries the image can load (CPU, CUDA 13.x) stay; RECORD lists what is left."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_preflight
    finally:
        sys.path.pop(0)
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64"]
    with zipfile.ZipFile(wheel, "w") as z:
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0" * 1000)
        z.writestr("bitsandbytes/__init__.py", "")
        record = [f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=x,1000" for lib in libs]
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(record + ["bitsandbytes/__init__.py,,"]) + "\n")
    before, after = gpu_preflight.slim_wheel(wheel)
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")}
    assert {n for n in names if n.endswith(".so")} == kept
    assert "cuda118" not in record and "cuda130" in record and "__init__.py" in record
    assert gpu_preflight.slim_wheel(wheel) == (after, after)  # idempotent
