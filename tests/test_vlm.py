"""create_vlm_grit_adapter on tiny LLaVA, Idefics3 and Qwen2-VL (built from configs, no downloads):
modality groups with their own rank, alpha, damping and update frequency."""

import copy
import dataclasses

import pytest
import torch
import transformers

import grit_kernels as gk
from grit_kernels.vlm import ModalityGroup, VLMGritConfig, create_vlm_grit_adapter, modality_group

TEXT = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IMAGE_TOKEN = 255


def _need(*names):
    missing = [n for n in names if getattr(transformers, n, None) is None]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {', '.join(missing)}")
    return [getattr(transformers, n) for n in names]


VISION = {  # one 16x16 image = (16 / 8)^2 = 4 patch features
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 8,
}


def tiny_llava():
    Config, Vision, Text, Model = _need(
        "LlavaConfig", "CLIPVisionConfig", "LlamaConfig", "LlavaForConditionalGeneration"
    )
    vision = Vision(**VISION)
    # vision_feature_layer=-1: with one vision layer the default (-2) would skip it
    model = Model(
        Config(
            vision_config=vision,
            text_config=Text(**TEXT),
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-1,
        )
    )
    ids = torch.randint(0, 250, (2, 12))
    ids[:, 1:5] = IMAGE_TOKEN  # (16 / 8)^2 = 4 patch features per image
    return model, dict(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), labels=ids), (6, 2, 7)


def tiny_idefics3():
    Config, Vision, Text, Model = _need(
        "Idefics3Config", "Idefics3VisionConfig", "LlamaConfig", "Idefics3ForConditionalGeneration"
    )
    vision = Vision(**VISION)
    model = Model(
        Config(vision_config=vision, text_config=Text(**TEXT), image_token_id=IMAGE_TOKEN, scale_factor=2)
    )
    ids = torch.randint(0, 250, (2, 12))
    ids[:, 2] = IMAGE_TOKEN  # 4 patches, pixel shuffle by 2 -> 1 token per image
    return model, dict(input_ids=ids, pixel_values=torch.randn(2, 1, 3, 16, 16), labels=ids), (6, 1, 7)


