"""``grit-kernels finetune`` end to end as a user runs it, on tiny models written to disk: a .gguf model,
progress / held-out loss / summary, samples before and after, adapters that load in plain PEFT, a merged
model with the same logits, fused by default (A/B runs too), and a kill -9 during a checkpoint save
followed by ``--resume latest``."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from test_finetune import COMMON, CONVERSATION, _adapter, bpe_tokenizer

from grit_kernels import cli
from grit_kernels.data import generate_alpaca_sample
from grit_kernels.finetune_run import prompt_ids


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_alpaca_sample(12, seed=3)))
    return path


def test_gguf_end_to_end_progress_samples_summary_and_merge(tmp_path, alpaca_file, monkeypatch, capsys):
    pytest.importorskip("gguf")
    from peft import AutoPeftModelForCausalLM
    from test_model_files import write_tiny_llama_gguf
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GRIT_KERNELS_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_file, seed=5, tie=True, vocab_size=300)  # tied embeddings, as SmolLM2
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(gguf_file), "--data", str(alpaca_file), "--output", str(out), *COMMON]
    argv += ["--max-steps", "4", "--val-fraction", "0.25", "--eval-steps", "2", "--logging-steps", "2"]
    argv += ["--sample-prompt", "Name a colour.", "--sample-max-new-tokens", "6", "--merge", "--lr", "1e-2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "dequantizing tiny.gguf" in printed
    assert "model path: fused 2/2 blocks (14 LoRA modules)" in printed
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split()[1] for ln in progress] == ["2/4", "4/4"]
    assert all("tokens/s" in ln and "s/step" in ln and "ETA 0:00:" in ln for ln in progress), progress
    evals = [ln for ln in lines if ln.startswith("eval @ step")]
    assert [ln.split()[3] for ln in evals] == ["2:", "4:"] and all("held-out loss" in ln for ln in evals)
    assert any(ln.startswith("sample before training: ") for ln in lines)
    assert any(ln.startswith("sample after training: ") for ln in lines)
    summary_line = lines[-1]
    assert summary_line.startswith("done: 4 steps (to step 4), ") and "tokens/s, held-out loss " in summary_line
    for what in ("adapters: ", "samples: ", "merged: "):
        assert what in summary_line, summary_line

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["step_times_s"]) == 4 and summary["tokens"] > 0
    assert [step for step, _ in summary["eval_losses"]] == [2, 4]
    assert summary["held_out_loss"] == summary["eval_losses"][-1][1] and summary["fused"].startswith("fused 2/2")
    samples = json.loads((out / "samples.json").read_text())
    assert samples["prompt"] == "Name a colour." and {"before", "after"} <= set(samples)

    # the adapters load in plain PEFT (base = the converted GGUF, an absolute path), and the merged
    # model (plain transformers, safetensors) gives the same logits
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].startswith(str(tmp_path / "cache"))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert (out / "merged" / "model.safetensors").is_file() and not any(
        "lora" in n for n, _ in merged.named_parameters()
    )
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    ids = torch.randint(4, 300, (2, 17))
    with torch.no_grad():
        want, got, plain = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3  # the adapters changed the function: the check has teeth
    assert not any(p.name.startswith(".incomplete") for p in out.iterdir())


def test_ab_runs_fuse_too_unless_no_fuse(model_dir, alpaca_file, tmp_path, capsys):
    base = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), *COMMON, "--max-steps", "1"]
    assert cli.main([*base, "--no-grit", "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "plain AdamW" in out and "model path: fused 1/1 blocks (7 LoRA modules)" in out
    assert cli.main([*base, "--no-grit", "--no-fuse", "--output", str(tmp_path / "b")]) == 0
    assert "model path: PEFT's LoRA layers (--no-fuse)" in capsys.readouterr().out
    assert cli.main([*base, "--lora-dropout", "0.1", "--output", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out  # fuse does not apply: the reason is printed, training goes on
    assert "model path: PEFT's LoRA layers (nothing to fuse: " in out and "lora_dropout > 0" in out
    for name in ("a", "b", "c"):
        assert len(_adapter(tmp_path / name)) == 14


def test_sample_prompt_asks_like_the_training_data():
    tok = bpe_tokenizer()
    ids = prompt_ids(tok, "hello fox", "chat")
    want = tok.apply_chat_template([{"role": "user", "content": "hello fox"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == want and want.endswith("<|im_start|>assistant\n")
    from grit_kernels.data import ByteTokenizer, tokenize_chat

    byte = ByteTokenizer()
    ids = prompt_ids(byte, "hello fox", "chat")
    full = tokenize_chat([{"messages": CONVERSATION[1:3]}], byte)[0]["input_ids"]
    assert full[: len(ids)] == ids  # the training rows start with exactly this prompt
    assert byte.decode(prompt_ids(byte, "hello fox", "alpaca")).endswith("### Response:\n")


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # kill -9 in the middle of writing checkpoint-4
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    from grit_kernels import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_kill_during_checkpoint_save_then_resume_latest(model_dir, alpaca_file, tmp_path, capsys):
    """A SIGKILL while checkpoint-4 is being written leaves checkpoint-2 as the newest checkpoint (the
    half-written one sits under a temporary name); --resume latest continues from it and ends where an
    uninterrupted run ends."""
    base = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), *COMMON, "--max-steps", "6"]
    base += ["--save-steps", "2"]
    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(script), *base, "--output", str(killed)], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(p.name for p in killed.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names, names
    partial = killed / ".incomplete-checkpoint-4" / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()

    assert cli.main([*base, "--output", str(killed), "--resume", "latest"]) == 0
    assert f"resuming from {killed / 'checkpoint-2'}" in capsys.readouterr().out
    assert not (killed / ".incomplete-checkpoint-4").exists()  # cleaned by the next save of step 4
    for step in (4, 6):
        assert (killed / f"checkpoint-{step}" / "grit_preconditioner.pt").is_file()
    full = tmp_path / "full"
    assert cli.main([*base, "--output", str(full)]) == 0
    expected, resumed = _adapter(full), _adapter(killed)
    assert expected.keys() == resumed.keys() and len(expected) == 14
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-7)
    bank = [
        torch.load(d / "checkpoint-6" / "grit_preconditioner.pt", weights_only=True)["bank"]["storage"]
        for d in (full, killed)
    ]
    assert torch.equal(*bank)  # GRIT's factors continue bit for bit from the last complete checkpoint
