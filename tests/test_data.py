"""grit_kernels.data: tokenizer, Alpaca formatting and masking, loading errors, padding, packing."""

import json
import statistics

import pytest
import torch

from grit_kernels.data import (
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    ByteTokenizer,
    DynamicPaddingCollator,
    LengthGroupedBatchSampler,
    PackedCollator,
    block_causal_mask,
    format_alpaca,
    generate_alpaca_sample,
    length_grouped_indices,
    load_alpaca_json,
    real_token_fraction,
    tokenize_alpaca,
)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM

    from grit_kernels.models import tiny_llama_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=2)).eval()


def _ce_sum(logits, labels):
    """Sum of next-token cross-entropy over supervised positions of one unpadded row."""
    return torch.nn.functional.cross_entropy(
        logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"
    )


# ------------------------------------------------------------------------------------------ tokenizer
def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    text = "Héllo, wörld! ✓\n"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id == 1 and ids[-1] == tok.eos_token_id == 2
    assert all(4 <= i < 260 for i in ids[1:-1]) and len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")
    assert tok.vocab_size == len(tok) == 260 and tok.pad_token_id == 0
    out = tok(["ab", "c"])
    assert out["input_ids"] == [[1, 101, 102], [1, 103]] and out["attention_mask"] == [[1, 1, 1], [1, 1]]
    assert tok("ab", add_special_tokens=False)["input_ids"] == [101, 102]
    assert ByteTokenizer(offset=10).encode("a") == [107]
    with pytest.raises(ValueError, match="offset"):
        ByteTokenizer(offset=2)


