"""``grit-kernels finetune``, the run: training arguments, progress, samples, the summary and ``--merge``.

The flags, checks and loading live in :mod:`grit_kernels.finetune`; this module runs the training:

* **progress**: every ``--logging-steps`` steps one line ``step 10/20  loss 2.3412  412 tokens/s
  1.31 s/step  ETA 0:00:13``; every evaluation ``eval @ step 10: held-out loss 2.1033``;
* **samples** (``--sample-prompt``): the greedy answer before and after training, printed and saved to
  ``OUTPUT/samples.json``;
* **summary**: one line at the end (steps, tokens, time, tokens/s, final held-out loss, where things
  were written), and ``OUTPUT/run_summary.json`` with the numbers (step times included);
* **merge** (``--merge``): the saved adapters are loaded with plain PEFT over a fresh copy of the base
  model, merged (``merge_and_unload``) and written to ``OUTPUT/merged`` (safetensors), under a temporary
  name first.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from . import finetune as ft
from .cli import CliError

MERGED_DIR = "merged"
SAMPLES_FILE = "samples.json"
SUMMARY_FILE = "run_summary.json"


# --------------------------------------------------------------------------------------------- arguments
def training_arguments(args: argparse.Namespace, mode: str, has_eval: bool):
    import dataclasses

    import torch

    from .trainer import GritTrainingArguments

    known = {f.name for f in dataclasses.fields(GritTrainingArguments)}
    extra = {}
    # transformers < 5 has warmup_ratio; 5.x reads a float warmup_steps < 1 as the ratio
    extra.update(
        {"warmup_ratio": args.warmup_ratio} if "warmup_ratio" in known else {"warmup_steps": args.warmup_ratio}
    )
    extra["grit_optimizer"] = ft.chosen_optimizer(args)
    if mode == "bf16" and not torch.cuda.is_available():
        extra["use_cpu"] = True  # CPU autocast; transformers refuses bf16 without a GPU otherwise
    if args.save_steps:
        extra.update(save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit)
    else:
        extra["save_strategy"] = "no"
    if has_eval and args.eval_steps:
        extra.update(eval_strategy="steps", eval_steps=args.eval_steps)
    config = ft.grit_config(args)
    grit_fields = {f"grit_{name}": value for name, value in config.to_dict().items()}
    report_to = [n.strip() for n in args.report_to.split(",")]
    try:
        return GritTrainingArguments(
            output_dir=args.output,
            grit=not args.no_grit,
            grit_fuse=not args.no_fuse,
            **grit_fields,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            logging_steps=args.logging_steps,
            report_to="none" if report_to == ["none"] else report_to,
            remove_unused_columns=False,
            bf16=mode == "bf16",
            fp16=mode == "fp16",
            seed=args.seed,
            max_grad_norm=args.max_grad_norm,
            grit_loraplus_ratio=args.loraplus_ratio,
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=True,  # Progress prints one line per logging step instead
            **extra,
        )
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0]) from None


# --------------------------------------------------------------------------------------------- progress
class TokenCounter:
    """A data collator wrapper counting the real (non-padding) tokens of the batches it makes, on the host
    (no device sync), except while ``paused`` (evaluation batches go through the same collator)."""

    def __init__(self, collate):
        self.collate, self.tokens, self.paused = collate, 0, False

    def __call__(self, features):
        batch = self.collate(features)
        if not self.paused:
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
        return batch


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress(TrainerCallback):
    """Prints training progress (tokens/s, ETA) and held-out losses; records step times (optimizer
    step begin to end: forward, backward, GRIT and the inner step; not evaluation or saving)."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter
        self.step_times: list[float] = []
        self.step_cpu_times: list[float] = []  #: process CPU seconds (all threads) per step: less load-sensitive
        self.eval_losses: list[tuple[int, float]] = []
        self._t0 = self._cpu0 = 0.0
        self._mark_tokens = 0
        self._mark_steps = 0
        self.train_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.counter.paused = False
        self._mark_tokens, self._mark_steps = self.counter.tokens, len(self.step_times)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._t0)
        self.step_cpu_times.append(time.process_time() - self._cpu0)
        self.counter.paused = bool(control.should_evaluate)  # until on_evaluate: held-out batches

    def on_train_end(self, args, state, control, **kwargs):
        self.train_tokens = self.counter.tokens
        self.counter.paused = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        recent = self.step_times[self._mark_steps :]
        seconds = sum(recent)
        tokens = self.counter.tokens - self._mark_tokens
        per_step = statistics.median(self.step_times[1:] or self.step_times)
        left = max(0, state.max_steps - state.global_step) * per_step
        rate = f"{tokens / seconds:,.0f} tokens/s" if seconds > 0 else "- tokens/s"
        print(
            f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  {rate}  "
            f"{per_step:.2f} s/step  ETA {_clock(left)}",
            flush=True,
        )
        self._mark_tokens, self._mark_steps = self.counter.tokens, len(self.step_times)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.counter.paused = False
        if metrics and "eval_loss" in metrics:
            self.eval_losses.append((state.global_step, metrics["eval_loss"]))
            print(f"eval @ step {state.global_step}: held-out loss {metrics['eval_loss']:.4f}", flush=True)


