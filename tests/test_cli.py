"""The grit-kernels command, the end-to-end benchmark, the prior-art GRIT model and the examples (CPU, fast)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from grit_kernels import cli

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- bench e2e
def test_bench_e2e_writes_json_with_every_key(tmp_path, capsys):
    argv = ["bench", "e2e", "--layers", "2", "--steps", "3", "--warmup", "1", "--batch-size", "2"]
    argv += ["--max-length", "256", "--no-memory", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GRIT / AdamW step time" in printed
    result = json.loads((tmp_path / "e2e.json").read_text())
    for key in ("benchmark", "date", "device", "versions", "config", "model", "arms", "tokens", "summary", "table"):
        assert key in result, key
    assert result["device"]["type"] == "cpu" and result["device"]["slug"] == "cpu"
    assert result["versions"]["torch"] and result["config"]["steps"] == 3 and result["config"]["seq"] == "packed"
    assert result["model"]["lora_modules"] == 14
    assert set(result["arms"]) == {"peft-adamw", "fused-adamw", "fused-grit", "peft-grit", "grit-prior", "unsloth"}
    assert result["arms"]["unsloth"]["status"] == "skipped" and result["arms"]["unsloth"]["reason"]
    for name in ("peft-adamw", "fused-adamw", "fused-grit", "peft-grit", "grit-prior"):
        arm = result["arms"][name]
        assert arm["status"] == "ok", arm
        assert len(arm["step_times_s"]) == 3 and len(arm["warmup_times_s"]) == 1
        assert arm["p20_s"] <= arm["median_s"] <= arm["p80_s"]
        assert arm["tokens_per_s"] > 0 and arm["ratio_to_adamw"] > 0
        assert all(torch.isfinite(torch.tensor(arm["losses"])))
        assert arm["lora_modules"] == 14
    assert result["arms"]["peft-adamw"]["ratio_to_adamw"] == 1.0
    assert result["summary"]["grit_over_adamw"] == result["arms"]["peft-grit"]["ratio_to_adamw"]
    assert result["summary"]["fused_grit_over_peft_adamw"] == result["arms"]["fused-grit"]["ratio_to_adamw"]
    assert "fused-grit / peft-adamw" in printed
    assert result["tokens"]["padding_fraction"] == 0  # packed by default: no padding tokens


def test_bench_e2e_eigen_arms_on_request(tmp_path):
    """peft-eigen / fused-eigen: EigenAdamW inside GritOptimizer, run only when asked for."""
    argv = ["bench", "e2e", "--layers", "2", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--max-length", "256"]
    argv += ["--arms", "peft-adamw,peft-eigen,fused-eigen", "--no-memory", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    arms = json.loads((tmp_path / "e2e.json").read_text())["arms"]
    assert set(arms) == {"peft-adamw", "peft-eigen", "fused-eigen"}
    for name in ("peft-eigen", "fused-eigen"):
        assert arms[name]["status"] == "ok" and all(torch.isfinite(torch.tensor(arms[name]["losses"])))
        assert arms[name]["lora_modules"] == 14 and arms[name]["ratio_to_adamw"] > 0


def test_bench_e2e_packed_refuses_a_model_that_leaks(tmp_path, capsys):
    """OPT derives its masks from attention_mask only: packed rows would attend across samples."""
    from helpers import TINY_OPT

    argv = ["bench", "e2e", "--model-config", json.dumps({"model_type": "opt", **TINY_OPT}), "--arms", "peft-adamw", "--steps", "1"]
    argv += ["--warmup", "1", "--batch-size", "2", "--max-length", "256", "--no-memory", "--no-progress"]
    cli.main(argv + ["--out", str(tmp_path)])
    arm = json.loads((tmp_path / "e2e.json").read_text())["arms"]["peft-adamw"]
    assert arm["status"] != "ok" and "does not keep packed sequences apart" in json.dumps(arm)


def test_bench_e2e_bad_option_exits_2(capsys):
    assert cli.main(["bench", "e2e", "--arms", "adamw,nonsense", "--no-progress"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_bench_missing_dir_is_a_clear_error(monkeypatch, capsys):
    """A checkout-only benchmark without the checkout: one line naming it."""
    monkeypatch.setattr(cli, "bench_dir", lambda: None)
    assert cli.main(["bench", "convergence"]) == 2
    err = capsys.readouterr().err
    assert "bench/bench_convergence.py not found" in err and "checkout" in err and len(err.strip().splitlines()) == 1


def test_packaged_benchmarks_need_no_bench_dir(monkeypatch, tmp_path, capsys):
    """e2e and kernels are modules of the package: nothing is loaded from bench/ by path."""
    monkeypatch.setattr(cli, "bench_dir", lambda: None)
    monkeypatch.setattr(cli, "load_bench_module", lambda name: pytest.fail(f"loaded {name} by path"))
    assert cli.bench_module("e2e").__name__ == "grit_kernels.bench.e2e"
    argv = ["bench", "kernels", "--quick", "--device", "cpu", "--ops", "fold,invert", "--impls", "torch,prior-art"]
    assert cli.main(argv + ["--reps", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert [(row["op"], sorted(row["timings"])) for row in result["results"]] == [
        ("fold", ["prior-art", "torch"]), ("invert", ["prior-art", "torch"])
    ]
    assert result["partial"] is False and result["versions"]["torch"]


def test_installed_package_runs_benchmarks_from_anywhere(tmp_path):
    """The package copied alone (no bench/ beside it, as in site-packages), run from another directory:
    `bench kernels` and `bench e2e` run, the checkout-only `bench convergence` is a one-line error."""
    import os
    import shutil
    import subprocess

    site = tmp_path / "site"
    shutil.copytree(REPO / "grit_kernels", site / "grit_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GRIT_KERNELS_BENCH_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)

    def grit(*argv):
        code = "import sys, grit_kernels.cli as c; print(c.__file__, flush=True); sys.exit(c.main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)

    kernels = grit("bench", "kernels", "--quick", "--device", "cpu", "--ops", "invert", "--impls", "torch", "--reps", "2",
                   "--out", "k")
    assert kernels.returncode == 0, kernels.stderr[-2000:]
    assert kernels.stdout.startswith(str(site / "grit_kernels" / "cli.py"))  # the copy, not the checkout
    assert json.loads((work / "k" / "kernels.json").read_text())["git_commit"] is None  # no checkout around it
    e2e = grit("bench", "e2e", "--quick", "--arms", "peft-adamw,peft-grit,grit-prior", "--batch-size", "2",
               "--max-length", "256", "--no-progress", "--no-plot")
    assert e2e.returncode == 0, e2e.stderr[-2000:]
    arms = json.loads((work / "grit-results" / "cpu" / "e2e.json").read_text())["arms"]
    assert {name: arm["status"] for name, arm in arms.items()} == dict.fromkeys(("peft-adamw", "peft-grit", "grit-prior"), "ok")
    convergence = grit("bench", "convergence")
    assert convergence.returncode == 2 and "checkout" in convergence.stderr
    assert len(convergence.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- finetune errors
@pytest.fixture
def model_dir(tmp_path):
    """A directory that passes the path check (config.json); data errors are found before loading weights."""
    from grit_kernels.models import tiny_llama_config

    path = tmp_path / "model"
    tiny_llama_config(num_layers=1).save_pretrained(path)
    return path


def test_finetune_missing_model_exits_2(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text("[]")
    missing = tmp_path / "no-such-model"
    assert cli.main(["finetune", "--model", str(missing), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_finetune_missing_data_exits_2(model_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-data.json"
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "records, expected",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "record 1"),
        ([{"instruction": "a", "output": 3}], "record 0"),
        ("not json", "invalid JSON"),
    ],
)
def test_finetune_malformed_records_exit_2(model_dir, tmp_path, capsys, records, expected):
    data = tmp_path / "alpaca.json"
    data.write_text(records if isinstance(records, str) else json.dumps(records))
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_finetune_runs_and_saves_peft_adapters(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from grit_kernels.data import generate_alpaca_sample
    from grit_kernels.models import tiny_llama_config

    model = tmp_path / "model"
    AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=1)).save_pretrained(model)
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in generate_alpaca_sample(6, seed=3)))
    out = tmp_path / "adapters"
    argv = ["finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "2", "--max-length", "256", "--r", "4", "--logging-steps", "1"]
    assert cli.main(argv) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert f"adapters: {out}" in capsys.readouterr().out.splitlines()[-1]


# --------------------------------------------------------------------------------------------- prior art
def test_prior_art_statistics_equal_ours_to_fp16_precision():
    """The prior-way arm does the same math: its (fp16) factors equal the FactorBank's on one batch."""
    import grit_kernels as gk
    from grit_kernels.bank import BACKWARD, FORWARD
    from grit_kernels.bench import prior_art
    from grit_kernels.models import build_lora_model, tiny_llama_config

    cfg = tiny_llama_config(num_layers=2)
    ours_model = build_lora_model(cfg, r=8, seed=1, init_lora_weights=False)  # random B: D != 0
    prior_model = build_lora_model(cfg, r=8, seed=1, init_lora_weights=False)
    from grit_kernels import data

    tok = data.ByteTokenizer()
    features = data.tokenize_alpaca(data.generate_alpaca_sample(12, seed=5), tok, max_length=256)[:3]
    batch = data.DynamicPaddingCollator(tok.pad_token_id)(features)  # rows of different lengths: padding
    assert (batch["attention_mask"] == 0).any()
    pre = gk.GritPreconditioner(ours_model, gk.GritConfig(backend="torch"))
    prior = prior_art.PriorArtGrit(prior_model)
    assert prior.num_modules == pre.num_modules == 14
    for model in (ours_model, prior_model):
        model.train()
        model(**batch).loss.backward()
    pre.step()
    prior.step()
    # one fp16 rounding: relative 2^-11 for normal numbers, absolute 2^-25 in fp16's subnormal range
    # (entries of D below 6e-5 are subnormal in fp16: the precision loss docs/design.md §11 warns about)
    for i, mod in enumerate(prior.modules):
        assert mod.name == pre.modules[i].name
        assert mod.forward_factor.dtype == torch.float16
        pairs = ((pre.bank.factor[FORWARD, i], mod.forward_factor), (pre.bank.factor[BACKWARD, i], mod.backward_factor))
        for ours, theirs in pairs:
            assert ours.norm() > 0
            torch.testing.assert_close(theirs.float(), ours, rtol=2.0**-10, atol=2.0**-24)