# ------------------------------------------------------------------------------------------ Alpaca
def test_format_alpaca_templates():
    prompt, response = format_alpaca({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert "### Input:\n1 and 2\n\n### Response:\n" in prompt and response == "3"
    prompt, _ = format_alpaca({"instruction": "Say hi.", "output": "hi"})
    assert prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")


def test_tokenize_alpaca_masks_prompt_and_supervises_response_and_eos():
    tok = ByteTokenizer()
    records = [{"instruction": "Say hi.", "input": "", "output": "hi there"}]
    (f,) = tokenize_alpaca(records, tok, max_length=4096)
    prompt, response = format_alpaca(records[0])
    n_prompt = 1 + len(prompt.encode())
    assert f["input_ids"] == [1] + tok.encode(prompt) + tok.encode(response) + [2]
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert f["labels"][n_prompt:] == tok.encode(response) + [2]
    # truncation keeps the prompt and cuts the response; a prompt filling max_length is dropped
    (t,) = tokenize_alpaca(records, tok, max_length=n_prompt + 3)
    assert len(t["input_ids"]) == n_prompt + 3 and t["labels"][n_prompt:] == tok.encode("hi ")
    assert tokenize_alpaca(records, tok, max_length=n_prompt) == []
    (kept,) = tokenize_alpaca(records, tok, max_length=n_prompt, drop_unsupervised=False)
    assert set(kept["labels"]) == {IGNORE_INDEX}


def test_heavily_padded_batch_loss_counts_only_response_tokens(tiny_lm):
    """Padding (including a pad id that is a real byte) and prompt tokens add nothing to the loss."""
    tok = ByteTokenizer()
    records = generate_alpaca_sample(4, seed=3, response_median=6, response_sigma=0.3, instruction_median=5)
    features = tokenize_alpaca(records, tok, max_length=512)
    lengths = [len(f["input_ids"]) for f in features]
    num, den = 0.0, 0
    with torch.no_grad():
        for f in features:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
            num += _ce_sum(tiny_lm(input_ids=ids).logits[0], labels).item()
            den += int((labels[1:] != IGNORE_INDEX).sum())
        expected = num / den
        losses = []
        for pad_id in (0, 100):  # 100 is the id of byte 'a' + offset: padding must still be ignored
            batch = DynamicPaddingCollator(pad_token_id=pad_id, pad_to_multiple_of=512)(features)
            assert batch["input_ids"].shape[1] == 512 and real_token_fraction(batch) < 0.5
            losses.append(tiny_lm(**batch).loss.item())
    assert max(lengths) < 300
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[1] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------ loading
def test_load_alpaca_json_array_and_jsonl(tmp_path):
    recs = [
        {"instruction": "a", "input": "b", "output": "c"},
        {"instruction": "d", "output": "e", "input": None},
    ]
    p = tmp_path / "data.json"
    p.write_text(json.dumps(recs))
    assert load_alpaca_json(p) == [recs[0], {"instruction": "d", "input": "", "output": "e"}]
    q = tmp_path / "data.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_alpaca_json(str(q)) == load_alpaca_json(p)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"record 1: missing field 'output'"),
        ('[{"instruction": 3, "output": "b"}]', r"record 0: field 'instruction' must be a string"),
        ('[{"instruction": "a", "output": "b", "input": [1]}]', r"record 0: field 'input' must be a string"),
        ('["just text"]', r"record 0: expected an object"),
        ('[{"instruction": "a", "output": "b"},', r"invalid JSON"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": ', r"line 2: invalid JSON"),
    ],
)
def test_load_alpaca_json_errors_name_file_record_and_field(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_alpaca_json(p)
    assert str(p) in str(info.value)


def test_load_alpaca_json_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json: cannot read"):
        load_alpaca_json(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------ synthetic data
def test_generate_alpaca_sample_is_deterministic_with_alpaca_gpt4_lengths():
    a = generate_alpaca_sample(1500, seed=7)
    assert a == generate_alpaca_sample(1500, seed=7) and a != generate_alpaca_sample(1500, seed=8)
    tok = ByteTokenizer()
    resp = sorted(len(tok.encode(r["output"])) for r in a)
    assert 150 <= statistics.median(resp) <= 210
    assert 700 <= resp[int(0.99 * len(resp))] <= 1024 and resp[-1] <= 1024
    with_input = sum(bool(r["input"]) for r in a) / len(a)
    assert 0.35 <= with_input <= 0.45
    words = generate_alpaca_sample(200, seed=1, unit="words")
    assert 150 <= statistics.median(len(r["output"].split()) for r in words) <= 210
    with pytest.raises(ValueError, match="unit"):
        generate_alpaca_sample(1, unit="tokens")


# ------------------------------------------------------------------------------------------ collators
def test_dynamic_padding_collator_shapes_and_sides():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}]
    b = DynamicPaddingCollator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert real_token_fraction(b) == pytest.approx(4 / 6)
    b8 = DynamicPaddingCollator(pad_token_id=0, pad_to_multiple_of=8, padding_side="left")(feats)
    assert (
        b8["input_ids"].shape == (2, 8) and b8["input_ids"][1, -1] == 8 and b8["attention_mask"][1].sum() == 1
    )
    with pytest.raises(ValueError, match="row 0 has 3 input_ids but 2 labels"):
        DynamicPaddingCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_packed_collator_layout():
    b = PackedCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # token 7 does not learn to predict 8
    assert "attention_mask" not in b and b["use_cache"] is False
    assert real_token_fraction(b) == 1.0


def test_block_causal_mask():
    m = block_causal_mask(torch.tensor([[0, 1, 0, 1, 2]]))
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_isolates_sequences(impl, tiny_lm):
    """A packed row gives the same logits and loss as the sequences run one by one."""
    tiny_lm.config._attn_implementation = impl
    try:
        g = torch.Generator().manual_seed(0)
        feats = []
        for n in (9, 4, 13):
            ids = torch.randint(4, 260, (n,), generator=g).tolist()
            feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
        with torch.no_grad():
            separate = [tiny_lm(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in feats]
            for collator in (PackedCollator(), PackedCollator(return_attention_mask_4d=True)):
                batch = collator(feats)
                out = tiny_lm(**batch)
                torch.testing.assert_close(out.logits[0], torch.cat(separate), rtol=1e-5, atol=1e-5)
                num = sum(_ce_sum(s, torch.tensor(f["labels"])) for s, f in zip(separate, feats))
                den = sum(sum(x != IGNORE_INDEX for x in f["labels"][1:]) for f in feats)
                assert out.loss.item() == pytest.approx((num / den).item(), rel=1e-5)
    finally:
        tiny_lm.config._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------------------ length grouping
def test_length_grouped_indices_reduce_padding_and_are_deterministic():
    lengths = [len(r["output"]) for r in generate_alpaca_sample(400, seed=2)]
    order = length_grouped_indices(lengths, batch_size=8, seed=0)
    assert sorted(order) == list(range(400)) and order == length_grouped_indices(lengths, 8, seed=0)
    assert max(lengths[i] for i in order[:8]) == max(lengths)

    def padded(o):
        return sum(8 * max(lengths[i] for i in o[k : k + 8]) for k in range(0, len(o), 8))

    random_order = list(range(400))
    assert padded(order) < 0.7 * padded(random_order)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50 and [i for b in batches for i in b] == order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert len(LengthGroupedBatchSampler(lengths[:13], 4, drop_last=True)) == 3
