"""The ``grit-kernels`` command.

::

    grit-kernels bench e2e [options]      end-to-end step time: AdamW-LoRA vs GRIT vs GRIT the prior way
                                          (tiny 224-module Llama on CPU; Llama-3-8B shapes, QLoRA, on CUDA)
    grit-kernels bench kernels [options]  kernel microbenchmarks: ours vs torch batched vs the per-module loop
    grit-kernels bench convergence [options]
                                          held-out loss of AdamW-LoRA, LoRA+, SGD vs GRIT on a pretrained
                                          byte Llama (bench/bench_convergence.py, from a checkout)
    grit-kernels demo [options]           a short GRIT training run on the tiny model, printing the loss
    grit-kernels finetune --model DIR|FILE.gguf --data FILE.json [options]
                                          GRIT fine-tuning (fused LoRA blocks by default) of a local HF
                                          model or GGUF file on Alpaca or chat data; adapters (and
                                          --save-steps checkpoints) in PEFT format, --merge for a merged model

``bench e2e`` and ``bench kernels`` ship with the package (:mod:`grit_kernels.bench`) and run from any
directory. ``bench convergence`` is a research benchmark of the source repository's ``bench/`` directory (not
in the wheel): it is loaded by path and, without a checkout, is a one-line error naming the checkout. User
errors (missing paths, malformed data records, bad options) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import GritConfig

PROG = "grit-kernels"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Subcommand parser whose usage errors (unknown option, bad number) are one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------- bench
CHECKOUT_BENCHMARKS = ("convergence",)  #: run from the source repository's bench/ (not in the wheel)


def bench_dir() -> Path | None:
    """The repository's ``bench/`` directory: ``$GRIT_KERNELS_BENCH_DIR``, else next to the package
    (editable / source install), else ``./bench``. ``None`` if none holds the benchmarks."""
    candidates = []
    if os.environ.get("GRIT_KERNELS_BENCH_DIR"):
        candidates.append(Path(os.environ["GRIT_KERNELS_BENCH_DIR"]))
    candidates += [Path(__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for path in candidates:
        if any((path / f"bench_{name}.py").is_file() for name in CHECKOUT_BENCHMARKS):
            return path
    return None


def load_bench_module(name: str):
    """Import ``bench/<name>.py`` by file path (bench/ is not a package)."""
    directory = bench_dir()
    path = directory / f"{name}.py" if directory else None
    if path is None or not path.is_file():
        raise CliError(
            f"bench/{name}.py not found (looked in $GRIT_KERNELS_BENCH_DIR, {Path(__file__).resolve().parent.parent / 'bench'}"
            f" and {Path.cwd() / 'bench'}): this benchmark ships with the source repository's checkout, not the "
            "wheel; clone the repository and run it there (or set GRIT_KERNELS_BENCH_DIR to its bench/)"
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


def bench_module(target: str):
    """The module that runs ``grit-kernels bench <target>``: packaged (:data:`grit_kernels.bench.PACKAGED`),
    else the checkout's ``bench/bench_<target>.py``."""
    from .bench import PACKAGED

    if target in PACKAGED:
        return importlib.import_module(PACKAGED[target])
    return load_bench_module(f"bench_{target}")


