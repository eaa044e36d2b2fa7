"""``grit-kernels finetune``: flag checks before any load, chat data with masked labels, checkpoints and
resume, precision, the absolute base-model path (CPU, tiny models, seconds each)."""

import argparse
import json
import os

import pytest
import torch
from helpers import TINY_OPT

from grit_kernels import cli, finetune
from grit_kernels.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    generate_alpaca_sample,
    load_chat_json,
    load_records,
    tokenize_chat,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello fox"},
    {"role": "assistant", "content": "the dog"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "lazy dog."},
]


def bpe_tokenizer(chat_template=CHATML):
    """A small byte-level BPE tokenizer (trained here, offline) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog. user assistant system hello"] * 20, trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


def supervised_text(tok, feature):
    return tok.decode(
        [i for i, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX]
    )


# --------------------------------------------------------------------------------------------- chat data
def test_chat_template_labels_cover_exactly_the_assistant_turns():
    tok = bpe_tokenizer()
    feature = tokenize_chat([{"messages": CONVERSATION}], tok)[0]
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert (
        feature["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    )  # one tokenization of the text
    assert supervised_text(tok, feature) == "the dog<|im_end|>\nlazy dog.<|im_end|>\n"
    # labels equal the ids where supervised, and the supervised tokens form exactly two runs (two turns)
    flags = [label != IGNORE_INDEX for label in feature["labels"]]
    assert all(label == i for i, label, f in zip(feature["input_ids"], feature["labels"], flags) if f)
    assert sum(1 for a, b in zip([False] + flags, flags) if b and not a) == 2
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert not any(flags[: len(tok(prompt, add_special_tokens=False)["input_ids"])])  # system, user, header

    class SlowView:  # a tokenizer without offsets: the pieces are tokenized one by one
        is_fast = False

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    assert tokenize_chat([{"messages": CONVERSATION}], SlowView(tok))[0] == feature


def test_chat_without_template_uses_the_fallback_and_masks_the_prompt():
    for tok in (bpe_tokenizer(chat_template=None), ByteTokenizer()):
        feature = tokenize_chat([{"messages": CONVERSATION}], tok)[0]
        text = tok.decode(feature["input_ids"], skip_special_tokens=False)
        assert "### User:\nhello fox\n\n### Assistant:\nthe dog" in text and "### System:\nbe brief" in text
        eos = tok.eos_token_id
        kept = [i for i, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX]
        assert kept.count(eos) == 2 and kept[-1] == eos
        assert tok.decode([i for i in kept if i != eos]) == "the doglazy dog."


def test_chat_template_errors_name_the_record():
    strict = CHATML.replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}",
    )
    tok = bpe_tokenizer(chat_template=strict)
    records = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}]
    assert len(tokenize_chat(records[:1], tok)) == 1
    with pytest.raises(ValueError, match="record 1: the tokenizer's chat template fails on it .*System role"):
        tokenize_chat(records, tok)


def test_chat_truncation_and_unsupervised_rows():
    tok = ByteTokenizer()
    short = tokenize_chat([{"messages": CONVERSATION}], tok, max_length=20)  # only the system/user part fits
    assert short == []
    kept = tokenize_chat([{"messages": CONVERSATION}], tok, max_length=60)[0]
    assert len(kept["input_ids"]) == 60 and any(label != IGNORE_INDEX for label in kept["labels"])


def test_load_records_detects_the_format_and_names_bad_records(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": CONVERSATION, "id": i}) for i in range(3)))
    fmt, records = load_records(chat)
    assert fmt == "chat" and records == [{"messages": CONVERSATION}] * 3 and load_chat_json(chat) == records
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(generate_alpaca_sample(2)))
    assert load_records(alpaca)[0] == "alpaca"
    bad = [
        ({"messages": [{"role": "robot", "content": "x"}]}, "message 0: role"),
        ({"messages": [{"role": "user", "content": 3}]}, "message 0: field 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
    ]
    for record, expected in bad:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([{"messages": CONVERSATION}, record]))
        with pytest.raises(ValueError, match=f"bad.json: record 1: {expected}"):
            load_records(path)
    with pytest.raises(ValueError, match="record 0: field 'messages'"):
        load_records(alpaca, "chat")


# --------------------------------------------------------------------------------------------- flag errors
@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_alpaca_sample(12, seed=3)))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model would be loaded (errors must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(finetune, "load_model", refuse)


def _run_error(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lora-dropout", "2"),
        ("--lora-dropout", "-0.1"),
        ("--update-freq", "0"),
        ("--damping", "-1"),
        ("--grit-warmup-steps", "-3"),
        ("--epochs", "0"),
        ("--epochs", "nan"),
        ("--lr", "-1e-4"),
        ("--lr", "inf"),
        ("--max-steps", "0"),
        ("--r", "0"),
        ("--alpha", "0"),
        ("--batch-size", "0"),
        ("--grad-accum", "-1"),
        ("--max-length", "1"),
        ("--warmup-ratio", "1.5"),
        ("--val-fraction", "1"),
        ("--max-grad-norm", "-1"),
        ("--logging-steps", "0"),
        ("--save-steps", "-5"),
        ("--eval-steps", "0"),
        ("--target-modules", "q_proj,,v_proj"),
        ("--report-to", "nonsense"),
        ("--loraplus-ratio", "0"),
        ("--loraplus-ratio", "nan"),
        ("--optimizer", "sgd"),
        ("--r", "four"),  # argparse's own type error, one line too
        ("--data-format", "csv"),
    ],
)
def test_finetune_bad_flag_exits_2_naming_it(model_dir, alpaca_file, no_model_load, capsys, flag, value):
    err = _run_error(
        ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), f"{flag}={value}"], capsys
    )
    assert flag in err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--eval-steps", "5"], "--eval-steps needs held-out rows"),
        (["--save-steps", "0", "--save-total-limit", "2"], "--save-total-limit needs --save-steps"),
        (["--resume", "latest"], "--resume latest: no checkpoint"),
        (["--resume", "NOWHERE"], "--resume NOWHERE: no such directory"),
        (["--report-to", "none,wandb"], "--report-to"),
        (["--bf16", "--fp16"], "--fp16"),
        (["--optimizer", "eigen_adamw", "--grit-fisher", "diagonal"], "add --optimizer adamw"),
    ],
)
def test_finetune_inconsistent_flags_exit_2(model_dir, alpaca_file, no_model_load, capsys, extra, expected):
    err = _run_error(["finetune", "--model", str(model_dir), "--data", str(alpaca_file), *extra], capsys)
    assert expected in err


def test_finetune_bad_paths_exit_2(model_dir, alpaca_file, tmp_path, no_model_load, capsys):
    base = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file)]
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    assert "--output" in _run_error([*base, "--output", str(not_a_dir)], capsys)
    assert "--resume" in _run_error([*base, "--resume", str(model_dir)], capsys)  # no trainer_state.json
    assert "--model" in _run_error(["finetune", "--model", str(tmp_path), "--data", str(alpaca_file)], capsys)
    assert "--data" in _run_error(
        ["finetune", "--model", str(model_dir), "--data", str(tmp_path / "x.json")], capsys
    )
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "no records" in _run_error(["finetune", "--model", str(model_dir), "--data", str(empty)], capsys)
    err = _run_error([*base, "--target-modules", "c_attn,c_fc"], capsys)  # GPT-2 names on a Llama
    assert "--target-modules c_attn,c_fc: none of these" in err and "q_proj" in err
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"messages": CONVERSATION}]))
    assert "--max-length" in _run_error([*base[:4], str(chat), "--max-length", "20"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of --fp16")
def test_finetune_fp16_without_cuda_exits_2(model_dir, alpaca_file, no_model_load, capsys):
    err = _run_error(["finetune", "--model", str(model_dir), "--data", str(alpaca_file), "--fp16"], capsys)
    assert "--fp16 needs a CUDA GPU" in err


def test_finetune_report_to_a_missing_logger_exits_2(
    model_dir, alpaca_file, no_model_load, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if "tensorboard" in name.lower() else real(name, *a),
    )
    err = _run_error(
        ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), "--report-to", "tensorboard"],
        capsys,
    )
    assert "--report-to tensorboard: tensorboard is not installed" in err


# --------------------------------------------------------------------------------------------- runs
def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


COMMON = [
    "--batch-size",
    "2",
    "--max-length",
    "256",
    "--r",
    "4",
    "--logging-steps",
    "1",
    "--grit-warmup-steps",
    "1",
    "--update-freq",
    "1",
    "--lr",
    "1e-3",
]


def test_finetune_checkpoints_and_resume_continue_exactly(model_dir, alpaca_file, tmp_path, capsys):
    """4 steps in one go == 2 steps, then --resume latest for the last 2 (adapters, and GRIT's factors)."""
    import shutil

    full = tmp_path / "full"
    base = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), *COMMON, "--max-steps", "4"]
    # --optimizer adamw: the fused path's ~1e-7 evaluation perturbation (below) rotates EigenAdamW's bases of
    # near-degenerate early factors; its resume without evaluations is exact (test_finetune_run.py, test_trainer.py)
    base += ["--val-fraction", "0.25", "--eval-steps", "2", "--save-steps", "2", "--optimizer", "adamw"]
    assert cli.main([*base, "--output", str(full)]) == 0
    assert "held-out loss" in capsys.readouterr().out
    for step in (2, 4):
        ckpt = full / f"checkpoint-{step}"
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "grit_preconditioner.pt").is_file()
    state = json.loads((full / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2, 4]
    pre_state = torch.load(full / "checkpoint-4" / "grit_preconditioner.pt", weights_only=True)
    assert pre_state["step_count"] == 4

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    assert cli.main([*base, "--output", str(part), "--resume", "latest"]) == 0
    assert f"resuming from {part / 'checkpoint-2'}" in capsys.readouterr().out
    expected, resumed = _adapter(full), _adapter(part)
    assert expected.keys() == resumed.keys() and len(expected) == 14  # 7 modules x (A, B)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-7)
    assert (
        cli.main([*base, "--output", str(part), "--resume", "latest", "--r", "8"]) == 2
    )  # not the checkpoint's r
    assert "--r 8 differs from the checkpoint's r=4" in capsys.readouterr().err
    resumed_pre = torch.load(part / "checkpoint-4" / "grit_preconditioner.pt", weights_only=True)
    # rounding-level only: on the fused path (the default) an evaluation between steps perturbs the next
    # steps' factors at ~1e-7 relative (measured; without --eval-steps, or with --no-fuse, the resumed bank
    # is bit-identical: test_finetune_run.py's kill test checks that), amplified in near-singular inverses
    torch.testing.assert_close(
        resumed_pre["bank"]["storage"], pre_state["bank"]["storage"], rtol=1e-3, atol=1e-6
    )
    assert not torch.equal(
        _adapter(full / "checkpoint-2")[next(iter(expected))], expected[next(iter(expected))]
    )


def test_finetune_packs_by_default_and_matches_no_packing(
    model_dir, alpaca_file, tmp_path, monkeypatch, capsys
):
    """The default data path is padding-free packing; two GRIT steps (the second preconditioned) give the
    same adapters as --no-packing (dynamic padding): same samples, same per-token losses and gradients."""
    from grit_kernels.trainer import GritTrainer

    collators, init = [], GritTrainer.__init__

    def record(self, *args, **kwargs):
        collators.append(type(kwargs["data_collator"].collate).__name__)  # inside finetune_run.TokenCounter
        init(self, *args, **kwargs)

    monkeypatch.setattr(GritTrainer, "__init__", record)
    base = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), *COMMON, "--max-steps", "2"]
    assert cli.main([*base, "--output", str(tmp_path / "packed")]) == 0
    assert cli.main([*base, "--output", str(tmp_path / "padded"), "--no-packing"]) == 0
    assert collators == ["PackedCollator", "DynamicPaddingCollator"]
    out = capsys.readouterr().out
    assert out.count("packed batches") == 1 and out.count("padded batches") == 1
    packed, padded = _adapter(tmp_path / "packed"), _adapter(tmp_path / "padded")
    assert packed.keys() == padded.keys() and len(packed) == 14
    for name in packed:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6)


