"""``grit-kernels finetune``: GRIT LoRA fine-tuning of a local Hugging Face model with :class:`GritTrainer`.

The order of work is chosen so that a mistake costs seconds, not a model load:

1. every flag is checked (:func:`validate_args`): one-line error naming the flag, exit status 2;
2. paths: ``--model`` (a directory with ``config.json``, or a ``.gguf`` file), ``--data``, ``--output``,
   ``--resume``;
3. the data file is read and validated (Alpaca or chat "messages" records); a ``.gguf`` model is
   dequantized into the cache (once, :func:`grit_kernels.model_files.resolve_model_path`); the tokenizer
   is loaded and the records tokenized (masked labels: only responses / assistant turns are supervised);
4. ``--target-modules`` is checked on a weightless (meta-device) skeleton of the model;
5. only then the model is loaded, wrapped with LoRA, fused (:func:`grit_kernels.fuse`, unless
   ``--no-fuse``) and trained (:mod:`grit_kernels.finetune_run`).

Outputs in ``--output``: the final adapters in PEFT format (``adapter_config.json`` holding the
*absolute* path of the base model, so ``AutoPeftModelForCausalLM.from_pretrained(output)`` works from
any working directory without the hub), the tokenizer when the model has one, and every
``--save-steps N`` steps (default 500; 0: none) a Trainer checkpoint ``checkpoint-<step>/`` (adapters,
inner optimizer, scheduler, RNG state and ``grit_preconditioner.pt``), from which
``--resume DIR|latest`` continues. Checkpoints are written under a temporary name and renamed when
complete (:mod:`grit_kernels.checkpoints`), so a killed run resumes from its last complete one.
With ``--sample-prompt``: ``samples.json``; with ``--merge``: ``merged/`` (the base model with the
adapters merged in, safetensors, loadable by plain transformers); always ``run_summary.json``.
GRIT's knobs are ``--grit-<field>`` flags generated from :class:`~grit_kernels.GritConfig`
(:mod:`grit_kernels.arguments`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from pathlib import Path

from .cli import CliError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: --report-to values and the packages that provide them (any one of them)
REPORT_TO = {
    "none": (),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}


# --------------------------------------------------------------------------------------------- parser
def add_arguments(ft: argparse.ArgumentParser) -> None:
    """The options of ``grit-kernels finetune``."""
    io = ft.add_argument_group("data and outputs")
    io.add_argument(
        "--model",
        required=True,
        metavar="DIR|FILE.gguf",
        help="local Hugging Face model directory, or a .gguf file (dequantized once into the cache, "
        "~/.cache/grit-kernels or $GRIT_KERNELS_CACHE)",
    )
    io.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='.json (array) or .jsonl file of Alpaca records {"instruction", "input", "output"} '
        'or chat records {"messages": [{"role", "content"}, ...]}',
    )
    io.add_argument(
        "--data-format",
        choices=("auto", "alpaca", "chat"),
        default="auto",
        help="record format (default auto: chat if the first record has 'messages'); chat data is rendered "
        "with the tokenizer's chat template when it has one, labels only on assistant turns",
    )
    io.add_argument(
        "--output",
        default="grit-output",
        metavar="DIR",
        help="adapters and checkpoints (default grit-output)",
    )
    io.add_argument(
        "--save-steps",
        type=int,
        default=500,
        metavar="N",
        help="write a checkpoint every N optimizer steps (default 500, as the HF Trainer; 0: none, "
        "only the final adapters)",
    )
    io.add_argument(
        "--save-total-limit", type=int, default=None, metavar="N", help="keep only the N newest checkpoints"
    )
    io.add_argument(
        "--resume",
        default=None,
        metavar="DIR|latest",
        help="continue from a checkpoint directory, or from the newest checkpoint-* in --output",
    )
    io.add_argument(
        "--report-to",
        default="none",
        metavar="NAME[,NAME]",
        help=f"loggers: {', '.join(REPORT_TO)} (default none; tensorboard logs go to OUTPUT/runs)",
    )
    io.add_argument("--logging-steps", type=int, default=10)

    train = ft.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument(
        "--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: epochs)"
    )
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument(
        "--warmup-ratio", type=float, default=0.03, help="learning-rate warm-up fraction, in [0, 1)"
    )
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--max-length", type=int, default=1024)
    train.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="padding-free packing: each micro-batch is one row, sequences isolated by position_ids, "
        "per-token losses equal to the unpadded run (default when the model keeps packed sequences "
        "apart, checked after loading; else dynamic padding); --no-packing: dynamic padding to the "
        "longest row (multiple of 8)",
    )
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    precision = train.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 weights and autocast (default on GPUs that support it; on a CPU: CPU autocast)",
    )
    precision.add_argument(
        "--fp16", action="store_true", help="fp16 weights, autocast and loss scaling (CUDA only)"
    )
    train.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction, in [0, 1)")
    train.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        metavar="N",
        help="evaluate the held-out rows every N steps (needs --val-fraction > 0; default: at the end)",
    )
    train.add_argument("--seed", type=int, default=42)

    lora = ft.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=16, help="LoRA rank")
    lora.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="in [0, 1)")
    lora.add_argument(
        "--target-modules",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated",
    )
    lora.add_argument("--qlora", action="store_true", help="load the base model in 4-bit NF4 (bitsandbytes)")

    grit = ft.add_argument_group(
        "GRIT", "GritConfig's fields as --grit-<field> flags (see grit_kernels.GritConfig for the details)"
    )
    from .arguments import add_config_flags

    add_config_flags(grit)
    grit.add_argument(
        "--optimizer",
        choices=("auto", "eigen_adamw", "adamw"),
        default="auto",
        help="eigen_adamw: grit_kernels.EigenAdamW, Adam in the eigenbasis of GRIT's factors (KL-clip off unless "
        "--grit-kl-clip is given), the best-measured setting (docs/benchmarks.md); adamw: GRIT-preconditioned "
        "AdamW; auto (default): eigen_adamw unless --grit-fisher is not kfac or --grit-reprojection is on",
    )
    grit.add_argument(
        "--loraplus-ratio",
        type=float,
        default=None,
        help="LoRA+: lora_B trains at this multiple of --lr (default: one lr; the convergence runs of docs/benchmarks.md use 16)",
    )
    grit.add_argument("--no-grit", action="store_true", help="plain AdamW LoRA (for an A/B run)")
    grit.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep PEFT's LoRA layers: do not route the decoder blocks through grit_kernels.fuse (the default "
        "fuses wherever it applies, with GRIT or --no-grit, and prints why where it does not)",
    )

    run = ft.add_argument_group("samples and export")
    run.add_argument(
        "--sample-prompt",
        default=None,
        metavar="TEXT",
        help="print (and save to OUTPUT/samples.json) the model's greedy answer to TEXT before and after training",
    )
    run.add_argument("--sample-max-new-tokens", type=int, default=64, metavar="N", help="(default 64)")
    run.add_argument(
        "--merge",
        action="store_true",
        help="also write OUTPUT/merged: the base model with the adapters merged in (safetensors), for "
        "plain transformers",
    )


# --------------------------------------------------------------------------------------------- checks
def _need(ok: bool, flag: str, value, rule: str) -> None:
    if not ok:
        raise CliError(f"{flag} must be {rule}, got {value!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate_args(args: argparse.Namespace) -> None:
    """Every number / choice of ``args``, before any file is read: a :class:`CliError` naming the flag."""
    _need(_finite(args.epochs) and args.epochs > 0, "--epochs", args.epochs, "> 0")
    _need(
        args.max_steps == -1 or args.max_steps >= 1,
        "--max-steps",
        args.max_steps,
        "-1 (use --epochs) or >= 1",
    )
    _need(_finite(args.lr) and args.lr > 0, "--lr", args.lr, "a finite number > 0")
    _need(
        _finite(args.warmup_ratio) and 0 <= args.warmup_ratio < 1,
        "--warmup-ratio",
        args.warmup_ratio,
        "in [0, 1)",
    )
    for flag in ("batch_size", "grad_accum", "r", "logging_steps"):
        value = getattr(args, flag)
        _need(value >= 1, "--" + flag.replace("_", "-"), value, ">= 1")
    _need(args.max_length >= 2, "--max-length", args.max_length, ">= 2")
    _need(
        args.loraplus_ratio is None or (_finite(args.loraplus_ratio) and args.loraplus_ratio > 0),
        "--loraplus-ratio",
        args.loraplus_ratio,
        "a finite number > 0",
    )
    _need(
        args.alpha is None or (_finite(args.alpha) and args.alpha > 0),
        "--alpha",
        args.alpha,
        "a finite number > 0",
    )
    _need(
        _finite(args.lora_dropout) and 0 <= args.lora_dropout < 1,
        "--lora-dropout",
        args.lora_dropout,
        "in [0, 1)",
    )
    targets = args.target_modules.split(",")
    _need(
        all(re.fullmatch(r"[\w.]+", t) for t in targets),
        "--target-modules",
        args.target_modules,
        "comma-separated module names (no spaces or empty names)",
    )
    _need(
        _finite(args.max_grad_norm) and args.max_grad_norm >= 0, "--max-grad-norm", args.max_grad_norm, ">= 0"
    )
    _need(
        _finite(args.val_fraction) and 0 <= args.val_fraction < 1,
        "--val-fraction",
        args.val_fraction,
        "in [0, 1)",
    )
    _need(args.save_steps >= 0, "--save-steps", args.save_steps, ">= 0 (0: no intermediate checkpoints)")
    _need(
        args.save_total_limit is None or args.save_total_limit >= 1,
        "--save-total-limit",
        args.save_total_limit,
        ">= 1",
    )
    _need(args.seed >= 0, "--seed", args.seed, ">= 0")
    if args.eval_steps is not None:
        _need(args.eval_steps >= 1, "--eval-steps", args.eval_steps, ">= 1")
        if args.val_fraction == 0:
            raise CliError("--eval-steps needs held-out rows: give --val-fraction > 0")
    if args.save_total_limit is not None and args.save_steps == 0:
        raise CliError("--save-total-limit needs --save-steps > 0 (there are no checkpoints to limit)")
    _need(args.sample_max_new_tokens >= 1, "--sample-max-new-tokens", args.sample_max_new_tokens, ">= 1")
    if args.sample_prompt is not None and not args.sample_prompt.strip():
        raise CliError("--sample-prompt: empty prompt")
    grit_config(args)
    _check_report_to(args.report_to)
    if args.fp16 or args.qlora:
        import torch

        if args.fp16 and not torch.cuda.is_available():
            raise CliError(
                "--fp16 needs a CUDA GPU (none found); use --bf16 (CPU autocast) or full precision"
            )
        if args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise CliError("--bf16: this GPU does not support bf16; use --fp16")
    if args.qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise CliError("--qlora needs bitsandbytes (pip install 'grit-kernels[qlora]')")


def chosen_optimizer(args: argparse.Namespace) -> str:
    """``"eigen_adamw"`` or ``"wrap"`` (the Trainer's names): ``--optimizer``, with ``auto`` resolved from the
    ``--grit-fisher`` / ``--grit-reprojection`` flags (:func:`grit_kernels.trainer_optimizer.choose_optimizer`)."""
    from .arguments import given_config_values
    from .trainer_optimizer import choose_optimizer

    given = given_config_values(args)
    requested = "wrap" if args.optimizer == "adamw" else args.optimizer
    return choose_optimizer(requested, given.get("fisher", "kfac"), given.get("reprojection", "off"))[0]


def grit_config(args: argparse.Namespace):
    """The :class:`GritConfig` of the ``--grit-*`` flags (EigenAdamW: KL-clip off unless ``--grit-kl-clip`` is
    given); a :class:`CliError` naming the flag."""
    from .arguments import config_from_flags

    overrides = {"kl_clip": None} if chosen_optimizer(args) == "eigen_adamw" else {}
    try:
        config = config_from_flags(args, **overrides)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.optimizer == "eigen_adamw" and not args.no_grit and (config.fisher != "kfac" or config.reprojection != "off"):
        raise CliError(
            f"--optimizer eigen_adamw runs in the eigenbasis of the rank-space factors: it needs "
            f"--grit-fisher kfac and --grit-reprojection off, got {config.fisher}, {config.reprojection}; "
            "add --optimizer adamw to precondition AdamW's gradients instead"
        )
    return config


def _check_report_to(value: str) -> None:
    names = [n.strip() for n in value.split(",")]
    for name in names:
        if name not in REPORT_TO:
            raise CliError(
                f"--report-to {value}: unknown logger {name!r}; choose from {', '.join(REPORT_TO)}"
            )
        packages = REPORT_TO[name]
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise CliError(f"--report-to {name}: {packages[0]} is not installed (pip install {packages[0]})")
    if "none" in names and len(names) > 1:
        raise CliError(f"--report-to {value}: 'none' cannot be combined with other loggers")


def _checkpoints(output: Path) -> list[Path]:
    """``checkpoint-<step>`` directories of a Trainer output directory, oldest first."""
    found = []
    if output.is_dir():
        for path in output.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def check_paths(args: argparse.Namespace) -> Path | None:
    """Check ``--model``, ``--data``, ``--output``, ``--resume``; return the checkpoint to resume from."""
    from .model_files import is_gguf

    model = Path(args.model)
    if model.is_file() and is_gguf(model):
        pass  # converted (once) after the data file is checked: resolve_model
    elif not model.is_dir():
        raise CliError(
            f"--model {args.model}: no such directory or .gguf file (a local Hugging Face model directory or "
            "a .gguf file is expected)"
        )
    elif not (model / "config.json").is_file():
        raise CliError(
            f"--model {args.model}: no config.json in this directory (not a Hugging Face model directory)"
        )
    if not Path(args.data).is_file():
        raise CliError(f"--data {args.data}: no such file")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {args.output}: exists and is not a directory")
    if args.resume is None:
        return None
    if args.resume == "latest":
        found = _checkpoints(output)
        if not found:
            raise CliError(f"--resume latest: no checkpoint-<step> directory in --output {args.output}")
        checkpoint = found[-1]
    else:
        checkpoint = Path(args.resume)
        if not checkpoint.is_dir():
            raise CliError(f"--resume {args.resume}: no such directory")
    if not (checkpoint / "trainer_state.json").is_file():
        raise CliError(
            f"--resume {checkpoint}: not a Trainer checkpoint (no trainer_state.json); "
            "checkpoints are written with --save-steps"
        )
    _check_checkpoint_matches(args, checkpoint)
    return checkpoint


def _check_checkpoint_matches(args: argparse.Namespace, checkpoint: Path) -> None:
    """The LoRA shape of the run must be the checkpoint's (else loading its adapters fails late)."""
    try:
        saved = json.loads((checkpoint / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return
    alpha = args.alpha if args.alpha is not None else 2 * args.r
    for flag, ours, key in (("--r", args.r, "r"), ("--alpha", alpha, "lora_alpha")):
        if key in saved and float(saved[key]) != float(ours):
            raise CliError(
                f"{flag} {ours:g} differs from the checkpoint's {key}={saved[key]} (--resume {checkpoint})"
            )


# --------------------------------------------------------------------------------------------- loading
def resolve_model(args: argparse.Namespace) -> str:
    """``args.model`` as a Hugging Face model directory (a ``.gguf`` file is dequantized into the cache
    once); stored as ``args.model_dir`` (absolute) for the tokenizer, the target-module check and the load."""
    from .model_files import ModelPathError, resolve_model_path

    try:
        args.model_dir = str(resolve_model_path(args.model, log=print))
    except ModelPathError as exc:
        raise CliError(f"--model {exc}") from None
    return args.model_dir


def load_records(args: argparse.Namespace) -> tuple[str, list]:
    from . import data

    try:
        data_format, records = data.load_records(args.data, args.data_format)
    except ValueError as exc:  # names the file and the record
        raise CliError(str(exc)) from None
    if not records:
        raise CliError(f"--data {args.data}: no records")
    return data_format, records


def load_tokenizer(model_dir: str):
    """The model directory's tokenizer (pad = eos if it has none), else the byte-level fallback."""
    from . import data

    if any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001 -- any failure becomes one line naming --model
            raise CliError(
                f"--model {model_dir}: cannot load its tokenizer ({type(exc).__name__}: {exc})"
            ) from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    tok = data.ByteTokenizer()
    try:
        vocab_size = int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError):
        vocab_size = None  # nested configs (VLMs): the model load decides
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise CliError(
            f"--model {model_dir}: no tokenizer files and a vocabulary of {vocab_size} < {tok.vocab_size} "
            "(the byte-level fallback tokenizer needs 260 ids)"
        )
    print(
        f"note: {model_dir} has no tokenizer; using the byte-level ByteTokenizer (one token per UTF-8 byte)"
    )
    return tok


def check_target_modules(args: argparse.Namespace) -> None:
    """``--target-modules`` against the module names of the model's skeleton, built on the meta device
    from ``config.json`` (no weights: 0.2 s for Llama-3-8B shapes once the model code is imported, which
    the load needs anyway). Skipped if that fails."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(args.model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- exotic configs: the model load reports it
        return
    names = {n.split(".")[-1] for n, _ in skeleton.named_modules()}
    if not any(t in names for t in args.target_modules.split(",")):
        linear = sorted(
            {n.split(".")[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise CliError(
            f"--target-modules {args.target_modules}: none of these module names is in {args.model} "
            f"(its linear layers: {','.join(linear[:12])})"
        )


def precision(args: argparse.Namespace) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the flag, else bf16 on a GPU that supports it, else fp32."""
    import torch

    if args.fp16:
        return "fp16"
    if args.bf16:
        return "bf16"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_model(args: argparse.Namespace, mode: str):
    """The base model (by absolute path) wrapped with PEFT LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mode]
    kwargs = {"dtype": dtype}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    base_path = args.model_dir  # absolute; PEFT stores it as base_model_name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
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
        raise CliError(
            f"--target-modules {args.target_modules}: none of these module names is in {args.model}"
        )
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha if args.alpha is not None else 2 * args.r,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(args.seed)  # the LoRA init (lora_A) follows --seed, not the process's RNG history
    model = get_peft_model(model, lora)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_path
    return model
