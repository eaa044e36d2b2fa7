"""The ``grit-kernels`` command.

::

    grit-kernels bench e2e [options]      end-to-end step time: AdamW-LoRA vs GRIT vs GRIT the prior way
                                          (tiny 224-module Llama on CPU; Llama-3-8B shapes, QLoRA, on CUDA)
    grit-kernels bench kernels [options]  kernel microbenchmarks (bench/bench_kernels.py)
    grit-kernels demo [options]           a short GRIT training run on the tiny model, printing the loss
    grit-kernels finetune --model DIR --data FILE.json [options]
                                          GRIT fine-tuning of a local HF model on Alpaca-format data;
                                          adapters saved in PEFT format

The benchmarks live in the source repository's ``bench/`` directory (not in the wheel); the bench
subcommands load them by path and say so when they are missing. User errors (missing paths,
malformed data records, bad options) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PROG = "grit-kernels"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------- bench
def bench_dir() -> Path | None:
    """The repository's ``bench/`` directory: ``$GRIT_KERNELS_BENCH_DIR``, else next to the package
    (editable / source install), else ``./bench``. ``None`` if none holds the benchmarks."""
    candidates = []
    if os.environ.get("GRIT_KERNELS_BENCH_DIR"):
        candidates.append(Path(os.environ["GRIT_KERNELS_BENCH_DIR"]))
    candidates += [Path(__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for path in candidates:
        if (path / "bench_e2e.py").is_file() or (path / "bench_kernels.py").is_file():
            return path
    return None


def load_bench_module(name: str):
    """Import ``bench/<name>.py`` by file path (bench/ is not a package)."""
    directory = bench_dir()
    path = directory / f"{name}.py" if directory else None
    if path is None or not path.is_file():
        raise CliError(
            f"bench/{name}.py not found (looked in $GRIT_KERNELS_BENCH_DIR, {Path(__file__).resolve().parent.parent / 'bench'}"
            f" and {Path.cwd() / 'bench'}): the benchmarks ship with the source repository, not the wheel; "
            "clone the repository and run `pip install -e .` there, or set GRIT_KERNELS_BENCH_DIR"
        )
    module_name = f"_grit_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def cmd_bench(args: argparse.Namespace) -> int:
    module = load_bench_module(f"bench_{args.target}")
    kwargs = {}
    if "prog" in inspect.signature(module.main).parameters:
        kwargs["prog"] = f"{PROG} bench {args.target}"
    return int(module.main(list(args.args), **kwargs) or 0)


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """GRIT on the tiny Llama with synthetic Alpaca data: the two-line API in a plain loop."""
    import torch
    from tqdm.auto import tqdm

    import grit_kernels as gk
    from grit_kernels import data
    from grit_kernels.models import build_lora_model, tiny_llama_config

    torch.manual_seed(args.seed)
    model = build_lora_model(tiny_llama_config(num_layers=args.layers), r=args.r, seed=args.seed)
    model.train()
    pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=args.grit_warmup_steps))
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), pre)
    tok = data.ByteTokenizer()
    need = args.steps * args.batch_size
    records = data.generate_alpaca_sample(2 * need, seed=args.seed)  # rows whose prompt fills max_length are dropped
    features = data.tokenize_alpaca(records, tok, max_length=args.max_length)[:need]
    collate = data.DynamicPaddingCollator(tok.pad_token_id)
    print(
        f"GRIT demo: tiny Llama, {args.layers} layers, {pre.num_modules} LoRA modules (r={args.r}), "
        f"{args.steps} steps of batch {args.batch_size}, lr {args.lr}, backend {pre.backend}"
    )
    start, first = time.perf_counter(), None
    bar = tqdm(range(args.steps), desc="demo", unit="step")
    for step in bar:
        chunk = features[step * args.batch_size : (step + 1) * args.batch_size]
        if not chunk:
            break
        loss = model(**collate(chunk)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.item()
        first = value if first is None else first
        bar.set_postfix(loss=f"{value:.4f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            bar.write(f"step {step + 1:4d}  loss {value:.4f}")
    print(
        f"loss {first:.4f} -> {value:.4f} in {time.perf_counter() - start:.1f} s "
        f"(GRIT preconditioning active after step {args.grit_warmup_steps})"
    )
    return 0


# --------------------------------------------------------------------------------------------- finetune
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_paths(args: argparse.Namespace) -> None:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise CliError(f"--model {args.model}: no such directory (a local Hugging Face model directory is expected)")
    if not (model_dir / "config.json").is_file():
        raise CliError(f"--model {args.model}: no config.json in this directory (not a Hugging Face model directory)")
    if not Path(args.data).is_file():
        raise CliError(f"--data {args.data}: no such file")


def _load_records(path: str) -> list:
    from grit_kernels import data

    try:
        records = data.load_alpaca_json(path)
    except ValueError as exc:  # names the file and the record
        raise CliError(str(exc)) from None
    if not records:
        raise CliError(f"{path}: no records")
    return records


def _load_tokenizer(model_dir: str, vocab_size: int):
    from grit_kernels import data

    if any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:
            raise CliError(f"--model {model_dir}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    tok = data.ByteTokenizer()
    if vocab_size < tok.vocab_size:
        raise CliError(
            f"--model {model_dir}: no tokenizer files and a vocabulary of {vocab_size} < {tok.vocab_size} "
            "(the byte-level fallback tokenizer needs 260 ids)"
        )
    print(f"note: {model_dir} has no tokenizer; using the byte-level ByteTokenizer (one token per UTF-8 byte)")
    return tok


def _load_model(args: argparse.Namespace):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs = {"dtype": dtype}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model {args.model}: cannot load the model ({type(exc).__name__}: {exc})") from None
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in args.target_modules.split(",") if t in names]
    if not targets:
        raise CliError(f"--target-modules {args.target_modules}: none of these module names is in {args.model}")
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha if args.alpha is not None else 2 * args.r,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), dtype


def cmd_finetune(args: argparse.Namespace) -> int:
    _check_paths(args)
    records = _load_records(args.data)  # malformed data fails before the (slow) model load

    import torch

    from grit_kernels import data
    from grit_kernels.trainer import GritTrainer, GritTrainingArguments

    for name in ("epochs", "lr", "r", "batch_size", "grad_accum", "max_length"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise CliError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CliError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    model, dtype = _load_model(args)
    tokenizer = _load_tokenizer(args.model, model.config.vocab_size)
    features = data.tokenize_alpaca(records, tokenizer, max_length=args.max_length)
    if not features:
        raise CliError(f"{args.data}: no record has a response token left within --max-length {args.max_length}")
    n_val = int(round(len(features) * args.val_fraction))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(features), generator=gen).tolist()
    val = [features[i] for i in order[:n_val]]
    train = [features[i] for i in order[n_val:]]
    collate = (
        data.PackedCollator() if args.packing else data.DynamicPaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    )
    import dataclasses

    known = {f.name for f in dataclasses.fields(GritTrainingArguments)}
    # transformers < 5 has warmup_ratio; 5.x reads a float warmup_steps < 1 as the ratio
    warmup = {"warmup_ratio": args.warmup_ratio} if "warmup_ratio" in known else {"warmup_steps": args.warmup_ratio}
    try:
        targs = GritTrainingArguments(
            output_dir=args.output,
            grit=not args.no_grit,
            grit_update_freq=args.update_freq,
            grit_damping=args.damping,
            grit_warmup_steps=args.grit_warmup_steps,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            **warmup,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            bf16=dtype == torch.bfloat16,
            seed=args.seed,
            max_grad_norm=args.max_grad_norm,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    trainer = GritTrainer(
        model=model, args=targs, train_dataset=train, eval_dataset=val or None, data_collator=collate
    )
    print(
        f"fine-tuning {args.model} on {len(train)} records ({len(val)} held out), "
        f"{'GRIT' if not args.no_grit else 'plain AdamW'}, LoRA r={args.r}{', QLoRA NF4' if args.qlora else ''}"
    )
    result = trainer.train()
    out = Path(args.output)
    model.save_pretrained(out)  # PEFT format: adapter_config.json + adapter_model.safetensors
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    summary = f"train loss {result.training_loss:.4f} over {result.global_step} steps"
    if val:
        summary += f"; held-out loss {trainer.evaluate()['eval_loss']:.4f}"
    print(f"{summary}; adapters saved to {out}")
    return 0


# --------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Rank-space K-FAC (GRIT) natural-gradient LoRA fine-tuning: benchmarks, demo, fine-tuning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,demo,finetune}")
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="benchmarks: `bench e2e` (end-to-end step time) or `bench kernels` (kernel microbenchmarks)",
        description="Run a benchmark from the repository's bench/ directory; options after the target go to it "
        "(e.g. `grit-kernels bench e2e --help`).",
    )
    bench.add_argument("target", choices=("e2e", "kernels"))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="a short GRIT training run on the tiny Llama (CPU-sized), printing the loss")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--layers", type=int, default=32, help="decoder layers (7 LoRA modules each)")
    demo.add_argument("--r", type=int, default=16)
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--max-length", type=int, default=256)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--grit-warmup-steps", type=int, default=5)
    demo.add_argument("--log-every", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    ft = sub.add_parser(
        "finetune",
        help="GRIT fine-tuning of a local HF model directory on an Alpaca-format JSON / JSONL file",
        description="Fine-tune LoRA adapters with GRIT (GritTrainer). The data file holds records "
        '{"instruction", "input" (optional), "output"}; adapters are saved in PEFT format to --output.',
    )
    ft.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face model directory")
    ft.add_argument("--data", required=True, metavar="FILE", help="Alpaca-format .json (array) or .jsonl file")
    ft.add_argument("--output", default="grit-output", metavar="DIR", help="where the adapters go (default grit-output)")
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: epochs)")
    ft.add_argument("--lr", type=float, default=2e-4)
    ft.add_argument("--warmup-ratio", type=float, default=0.03, help="learning-rate warm-up fraction, in [0, 1)")
    ft.add_argument("--r", type=int, default=16, help="LoRA rank")
    ft.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument(
        "--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", help="comma-separated"
    )
    ft.add_argument("--batch-size", type=int, default=4)
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--max-length", type=int, default=1024)
    ft.add_argument("--packing", action="store_true", help="padding-free packing instead of dynamic padding")
    ft.add_argument("--qlora", action="store_true", help="load the base model in 4-bit NF4 (bitsandbytes)")
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction evaluated at the end")
    ft.add_argument("--update-freq", type=int, default=10, help="GRIT: invert the factors every N steps")
    ft.add_argument("--damping", type=float, default=1e-3, help="GRIT: relative damping")
    ft.add_argument("--grit-warmup-steps", type=int, default=10, help="GRIT: steps before preconditioning starts")
    ft.add_argument("--no-grit", action="store_true", help="plain AdamW LoRA (for an A/B run)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0)
    ft.add_argument("--logging-steps", type=int, default=10)
    ft.add_argument("--seed", type=int, default=42)
    ft.set_defaults(func=cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