def test_prior_art_preconditions_with_the_chosen_pairing():
    from grit_kernels.bench import prior_art
    from grit_kernels.models import build_lora_model, tiny_llama_config

    grads = {}
    for pairing in ("correct", "published"):
        model = build_lora_model(tiny_llama_config(num_layers=1), r=4, seed=2, init_lora_weights=False)
        prior = prior_art.PriorArtGrit(model, warmup_steps=0, pairing=pairing)
        ids = torch.randint(4, 260, (2, 24), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        mod = prior.modules[0]
        raw_a = mod.lora_A.weight.grad.clone()
        prior.step()
        left = mod.inv_backward if pairing == "correct" else mod.inv_forward
        torch.testing.assert_close(mod.lora_A.weight.grad, left @ raw_a)
        grads[pairing] = mod.lora_A.weight.grad
    assert not torch.allclose(grads["correct"], grads["published"])
    with pytest.raises(ValueError, match="pairing"):
        prior_art.PriorArtGrit(model, pairing="swapped")


# --------------------------------------------------------------------------------------------- examples
@pytest.mark.parametrize("name", ["custom_loop", "trainer", "qlora", "compare"])
def test_example_scripts_import(name):
    module = _load(REPO / "python" / f"{name}.py", f"grit_example_{name}")
    assert callable(module.main) and module.__doc__


def test_custom_loop_example_runs():
    module = _load(REPO / "python" / "custom_loop.py", "grit_example_custom_loop_run")
    loss = module.main(["--steps", "2", "--layers", "1", "--grad-accum", "1", "--batch-size", "2", "--max-length", "256"])
    assert loss == loss and loss > 0  # finite


def test_trainer_example_runs(tmp_path):
    module = _load(REPO / "python" / "trainer.py", "grit_example_trainer_run")
    metrics = module.main(["--max-steps", "2", "--layers", "1", "--output", str(tmp_path / "out")])
    assert metrics["eval_loss"] > 0 and (tmp_path / "out" / "adapter_config.json").is_file()


def test_demo_trains_grit_next_to_adamw_on_the_same_batches(capsys):
    assert cli.main(["demo", "--steps", "3", "--layers", "1", "--batch-size", "2", "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    grit = [line for line in out.splitlines() if line.startswith("grit :")]
    adamw = [line for line in out.splitlines() if line.startswith("adamw:")]
    assert len(grit) == 1 and len(adamw) == 1
    # same init, same first batch: the first losses agree; the step-time ratio is printed
    assert grit[0].split("->")[0].split()[-1] == adamw[0].split("->")[0].split()[-1]
    assert "GRIT/AdamW step time" in out
    assert cli.main(["demo", "--steps", "1", "--layers", "1", "--no-baseline"]) == 0
    assert "adamw:" not in capsys.readouterr().out
