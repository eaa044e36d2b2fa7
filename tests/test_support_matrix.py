"""The support matrix of docs/support.md, one test per row: tiny models built from configs (random
weights, no downloads), a couple of GRIT steps, a finite loss, every supported LoRA module
preconditioned (statistics captured, inverse refreshed, gradients equal to the reference
preconditioning with that module's inverses), unsupported LoRA layers skipped with a warning."""

import warnings

import pytest
import torch

import grit_kernels as gk
from grit_kernels import reference
from grit_kernels.bank import BACKWARD, FORWARD
from grit_kernels.layers import is_lora_layer

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
}
GRIT = {"warmup_steps": 0, "update_freq": 1, "kl_clip": None, "graft": False}  # exact: vs the reference


def _config(arch):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, num_key_value_heads=2), LLAMA_LIKE
    if arch == "mistral":
        return tf.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=16), LLAMA_LIKE
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY, num_key_value_heads=2), LLAMA_LIKE
    if arch == "gemma2":
        return tf.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=8, sliding_window=16), LLAMA_LIKE
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**TINY, num_key_value_heads=2, head_dim=8, sliding_window=16), LLAMA_LIKE
    if arch == "phi3":
        return tf.Phi3Config(**TINY, num_key_value_heads=2, pad_token_id=0), [
            "qkv_proj",
            "o_proj",
            "gate_up_proj",
            "down_proj",
        ]
    if arch == "gpt2":  # Conv1D base layers (PEFT LoRA with fan_in_fan_out=True)
        cfg = tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return cfg, ["c_attn", "c_proj", "c_fc"]  # c_proj: in attention and in the MLP
    if arch == "opt":
        cfg = tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
        return cfg, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    raise ValueError(arch)


def _peft(model, targets, **kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    )


def _lora_layers(model):
    return [name for name, module in model.named_modules() if is_lora_layer(module)]


def grit_steps(model, batches, pre=None, steps=2):
    """``steps`` GRIT steps; the last one is checked module by module against reference.precondition."""
    pre = pre or gk.GritPreconditioner(model, gk.GritConfig(**GRIT))
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        inner.zero_grad()
        pre.discard_step()
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        losses.append(loss.item())
        raw_a = [m.lora_A.grad.detach().clone() for m in pre.modules]
        raw_b = [m.lora_B.grad.detach().clone() for m in pre.modules]
        pre.step()
        if step == steps - 1:
            assert bool(pre.bank.initialized.all()), "a module captured no statistics"
            inv_d, inv_h = pre.bank.inverse[BACKWARD], pre.bank.inverse[FORWARD]
            want_a, want_b, _ = reference.precondition(raw_a, raw_b, inv_d, inv_h)
            for i, m in enumerate(pre.modules):
                r = m.lora_A.shape[0]
                eye = torch.eye(r)
                assert not torch.allclose(inv_d[i, :r, :r], eye) and not torch.allclose(
                    inv_h[i, :r, :r], eye
                ), m.name
                for got, want in ((m.lora_A.grad, want_a[i]), (m.lora_B.grad, want_b[i])):
                    want = want.double()
                    assert (got.double() - want).norm() <= 1e-5 * want.norm(), (
                        m.name
                    )  # fp32 vs the fp64 oracle
        inner.step()
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return pre, losses


def _token_batches(vocab=128, seq=12):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, vocab, (2, seq), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


