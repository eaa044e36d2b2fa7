"""Smoke test of bench/grit_overhead.py on a 2-layer tiny Llama: every variant runs, GRIT's pieces are timed
only where they exist (ablations included), and the JSON is written where asked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "grit_overhead.py"


def _load():
    spec = importlib.util.spec_from_file_location("grit_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grit_overhead_smoke(tmp_path):
    bench = _load()
    variants = "peft-adamw,peft-grit,peft-grit+nocapture,peft-grit+nostep,fused-grit"
    argv = ["--layers", "2", "--warmup", "1", "--steps", "1", "--threads", "1", "--variants", variants]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "grit_overhead.json").read_text())
    summary = result["summary"]
    assert list(summary) == variants.split(",")
    assert summary["peft-adamw"]["ratio_to_peft-adamw"] == 1.0
    for name in ("peft-grit", "fused-grit"):
        assert (
            summary[name]["flush_ms"] > 0
            and summary[name]["precondition_ms"] > 0
            and summary[name]["kl_clip_ms"] > 0
        )
        assert set(summary[name]["hot_ms"]) == {"flush", *bench.PIECES}
    assert (
        summary["peft-grit+nocapture"]["flush_ms"] == 0
        and summary["peft-grit+nocapture"]["precondition_ms"] > 0
    )
    assert summary["peft-grit+nostep"]["flush_ms"] > 0 and summary["peft-grit+nostep"]["precondition_ms"] == 0
    assert all(summary["peft-adamw"][f"{k}_ms"] == 0 for k in ("flush", *bench.PIECES))