def test_finetune_falls_back_to_padding_where_packing_would_leak(alpaca_file, tmp_path, capsys):
    """OPT does not isolate packed sequences: the default falls back to dynamic padding with a note, and
    an explicit --packing is a one-line error (exit 2)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(**TINY_OPT)
    path = tmp_path / "opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    base = ["finetune", "--model", str(path), "--data", str(alpaca_file), *COMMON, "--max-steps", "1"]
    assert cli.main([*base, "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "does not keep packed sequences apart" in out and "padded batches" in out
    assert cli.main([*base, "--output", str(tmp_path / "out2"), "--packing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert err.startswith("grit-kernels finetune: error: --packing:") and "use --no-packing" in err, err


def test_finetune_chat_bf16_absolute_base_path(tmp_path, monkeypatch, capsys):
    """Chat data through the model's chat template, --bf16 on the CPU, and an adapter directory that
    AutoPeftModelForCausalLM loads from another working directory with the hub switched off."""
    from transformers import AutoModelForCausalLM

    from grit_kernels.models import tiny_llama_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=1)).save_pretrained(tmp_path / "model")
    bpe_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": CONVERSATION}) for _ in range(4)))
    monkeypatch.chdir(tmp_path)
    argv = [
        "finetune",
        "--model",
        "model",
        "--data",
        "chat.jsonl",
        "--output",
        "out",
        "--max-steps",
        "2",
        "--bf16",
    ]
    assert cli.main(argv + COMMON) == 0
    printed = capsys.readouterr().out
    assert "4 chat records" in printed and "bf16" in printed
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "model").resolve())

    from peft import AutoPeftModelForCausalLM

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    saved = _adapter(tmp_path / "out")
    params = dict(loaded.named_parameters())
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        torch.testing.assert_close(params[key].float(), tensor.float())
    assert os.path.isfile(tmp_path / "out" / "tokenizer_config.json")


def test_finetune_report_to_tensorboard_writes_events(model_dir, alpaca_file, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    argv = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), "--output", str(out)]
    assert cli.main(argv + COMMON + ["--max-steps", "2", "--report-to", "tensorboard"]) == 0
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/loss" in tags and "train/grit/damping" in tags, sorted(tags)


def test_finetune_eigen_adamw_with_loraplus(model_dir, alpaca_file, tmp_path, capsys, monkeypatch):
    """--optimizer eigen_adamw --loraplus-ratio 16 reaches the Trainer: EigenAdamW inside, lora_B at 16x --lr."""
    from grit_kernels import trainer as trainer_module

    seen = {}
    original = trainer_module._eigen_adamw_over

    def spy(optimizer, pre, args):
        inner = original(optimizer, pre, args)
        seen["lrs"] = sorted({g["lr"] for g in inner.param_groups})
        seen["kl_clip"] = pre.config.kl_clip
        return inner

    monkeypatch.setattr(trainer_module, "_eigen_adamw_over", spy)
    out = tmp_path / "eigen"
    argv = ["finetune", "--model", str(model_dir), "--data", str(alpaca_file), *COMMON, "--max-steps", "2"]
    argv += ["--optimizer", "eigen_adamw", "--loraplus-ratio", "16", "--output", str(out)]
    assert cli.main(argv) == 0
    assert seen == {"lrs": [1e-3, 16e-3], "kl_clip": None}
    adapter = _adapter(out)
    assert len(adapter) == 14 and all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize(
    "extra, optimizer, kl_clip",
    [([], "eigen_adamw", None), (["--grit-fisher", "diagonal"], "wrap", 0.1), (["--optimizer", "adamw"], "wrap", 0.1),
     (["--grit-kl-clip", "0.3"], "eigen_adamw", 0.3), (["--optimizer", "eigen_adamw"], "eigen_adamw", None)],
)
def test_optimizer_auto_is_eigen_adamw_where_it_runs(extra, optimizer, kl_clip):
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    args = sub.choices["finetune"].parse_args(["--model", "m", "--data", "d", *extra])
    assert finetune.chosen_optimizer(args) == optimizer and finetune.grit_config(args).kl_clip == kl_clip