# --------------------------------------------------------------------------------------------- tested
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt2", "opt"])
def test_decoder_architecture(arch):
    from transformers import AutoModelForCausalLM

    config, targets = _config(arch)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2 Conv1D: PEFT sets it itself
        model = _peft(AutoModelForCausalLM.from_config(config), targets)
    layers = _lora_layers(model)
    assert len(layers) == 2 * (len(targets) + (arch == "gpt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing may be skipped
        pre, _ = grit_steps(model, _token_batches())
    assert [m.name for m in pre.modules] == layers and not pre.skipped


def test_llava_with_vision_tower_lora():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token = 127
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    text = LlamaConfig(**TINY, num_key_value_heads=2)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    targets = LLAMA_LIKE + ["out_proj", "fc1", "fc2"]  # CLIP: q/k/v_proj, out_proj, fc1, fc2
    model = _peft(LlavaForConditionalGeneration(config), targets)
    layers = _lora_layers(model)
    vision_layers = [n for n in layers if "vision_tower" in n]
    assert len(vision_layers) == 2 * 6 and len(layers) == 2 * 6 + 2 * 7
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 120, (2, 14), generator=gen)
        ids[:, 1:5] = image_token  # (28 / 14)^2 = 4 patch tokens per image, CLS dropped
        labels = ids.clone()
        labels[:, :5] = -100
        pixels = torch.randn(2, 3, 28, 28, generator=gen)
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "pixel_values": pixels,
                "labels": labels,
            }
        )
    pre, _ = grit_steps(model, batches)
    assert [m.name for m in pre.modules] == layers and not pre.skipped


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantized_base(bits):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    config, targets = _config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, torch.nn.Linear):
                if bits == 4:
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=False,
                        quant_type="nf4",
                        compute_dtype=torch.float32,
                    )
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data.clone(), requires_grad=False, quant_type="nf4"
                    )
                else:
                    q = bnb.nn.Linear8bitLt(
                        child.in_features,
                        child.out_features,
                        bias=False,
                        has_fp16_weights=False,
                        threshold=0.0,
                    )
                    q.weight = bnb.nn.Int8Params(
                        child.weight.data.clone(), requires_grad=False, has_fp16_weights=False
                    )
                setattr(module, name, q.to("cpu"))  # moving to a device quantizes
    setattr(model, f"is_loaded_in_{bits}bit", True)  # what PEFT reads to pick its bitsandbytes LoRA layer
    model = _peft(model, targets)
    kinds = {type(m).__name__ for m in model.modules() if is_lora_layer(m)}
    assert kinds == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    pre, _ = grit_steps(model, _token_batches())
    assert pre.num_modules == len(_lora_layers(model)) == 14 and not pre.skipped


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_finetune import CONVERSATION, bpe_tokenizer
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    config, targets = _config("llama")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = _peft(AutoModelForCausalLM.from_config(config), targets)
    dataset = datasets.Dataset.from_list([{"messages": CONVERSATION}] * 4)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        fp16=False,
        max_length=64,
        dataloader_pin_memory=False,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    gk.enable_grit(trainer)  # the default: EigenAdamW over SFTTrainer's parameter groups
    trainer.train()
    pre = trainer.grit_preconditioner
    assert pre.step_count == 2 and pre.num_modules == len(_lora_layers(model)) == 14
    assert bool(pre.bank.initialized.all()) and type(trainer.grit_optimizer.optimizer).__name__ == "EigenAdamW"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert [e["grit/preconditioning_active"] for e in trainer.state.log_history if "loss" in e] == [1, 1]


# ------------------------------------------------------------------------------- skipped with a warning
class ConvNet(torch.nn.Module):
    """A Conv2d and a Linear, both LoRA targets."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, pixels, labels):
        logits = self.head(torch.tanh(self.conv(pixels)).flatten(1))
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits, labels)})()


def test_conv2d_lora_is_skipped_with_a_warning():
    torch.manual_seed(0)
    model = _peft(ConvNet(), ["conv", "head"])
    with pytest.warns(
        UserWarning, match=r"1 LoRA layer\(s\) unpreconditioned:\n  .*conv: Conv2d LoRA is not supported"
    ):
        pre = gk.GritPreconditioner(model, gk.GritConfig(**GRIT))
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixels": torch.randn(4, 3, 8, 8, generator=gen),
        "labels": torch.randint(0, 5, (4,), generator=gen),
    }
    pre, _ = grit_steps(model, [batch], pre=pre)
    assert [m.name.split(".")[-1] for m in pre.modules] == ["head"]


def test_embedding_lora_is_skipped_with_a_warning():
    from transformers import AutoModelForCausalLM

    config, _ = _config("llama")
    torch.manual_seed(0)
    model = _peft(AutoModelForCausalLM.from_config(config), ["q_proj", "v_proj", "embed_tokens"])
    with pytest.warns(UserWarning, match="embed_tokens: Embedding LoRA is not supported"):
        pre = gk.GritPreconditioner(model, gk.GritConfig(**GRIT))
    assert len(pre.skipped) == 1
    pre, _ = grit_steps(model, _token_batches(), pre=pre)
    assert pre.num_modules == 4


def test_dora_layers_are_skipped_with_a_warning_and_all_dora_is_refused():
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    config, _ = _config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # PEFT: "Already found a peft_config attribute" (intended: two injections)
        inject_adapter_in_model(
            LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), model
        )
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False), model)
    with pytest.warns(UserWarning, match=r"q_proj: DoRA / LoRA variants are not supported"):
        pre = gk.GritPreconditioner(model, gk.GritConfig(**GRIT))
    assert len(pre.skipped) == 2 and all(n.endswith("v_proj") for n in (m.name for m in pre.modules))
    pre, _ = grit_steps(model, _token_batches(), pre=pre)

    dora = _peft(AutoModelForCausalLM.from_config(config), ["q_proj"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="none of the model's 2 LoRA layer.*DoRA"):
            gk.GritPreconditioner(dora)
