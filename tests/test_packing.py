"""Packed micro-batches: the bin packing covers every row once, and a packed micro-batch trains exactly
like the same rows run one by one (transformers' packed-sequence mask through sdpa, on the CPU, with the tiny
Llama in fp32 and in real bitsandbytes NF4 + LoRA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PackedDataset,
    alpaca_like_lengths,
    check_packed_batch,
    pack_lengths,
    packing_stats,
    padded_tokens_per_epoch,
)
from planner.profiles import load_model
from planner.train import stack


@given(st.lists(st.integers(1, 64), min_size=1, max_size=200), st.integers(64, 256))
@settings(max_examples=60, deadline=None)
def test_every_row_lands_in_exactly_one_bin_within_capacity(lengths, capacity):
    bins = pack_lengths(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # best fit never leaves two bins at most half full (the later one's first row would have fit the earlier one),
    # so the bins hold more than half a capacity on average, one bin aside
    assert len(bins) <= 2 * sum(lengths) / capacity + 1
    # and rows above half a capacity can not share a bin: at least one bin each
    assert len(bins) >= sum(1 for n in lengths if 2 * n > capacity)


def test_a_row_longer_than_the_packed_row_is_refused():
    with pytest.raises(ValueError, match="truncate"):
        pack_lengths([10, 300], 256)


def test_packing_removes_most_padding_of_alpaca_like_lengths():
    lengths = alpaca_like_lengths(3000)
    stats = packing_stats(lengths, 1024)
    padded = padded_tokens_per_epoch(lengths, 4)
    assert stats.fill > 0.97  # nearly no padding computed
    assert sum(lengths) / padded < 0.7  # padding to the longest of 4 rows wastes more than 30%


def _tiny(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    cfg = stack.hf_config(_fields())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    # as in training (stack.load_4bit): with a KV cache transformers skips the packed-sequence detection
    model.config.use_cache = False
    return model


def _fields() -> dict:
    import tomllib

    from planner.profiles import PROFILES_DIR

    with (PROFILES_DIR / "models" / "tiny-llama.toml").open("rb") as fh:
        return tomllib.load(fh)["config"]


def _examples(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(3, 512, (k,), generator=g).tolist()
        labels = list(ids)
        labels[:2] = [IGNORE_INDEX, IGNORE_INDEX]  # a masked prompt, as alpaca rows have
        out.append({"input_ids": ids, "labels": labels})
    return out


def _one_by_one_loss(model, examples) -> float:
    """Token-weighted mean over the rows run alone (what the Trainer's loss over a batch means)."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / count


def test_packed_loss_equals_the_rows_run_one_by_one():
    model = _tiny()
    examples = _examples()
    ds = PackedDataset(examples, seq_len=96)
    batch = PackedCollator(pad_id=0, seq_len=96)([ds[i] for i in range(len(ds))])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = float(model(**batch).loss)
        alone = _one_by_one_loss(model, examples)
    assert packed == pytest.approx(alone, rel=1e-5)


def test_an_attention_mask_would_cross_attend_and_is_refused():
    model = _tiny()
    examples = _examples()
    ds = PackedDataset(examples, seq_len=96)
    batch = PackedCollator(pad_id=0, seq_len=96)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        alone = _one_by_one_loss(model, examples)
        crossed = float(model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss)
    assert crossed != pytest.approx(alone, rel=1e-3)  # what transformers does with a mask: rows see each other
    with pytest.raises(ValueError, match="attention_mask"):
        check_packed_batch({**batch, "attention_mask": torch.ones_like(batch["input_ids"])})


def test_collator_counts_real_and_computed_tokens_and_masks_boundaries():
    examples = _examples()
    ds = PackedDataset(examples, seq_len=96)
    col = PackedCollator(pad_id=0, seq_len=96)
    batch = col([ds[i] for i in range(len(ds))])
    assert col.tokens == sum(len(e["input_ids"]) for e in examples)
    assert col.padded_tokens == len(ds) * 96
    starts = (batch["position_ids"] == 0).nonzero().tolist()
    for r, c in starts:  # every segment's first label is masked
        assert int(batch["labels"][r, c]) == IGNORE_INDEX


def test_packed_loss_and_gradients_match_with_a_real_4bit_lora_model(tmp_path):
    """The path qfit run trains: from_pretrained in NF4 (bitsandbytes on the CPU), k-bit preparation, LoRA."""
    from peft import get_peft_model

    from planner.specs import LoraSettings

    model = _tiny(torch.float32)
    model.save_pretrained(tmp_path / "m")
    base = stack.load_4bit(str(tmp_path / "m"), "bf16", True)
    names = tuple(lin.name for lin in load_model("tiny-llama").layer_linears)
    peft_model = get_peft_model(base, stack.lora_config(LoraSettings(rank=4, alpha=8, dropout=0.0), names))
    for n, p in peft_model.named_parameters():  # non-zero B so LoRA changes the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    examples = _examples(n=4, seed=3)
    ds = PackedDataset(examples, seq_len=80)
    batch = PackedCollator(pad_id=0, seq_len=80)([ds[i] for i in range(len(ds))])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = peft_model(**batch).loss
        alone = _one_by_one_loss(peft_model, examples)
    assert float(packed) == pytest.approx(alone, rel=2e-2)  # bf16 autocast: the two paths round differently
    packed.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for n, p in peft_model.named_parameters() if "lora_" in n)