def cmd_bench(args: argparse.Namespace) -> int:
    module = bench_module(args.target)
    kwargs = {}
    if "prog" in inspect.signature(module.main).parameters:
        kwargs["prog"] = f"{PROG} bench {args.target}"
    return int(module.main(list(args.args), **kwargs) or 0)


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """GRIT + AdamW next to plain AdamW-LoRA on the tiny Llama with synthetic Alpaca data: the two-line
    API in a plain loop. Both arms start from the same LoRA init and see the same batches, step by step
    (interleaved), so their training losses and step times compare directly."""
    import torch
    from tqdm.auto import tqdm

    import grit_kernels as gk
    from grit_kernels import data
    from grit_kernels.models import build_lora_model, tiny_llama_config

    config = tiny_llama_config(num_layers=args.layers)
    grit_model = build_lora_model(config, r=args.r, seed=args.seed)
    pre = gk.GritPreconditioner(grit_model, gk.GritConfig(warmup_steps=args.grit_warmup_steps))
    arms = {
        "grit": (grit_model, gk.GritOptimizer(torch.optim.AdamW(grit_model.parameters(), lr=args.lr), pre))
    }
    if args.baseline:
        base_model = build_lora_model(config, r=args.r, seed=args.seed)
        arms["adamw"] = (base_model, torch.optim.AdamW(base_model.parameters(), lr=args.lr))
    tok = data.ByteTokenizer()
    need = args.steps * args.batch_size
    records = data.generate_alpaca_sample(
        2 * need, seed=args.seed
    )  # rows whose prompt fills max_length are dropped
    features = data.tokenize_alpaca(records, tok, max_length=args.max_length)[:need]
    collate = data.DynamicPaddingCollator(tok.pad_token_id)
    print(
        f"GRIT demo: tiny Llama, {args.layers} layers, {pre.num_modules} LoRA modules (r={args.r}), "
        f"{args.steps} steps of batch {args.batch_size}, lr {args.lr}, backend {pre.backend}; "
        + ("arms GRIT+AdamW and AdamW-LoRA, interleaved" if args.baseline else "GRIT+AdamW only")
    )
    first, last, seconds = {}, {}, dict.fromkeys(arms, 0.0)
    bar = tqdm(range(args.steps), desc="demo", unit="step")
    for step in bar:
        chunk = features[step * args.batch_size : (step + 1) * args.batch_size]
        if not chunk:
            break
        batch = collate(chunk)
        for name, (model, opt) in arms.items():
            model.train()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            last[name] = loss.item()
            seconds[name] += time.perf_counter() - t0
            first.setdefault(name, last[name])
        bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
        if step % args.log_every == 0 or step == args.steps - 1:
            bar.write(f"step {step + 1:4d}  " + "  ".join(f"{k} loss {v:.4f}" for k, v in last.items()))
    for name in arms:
        print(
            f"{name:5s}: training loss {first[name]:.4f} -> {last[name]:.4f}, {seconds[name]:.1f} s of steps"
        )
    if args.baseline:
        print(
            f"GRIT/AdamW step time {seconds['grit'] / seconds['adamw']:.2f}x; training losses on the same "
            "batches (for held-out quality see `grit-kernels bench convergence`)"
        )
    return 0


# --------------------------------------------------------------------------------------------- finetune
def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune_run import run  # flags, paths and data are checked before anything heavy loads

    return run(args)


# --------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Rank-space K-FAC (GRIT) natural-gradient LoRA fine-tuning: benchmarks, demo, fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="{bench,demo,finetune}", parser_class=OneLineErrorParser
    )
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="benchmarks: `bench e2e` (end-to-end step time), `bench kernels` (kernel microbenchmarks) or "
        "`bench convergence` (held-out loss vs step and wall-clock)",
        description="Run a benchmark (e2e and kernels ship with the package; convergence needs the repository's "
        "checkout); options after the target go to it (e.g. `grit-kernels bench e2e --help`).",
    )
    bench.add_argument("target", choices=("e2e", "kernels", *CHECKOUT_BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser(
        "demo",
        help="GRIT next to AdamW-LoRA on the tiny Llama (CPU-sized), printing both losses",
        description="A short GRIT+AdamW run next to AdamW-LoRA (same init, same batches, interleaved) on the "
        "tiny Llama with synthetic Alpaca data.",
    )
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--layers", type=int, default=8, help="decoder layers (7 LoRA modules each)")
    demo.add_argument("--r", type=int, default=16)
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--max-length", type=int, default=256)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--grit-warmup-steps", type=int, default=GritConfig.warmup_steps)
    demo.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train AdamW-LoRA (default on)",
    )
    demo.add_argument("--log-every", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    ft = sub.add_parser(
        "finetune",
        help="GRIT fine-tuning of a local HF model directory on Alpaca or chat JSON / JSONL data",
        description="Fine-tune LoRA adapters with GRIT (GritTrainer). The data file holds Alpaca records "
        '{"instruction", "input" (optional), "output"} or chat records '
        '{"messages": [{"role", "content"}, ...]}; adapters are saved in PEFT format to --output '
        "(checkpoints with --save-steps, --resume to continue). "
        "Every option is checked before the model loads.",
    )
    from .finetune import add_arguments

    add_arguments(ft)
    ft.set_defaults(func=cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._noise import silence_known_noise

    silence_known_noise()  # two harmless third-party messages (see grit_kernels/_noise.py)
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
