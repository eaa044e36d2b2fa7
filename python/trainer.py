"""GRIT with the Hugging Face Trainer: ``GritTrainer`` + ``GritTrainingArguments``.

Every ``TrainingArguments`` option works; ``grit_*`` fields set GRIT's knobs and ``grit=False`` gives
plain AdamW for an A/B run. The model is fused (``gk.fuse``: fused LoRA blocks) by default, with or
without GRIT; ``grit_fuse=False`` (``--no-fuse``) keeps PEFT's layers. Adapters are saved in PEFT format. Runs on CPU with the tiny
224-module Llama (random weights) and synthetic Alpaca data.
Runtime: 15 s wall on our idle 2-core CPU VM (torch's default threads) with GRIT's default optimizer (EigenAdamW); 32 s wall on it with about one other job running (one intra-op
thread); 236 s while ~9 other jobs shared it. ``--quick``: seconds.

    python python/trainer.py [--max-steps 8] [--output runs/trainer-example]
    python python/trainer.py --optimizer wrap    # GRIT-preconditioned AdamW instead of the default EigenAdamW
"""

import argparse

import torch

from grit_kernels import GritTrainer, GritTrainingArguments, data
from grit_kernels.models import build_lora_model, tiny_llama_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--output", default="runs/trainer-example")
    p.add_argument("--no-grit", action="store_true")
    p.add_argument("--optimizer", choices=("eigen_adamw", "wrap"), default="eigen_adamw",
                   help="eigen_adamw (default): gk.EigenAdamW (KL-clip off); wrap: GRIT-preconditioned AdamW")
    p.add_argument("--loraplus-ratio", type=float, default=None, help="LoRA+: lora_B at this multiple of the lr")
    p.add_argument("--no-fuse", action="store_true", help="keep PEFT's LoRA layers (grit_fuse=False)")
    p.add_argument("--quick", action="store_true", help="smoke size: 2 layers, 2 steps (a few seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.max_steps = 2, 2

    torch.manual_seed(0)
    model = build_lora_model(tiny_llama_config(num_layers=args.layers), r=16)
    tok = data.ByteTokenizer()
    # rows whose prompt alone fills max_length are dropped, so split what tokenize_alpaca returns
    features = data.tokenize_alpaca(data.generate_alpaca_sample(160, seed=0), tok, max_length=256)
    train, val = features[:-16], features[-16:]

    targs = GritTrainingArguments(
        output_dir=args.output,
        grit=not args.no_grit,
        grit_fuse=not args.no_fuse,
        grit_warmup_steps=3,
        grit_optimizer=args.optimizer,
        grit_loraplus_ratio=args.loraplus_ratio,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # features are plain dicts
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = GritTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=val,  # no data_collator: GritTrainer packs the batches padding-free
    )
    print(f"model path: {trainer.grit_fusion or 'PEFT LoRA layers'}")
    trainer.train()
    metrics = trainer.evaluate()
    print(f"held-out loss: {metrics['eval_loss']:.4f}")
    model.save_pretrained(args.output)  # adapter_config.json + adapter_model.safetensors
    print(f"adapters saved to {args.output}")
    return metrics


if __name__ == "__main__":
    main()
