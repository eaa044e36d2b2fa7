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


def test_break_even_step_cost_from_the_mean_curves(bench):
    """GRIT reaches LoRA+'s final 1.0 halfway between its evaluations at 100 (1.2) and 150 (0.8): step 125, so
    with 200 baseline steps it ties at equal wall-clock at a step cost of 200 / 125 = 1.6x."""
    def arm(losses, ms):
        steps = [0, 50, 100, 150, 200]
        return {"steps": steps, "loss_mean": losses, "ms_per_step": ms,
                "at_step": {"100": {"mean": losses[2]}, "200": {"mean": losses[-1]}},
                "at_equal_time": {"mean": losses[-1]}}
    summary = {"adamw": arm([2.0, 1.8, 1.6, 1.4, 1.2], 10.0), "loraplus": arm([2.0, 1.7, 1.5, 1.2, 1.0], 10.0),
               "grit_adamw": arm([2.0, 1.5, 1.2, 0.8, 0.7], 13.0)}
    b = bench.verdict(summary)["break_even"]
    assert b["baseline"] == "loraplus" and b["grit_steps_to_baseline_final"] == pytest.approx(125.0)
    assert b["max_step_cost_ratio"] == pytest.approx(1.6) and b["measured_step_cost_ratio"] == pytest.approx(1.3)
    summary["grit_adamw"] = arm([2.0, 1.9, 1.8, 1.7, 1.1], 10.0)
    assert bench.verdict(summary)["break_even"]["max_step_cost_ratio"] == 0.0  # never reaches 1.0


def _saved(arms, runs, **config):
    cfg = {"steps": 4, "batch_size": 2, "eval_every": 2, "r": 8, "alpha": 16.0, "fuse": True, "model": "/a/m.gguf",
           "seeds": sorted({r[2] for r in runs}), **config}
    return {"config": cfg, "arms": {n: {"inner": i, "grit": g, "lrs": lrs} for n, (i, g, lrs) in arms.items()},
            "runs": [{"arm": a, "lr": lr, "seed": s, "curve": [[4, loss, 1.0]]} for a, lr, s, loss in runs],
            "wall_s": 10.0, "git_commit": "c", "date": "d", "command": []}


def test_merge_results_unions_runs_and_checks_the_protocol(bench):
    first = _saved({"adamw": ("adamw", None, [1e-3, 2e-3])}, [("adamw", 1e-3, 0, 2.0), ("adamw", 2e-3, 0, 1.9)])
    second = _saved({"adamw": ("adamw", None, [2e-3]), "eigen": ("eigen_adam", {}, [2e-3])},
                    [("adamw", 2e-3, 0, 1.8), ("adamw", 2e-3, 1, 1.7), ("eigen", 2e-3, 1, 1.6)],
                    model="/elsewhere/m.gguf")
    merged = bench.merge_results([first, second], ["first.json", "second.json"])
    runs = {(r["arm"], r["lr"], r["seed"]): r["curve"][-1][1] for r in merged["runs"]}
    assert runs == {("adamw", 1e-3, 0): 2.0, ("adamw", 2e-3, 0): 1.8, ("adamw", 2e-3, 1): 1.7, ("eigen", 2e-3, 1): 1.6}
    assert merged["arms"]["adamw"]["lrs"] == [1e-3, 2e-3] and merged["config"]["seeds"] == [0, 1]
    assert [m["file"] for m in merged["merged_from"]] == ["first.json", "second.json"] and merged["wall_s"] == 20.0
    assert first["runs"][1]["curve"][-1][1] == 1.9  # the inputs are left as they were
    with pytest.raises(ValueError, match="steps=8"):
        bench.merge_results([first, _saved({}, [], steps=8)], ["first.json", "x.json"])
    with pytest.raises(ValueError, match="another model"):
        bench.merge_results([first, _saved({}, [], model="/a/other.gguf")], ["first.json", "x.json"])
    with pytest.raises(ValueError, match="defined differently"):
        bench.merge_results([first, _saved({"adamw": ("sgd", None, [1.0])}, [])], ["first.json", "x.json"])