# --------------------------------------------------------------------------------------------- samples
def prompt_ids(tokenizer, prompt: str, data_format: str) -> list[int]:
    """The token ids that ask the model ``prompt`` the way the training data asked: the tokenizer's chat
    template (generation prompt added), else the Alpaca prompt (alpaca data) or the fallback chat headers."""
    from . import data
    from .data.formatting import CHAT_FALLBACK_HEADER
    from .data.tokenizer import encode_text

    if not isinstance(tokenizer, data.ByteTokenizer) and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if data_format == "alpaca":
        text = data.format_alpaca({"instruction": prompt, "output": ""})[0]
    else:
        user = CHAT_FALLBACK_HEADER.format(role="User")
        text = f"{user}{prompt}\n\n{CHAT_FALLBACK_HEADER.format(role='Assistant')}"
    return ([bos] if bos is not None else []) + encode_text(tokenizer, text)


def generate_answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding of ``max_new_tokens`` at most; the new text only."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------- merge
def merge_adapters(base_dir: str, adapter_dir: Path, out: Path, dtype, tokenizer=None) -> Path:
    """Load ``adapter_dir`` with plain PEFT over a fresh ``base_dir`` model, merge, and save the result to
    ``out`` (safetensors; written to a temporary directory, then renamed). Returns ``out``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staging = out.parent / f".incomplete-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


# --------------------------------------------------------------------------------------------- run
def _split(args, features):
    import torch

    n_val = round(len(features) * args.val_fraction)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(args.seed)).tolist()
    val = [features[i] for i in order[:n_val]]
    train = [features[i] for i in order[n_val:]]
    if not train:
        raise CliError(f"--val-fraction {args.val_fraction}: leaves no training rows of {len(features)}")
    return train, val


def _fusion_line(trainer, args) -> str:
    if args.no_fuse:
        return "PEFT's LoRA layers (--no-fuse)"
    report = trainer.grit_fusion
    if report is None:
        return "PEFT's LoRA layers (not fused: see the warning above)"
    if report.fused_modules == 0:
        return f"PEFT's LoRA layers (nothing to fuse: {'; '.join(sorted(set(report.unfused.values())))})"
    return str(report).replace("\n", "\n    ")


def run(args: argparse.Namespace) -> int:
    ft.validate_args(args)
    checkpoint = ft.check_paths(args)
    data_format, records = ft.load_records(args)  # malformed data fails before anything heavy loads
    model_dir = ft.resolve_model(args)
    tokenizer = ft.load_tokenizer(model_dir)

    from . import data

    try:
        features = data.tokenize_records(records, tokenizer, data_format, max_length=args.max_length)
    except ValueError as exc:
        raise CliError(f"--data {args.data}: {exc}") from None
    if not features:
        raise CliError(
            f"--data {args.data}: no record has a response token left within --max-length {args.max_length}"
        )
    train, val = _split(args, features)
    ft.check_target_modules(args)
    mode = ft.precision(args)
    targs = training_arguments(args, mode, has_eval=bool(val))

    from transformers import PrinterCallback

    from .trainer import GritTrainer

    model = ft.load_model(args, mode)
    packing = args.packing
    if packing is not False and not data.packing_isolates(model):
        why = f"{args.model} does not keep packed sequences apart (attention would cross samples)"
        if packing:
            raise CliError(f"--packing: {why}; use --no-packing")
        print(f"note: {why}: using dynamic padding")
        packing = False
    collate = TokenCounter(
        data.PackedCollator()
        if packing is not False
        else data.DynamicPaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    )
    trainer = GritTrainer(
        model=model, args=targs, train_dataset=train, eval_dataset=val or None, data_collator=collate
    )
    trainer.remove_callback(PrinterCallback)  # Progress prints the lines
    progress = Progress(collate)
    trainer.add_callback(progress)
    print(
        f"fine-tuning {args.model} on {len(train)} {data_format} records ({len(val)} held out), "
        f"{'plain AdamW' if args.no_grit else 'GRIT'}, LoRA r={args.r}, "
        f"{'packed' if packing is not False else 'padded'} batches"
        f"{', QLoRA NF4' if args.qlora else ''}, "
        f"{mode}" + (f", resuming from {checkpoint}" if checkpoint else "")
    )
    print(f"model path: {_fusion_line(trainer, args)}", flush=True)

    out = Path(args.output)
    samples = {}
    prompt = None
    if args.sample_prompt is not None:
        prompt = prompt_ids(tokenizer, args.sample_prompt, data_format)
        samples["before"] = generate_answer(model, tokenizer, prompt, args.sample_max_new_tokens)
        print(f"sample before training: {samples['before']!r}", flush=True)

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    model.save_pretrained(out)  # PEFT format: adapter_config.json + adapter_model.safetensors
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    held_out = None
    if val:
        if progress.eval_losses and progress.eval_losses[-1][0] == result.global_step:
            held_out = progress.eval_losses[-1][1]  # evaluated at the last step already
        else:
            held_out = trainer.evaluate()["eval_loss"]
    train_seconds = time.perf_counter() - started
    written = {"adapters": str(out)}
    saved = ft._checkpoints(out)
    if saved:
        written["checkpoints"] = f"{out / 'checkpoint-<step>'} ({len(saved)}, newest {saved[-1].name})"
    if prompt is not None:
        samples["after"] = generate_answer(model, tokenizer, prompt, args.sample_max_new_tokens)
        print(f"sample after training:  {samples['after']!r}", flush=True)
        samples = {"prompt": args.sample_prompt, "max_new_tokens": args.sample_max_new_tokens, **samples}
        (out / SAMPLES_FILE).write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
        written["samples"] = str(out / SAMPLES_FILE)
    if args.merge:
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mode]
        written["merged"] = str(merge_adapters(model_dir, out, out / MERGED_DIR, dtype, tokenizer))
    _summarize(args, progress, result, held_out, train_seconds, written, trainer)
    return 0


def _summarize(args, progress: Progress, result, held_out, train_seconds, written, trainer) -> None:
    steps = len(progress.step_times)
    step_seconds = sum(progress.step_times)
    tokens = progress.train_tokens
    median = statistics.median(progress.step_times[1:] or progress.step_times) if steps else math.nan
    rate = tokens / step_seconds if step_seconds > 0 else math.nan
    line = (
        f"done: {steps} steps (to step {result.global_step}), {tokens:,} tokens, {train_seconds:.1f} s "
        f"({step_seconds:.1f} s in steps, median {median:.3f} s/step), {rate:,.0f} tokens/s"
    )
    if held_out is not None:
        line += f", held-out loss {held_out:.4f}"
    line += "; " + ", ".join(f"{k}: {v}" for k, v in written.items())
    summary = {
        "model": args.model,
        "grit": not args.no_grit,
        "fused": trainer.grit_fusion.summary if trainer.grit_fusion is not None else None,
        "steps": steps,
        "global_step": result.global_step,
        "tokens": tokens,
        "seconds": train_seconds,
        "step_seconds": step_seconds,
        "median_step_s": median,
        "tokens_per_s": rate,
        "step_times_s": progress.step_times,
        "step_cpu_times_s": progress.step_cpu_times,
        "train_loss": result.training_loss,
        "eval_losses": progress.eval_losses,
        "held_out_loss": held_out,
        "written": written,
    }
    Path(args.output, SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(line, flush=True)