def tiny_qwen2_vl():
    (Model,) = _need("Qwen2VLForConditionalGeneration")
    config = transformers.Qwen2VLConfig(
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=dict(
            **TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=0, eos_token_id=1
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=254,
        vision_start_token_id=253,
    )
    model = Model(config)
    ids = torch.randint(0, 250, (2, 12))
    ids[:, 1] = 253
    ids[:, 2:6] = IMAGE_TOKEN  # grid 1 x 4 x 4 patches merged 2 x 2 -> 4 tokens per image
    batch = dict(
        input_ids=ids,
        pixel_values=torch.randn(32, 3 * 2 * 4 * 4),
        image_grid_thw=torch.tensor([[1, 4, 4]] * 2),
        mm_token_type_ids=(ids == IMAGE_TOKEN).long(),
        labels=ids,
    )
    return model, batch, (4, 2, 7)


BUILDERS = {"llava": tiny_llava, "idefics3": tiny_idefics3, "qwen2_vl": tiny_qwen2_vl}


def group_config(**grit):
    return VLMGritConfig(
        vision=ModalityGroup(r=2, lora_alpha=8, damping=1e-2, update_freq=3),
        projector=ModalityGroup(r=4, damping=1e-1, update_freq=2),
        language=ModalityGroup(r=8, lora_alpha=4),
        grit=gk.GritConfig(warmup_steps=0, update_freq=10, **grit),
    )


STEPS = 7


def standalone_refreshes(config):
    """Inversions a plain GritPreconditioner with ``config`` runs in ``STEPS`` steps (tiny model)."""
    from helpers import two_layer_lora

    model = two_layer_lora()
    pre = gk.GritPreconditioner(model, dataclasses.replace(config, target_modules=None))
    for _ in range(STEPS):
        model(torch.randn(4, 7)).square().mean().backward()
        pre.step()
        model.zero_grad()
    return pre.bank.refresh_count


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_modality_groups_have_their_own_rank_alpha_damping_and_update_freq(arch):
    torch.manual_seed(0)
    model, batch, counts = BUILDERS[arch]()
    peft_model, pre = create_vlm_grit_adapter(model, group_config())
    assert tuple(len(pre.group_modules[g]) for g in ("vision", "projector", "language")) == counts
    expected = {
        "vision": (2, 8 / 2, 1e-2, 3),
        "projector": (4, 8 / 4, 1e-1, 2),
        "language": (8, 4 / 8, 1e-3, 10),
    }
    for group, sub in pre.groups.items():
        r, scaling, damping, update_freq = expected[group]
        assert (sub.config.damping, sub.config.update_freq) == (damping, update_freq)
        for m in sub.modules:
            assert modality_group(m.name) == group
            assert m.lora_A.shape[0] == r and m.layer.scaling["default"] == pytest.approx(scaling)
    opt = gk.GritOptimizer(torch.optim.AdamW(peft_model.parameters(), lr=1e-3), pre)
    for _ in range(STEPS):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    for group, sub in pre.groups.items():
        # each group inverts on its own schedule: as a stand-alone preconditioner with its config would
        assert sub.bank.refresh_count == standalone_refreshes(sub.config), group
        assert bool(sub.bank.initialized.all()), f"{group}: every module received statistics"
    counts = {g: sub.bank.refresh_count for g, sub in pre.groups.items()}
    assert len(set(counts.values())) > 1, counts
    assert pre.step_count == STEPS


def test_per_group_statistics_are_logged():
    from grit_kernels.trainer import grit_log_metrics

    torch.manual_seed(0)
    model, batch, _ = tiny_llava()
    peft_model, pre = create_vlm_grit_adapter(model, group_config())
    opt = gk.GritOptimizer(torch.optim.AdamW(peft_model.parameters(), lr=1e-3), pre)
    peft_model(**batch).loss.backward()
    opt.step()
    logs = grit_log_metrics(pre, opt)
    for group in ("vision", "projector", "language"):
        for key in ("damping", "condition_max", "trace_forward", "trace_backward"):
            assert f"grit/{group}/{key}" in logs
    assert logs["grit/vision/damping"] != logs["grit/language/damping"]


def test_vlm_adapter_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model, batch, _ = tiny_llava()
    fresh = copy.deepcopy(model)
    peft_model, pre = create_vlm_grit_adapter(model, group_config())
    for p in pre.parameters():  # non-zero B so the adapter changes the output
        torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref, out = peft_model(**batch).logits, loaded(**batch).logits
    assert (out - ref).norm() / ref.norm() < 1e-6


def test_state_dict_and_bad_config():
    torch.manual_seed(0)
    model, _, _ = tiny_llava()
    _, pre = create_vlm_grit_adapter(model, group_config())
    state = pre.state_dict()
    pre.load_state_dict(state)
    with pytest.raises(ValueError):
        pre.load_state_dict({"groups": {"vision": state["groups"]["vision"]}})
    with pytest.raises(ValueError):
        ModalityGroup(r=0)
    with pytest.raises(TypeError):
        create_vlm_grit_adapter(model, gk.GritConfig())


def test_compress_adapter_follows_every_group():
    torch.manual_seed(0)
    model, batch, _ = tiny_llava()
    peft_model, pre = create_vlm_grit_adapter(model, group_config())
    opt = gk.GritOptimizer(torch.optim.AdamW(peft_model.parameters(), lr=1e-2), pre)
    for _ in range(2):
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    ranks = gk.compress_adapter(peft_model, pre, energy=0.9)
    for sub in pre.groups.values():
        assert sub.bank.module_ranks == [m.lora_A.shape[0] for m in sub.modules]
        assert all(ranks[m.name.removeprefix("base_model.model.")] == m.lora_A.shape[0] for m in sub.modules)
    opt = gk.GritOptimizer(torch.optim.AdamW(peft_model.parameters(), lr=1e-2), pre)
    peft_model(**batch).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in pre.parameters())


def test_grouped_preconditioner_is_composed_behind_the_interface():
    """Every member of the Preconditioner contract is GroupedGritPreconditioner's own (composition, not
    inheritance from GritPreconditioner)."""
    from grit_kernels.bank import FORWARD
    from grit_kernels.interface import Preconditioner
    from grit_kernels.vlm import GroupedGritPreconditioner

    assert not GroupedGritPreconditioner.__abstractmethods__
    assert not issubclass(GroupedGritPreconditioner, gk.GritPreconditioner)
    assert issubclass(gk.GritPreconditioner, Preconditioner)
    contract = [n for n in vars(Preconditioner) if not n.startswith("_")] + list(
        Preconditioner.__annotations__
    )
    own = set(vars(GroupedGritPreconditioner))
    assert set(contract) - {"group_summaries"} <= own | {"config", "groups"}

    torch.manual_seed(0)
    model, batch, _ = tiny_llava()
    peft_model, pre = create_vlm_grit_adapter(model, group_config())
    peft_model.train()
    with torch.no_grad():  # non-zero B: rows carry gradient, so every group gets statistics
        for m in pre.modules:
            m.lora_B.normal_(0.0, 0.1)
    assert isinstance(pre, Preconditioner) and pre.config is not None
    assert pre.num_modules == len(pre.modules) == sum(p.num_modules for p in pre.groups.values())
    assert pre.preconditioning_active is False
    peft_model(**batch).loss.backward()
    pre.update_factors()  # the factor-only step folds every group's statistics
    assert pre.step_count == 1 and all(p.step_count == 1 for p in pre.groups.values())
    assert all(p.bank.factor[FORWARD].abs().sum() > 0 for p in pre.groups.values())
    peft_model.zero_grad()
    peft_model(**batch).loss.backward()
    pre.step()
    assert pre.preconditioning_active is True
    with pytest.raises(TypeError, match="EigenAdamW needs a GritPreconditioner"):
        gk.EigenAdamW(peft_model.parameters(), pre)
    pre.remove()
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()
