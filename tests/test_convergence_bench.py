"""The convergence benchmark end to end on a tiny config (seconds): JSON, table, plot, protocol invariants."""

import json
import math

import pytest
import torch

from grit_kernels import cli


@pytest.fixture(scope="module")
def bench():
    return cli.load_bench_module("bench_convergence")


def test_tiny_run_writes_json_table_and_plot(tmp_path, capsys):
    argv = ["bench", "convergence", "--tiny", "--seeds", "2", "--arms", "adamw,loraplus,grit_sgd"]
    argv += ["--variant", 'g_graft=adamw:{"warmup_steps": 0, "update_freq": 1}:1e-3,2e-3']
    argv += ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    assert "expected ~" in capsys.readouterr().out
    result = json.loads((tmp_path / "convergence.json").read_text())
    for key in ("device", "versions", "date", "git_commit", "config", "runs", "summary", "verdict", "base", "start_loss"):
        assert key in result, key
    assert result["versions"]["torch"] and result["config"]["seeds"] == [0, 1]
    assert list(result["base"]["config"].values())  # base config recorded with the cache path
    assert (tmp_path / "cache").is_dir() and "base-" in result["base"]["cache"]
    arms = {"adamw", "loraplus", "grit_sgd", "g_graft"}
    assert set(result["summary"]) == arms
    runs = result["runs"]
    # stage 1: every lr on seed 0; stage 2: seed 1 at each arm's best lr
    assert len(runs) == sum(len(result["arms"][a]["lrs"]) for a in arms) + len(arms)
    steps = result["config"]["steps"]
    for run in runs:
        assert [c[0] for c in run["curve"]] == list(range(0, steps + 1, result["config"]["eval_every"]))
        assert run["curve"][0][1] == result["start_loss"]
        assert len(run["train_losses"]) == steps and run["train_s"] > 0
        times = [c[2] for c in run["curve"]]
        assert times == sorted(times)
    # same data order within a seed: the first-batch loss (before any update, B = 0) is identical across
    # arms and lrs, and differs between seeds
    for seed in (0, 1):
        firsts = {r["train_losses"][0] for r in runs if r["seed"] == seed}
        assert len(firsts) == 1
    assert {r["train_losses"][0] for r in runs if r["seed"] == 0} != {r["train_losses"][0] for r in runs if r["seed"] == 1}
    for name, s in result["summary"].items():
        seed0 = {r["lr"]: r["curve"][-1][1] for r in runs if r["arm"] == name and r["seed"] == 0}
        assert s["best_lr"] == min(seed0, key=seed0.get) and sorted(seed0) == s["lr_grid"]
        finals = [r["curve"][-1][1] for r in runs if r["arm"] == name and r["lr"] == s["best_lr"]]
        assert len(finals) == 2 and s["seeds"] == [0, 1]
        assert math.isclose(s["at_step"][str(steps)]["mean"], sum(finals) / 2)
        assert s["loss_min"][-1] <= s["loss_mean"][-1] <= s["loss_max"][-1]
    table = (tmp_path / "convergence.md").read_text()
    assert "LoRA+" in table and "best lr" in table
    assert (tmp_path / "convergence.png").stat().st_size > 0
    # re-summarising the raw runs (no training) gives the same summary
    again = tmp_path / "again"
    assert cli.main(["bench", "convergence", "--from-json", str(tmp_path / "convergence.json"), "--out", str(again)]) == 0
    assert json.loads((again / "convergence.json").read_text())["summary"] == result["summary"]


def test_lora_init_fixed_by_seed(bench, tmp_path):
    base, _ = bench.build_base(tmp_path, bench.BaseConfig(hidden=16, layers=1, intermediate=32, heads=2, seq_len=16,
                                                         corpus_bytes=5_000, pretrain_steps=1, pretrain_batch=1))
    a0 = [p.clone() for n, p in bench.lora_model(base, 0).named_parameters() if "lora_A" in n]
    a0_again = [p for n, p in bench.lora_model(base, 0).named_parameters() if "lora_A" in n]
    a1 = [p for n, p in bench.lora_model(base, 1).named_parameters() if "lora_A" in n]
    assert len(a0) == 7 and all(torch.equal(x, y) for x, y in zip(a0, a0_again))
    assert not any(torch.equal(x, y) for x, y in zip(a0, a1))
    # the cached base is reloaded bit for bit
    again, info = bench.build_base(tmp_path, bench.BaseConfig(hidden=16, layers=1, intermediate=32, heads=2,
                                                              seq_len=16, corpus_bytes=5_000, pretrain_steps=1,
                                                              pretrain_batch=1))
    assert info["cached"] and all(torch.equal(p, q) for p, q in zip(base.parameters(), again.parameters()))


def test_heldout_split_by_topic(bench):
    data = bench.load_finetune_data(seq_len=64, max_heldout_windows=8)
    assert data["heldout"].shape == (8, 64) and data["heldout"].dtype == torch.long
    assert data["train_topics"] > 5 * data["heldout_topics"] > 0
    held = bytes(data["heldout"][0].tolist())
    assert held not in bytes(data["train"].tolist())
