"""Packed micro-batches: rows of different lengths concatenated into fixed-size rows, so the GPU computes
real tokens instead of padding.

A packed micro-batch is `batch_size` rows of exactly `seq_len` tokens each. Each such row holds whole
training rows (examples) end to end; its position_ids restart at 0 at every example, and the first label of
every example is masked (-100), so no example predicts the next one's first token. Whatever room is left at
the end of a row is one padding segment (its own positions, labels -100).

No attention_mask is passed: transformers (masking_utils.find_packed_sequence_indices, 5.x) then reads the
example boundaries from the restarts of position_ids and builds a block-diagonal causal mask, so an example
attends only to itself. An attention_mask, even all ones, turns that detection off and lets examples attend
to each other, and so does a KV cache (the model must run with config.use_cache = False, as training does); `PackedCollator` never emits one and `check_packed_batch` refuses a batch that has both.

Rows are assigned to packed rows by first-fit decreasing (deterministic; every example exactly once per
epoch, none split or dropped: examples are truncated to seq_len before packing, as unpacked training does).
The Trainer's sampler shuffles the packed rows each epoch.

The bin packing is pure Python; the collator imports torch inside its call (this module stays on the light
side).
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

IGNORE_INDEX = -100


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into bins whose lengths sum to at most `capacity`.

    Every index appears in exactly one bin. Ties keep the original order (stable sort), so the result is
    deterministic. A length above capacity is a ValueError (truncate first)."""
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the tightest bin that fits is found by bisect
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"row {i} has {n} tokens, more than the packed row length {capacity}: truncate it first")
        if n < 1:
            raise ValueError(f"row {i} is empty")
        k = bisect_left(free, (n, -1))
        if k < len(free):  # best fit: the bin with the least room that still holds the row
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        if room > 0:
            j = bisect_left(free, (room, b))
            free.insert(j, (room, b))
    return bins


@dataclass(frozen=True, slots=True)
class PackingStats:
    rows: int  # examples
    packed_rows: int  # rows of seq_len tokens they fill
    tokens: int  # real tokens
    seq_len: int

    @property
    def fill(self) -> float:
        """Real tokens over computed tokens (1.0: no padding at all)."""
        return self.tokens / (self.packed_rows * self.seq_len) if self.packed_rows else 0.0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "packed_rows": self.packed_rows, "tokens": self.tokens, "seq_len": self.seq_len,
                "fill": round(self.fill, 4)}


def packing_stats(lengths: list[int], seq_len: int) -> PackingStats:
    bins = pack_lengths(lengths, seq_len)
    return PackingStats(rows=len(lengths), packed_rows=len(bins), tokens=sum(lengths), seq_len=seq_len)


def padded_tokens_per_epoch(lengths: list[int], batch_size: int) -> int:
    """Tokens computed when consecutive rows form micro-batches padded to their longest row (no packing;
    rows in the order given)."""
    chunks = (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size))
    return sum(len(c) * max(c) for c in chunks)


class PackedDataset:
    """Map-style dataset of packed rows: item i is the list of examples ({"input_ids", "labels"}) of bin i."""

    def __init__(self, examples: list, seq_len: int):
        self.seq_len = seq_len
        self.examples = examples
        self.bins = pack_lengths([len(e["input_ids"]) if isinstance(e, dict) else len(e) for e in examples], seq_len)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict]:
        out = []
        for j in self.bins[i]:
            e = self.examples[j]
            out.append(e if isinstance(e, dict) else {"input_ids": e.input_ids, "labels": e.labels})
        return out

    def stats(self) -> PackingStats:
        return PackingStats(rows=len(self.examples), packed_rows=len(self.bins),
                            tokens=sum(len(e["input_ids"]) if isinstance(e, dict) else len(e) for e in self.examples),
                            seq_len=self.seq_len)


class PackedCollator:
    """Packed rows -> {"input_ids", "labels", "position_ids"} of shape [len(batch), seq_len]; no attention_mask.

    Counts what it produced: `tokens` (real tokens), `padded_tokens` (computed, padding included), `longest`
    (the longest row, always seq_len: packed shapes are static, which is what the plan assumed)."""

    def __init__(self, pad_id: int, seq_len: int):
        self.pad_id = pad_id
        self.seq_len = seq_len
        self.tokens = 0
        self.padded_tokens = 0
        self.longest = 0
        self.pad_to = None  # the rows are always seq_len long; no per-row padding option
        self.batches: deque = deque()  # (real, computed) tokens of each micro-batch made, oldest first

    def __call__(self, batch: list[list[dict]]) -> dict:
        import torch

        n = self.seq_len
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(batch), n), dtype=torch.long)
        for r, row in enumerate(batch):
            at = 0
            for ex in row:
                k = len(ex["input_ids"])
                if at + k > n:
                    raise ValueError(f"packed row of {at + k} tokens is longer than {n}")
                ids[r, at:at + k] = torch.tensor(ex["input_ids"], dtype=torch.long)
                labels[r, at:at + k] = torch.tensor(ex["labels"], dtype=torch.long)
                labels[r, at] = IGNORE_INDEX  # the previous example must not predict this one's first token
                pos[r, at:at + k] = torch.arange(k)
                at += k
                self.tokens += k
            if at < n:  # the rest of the row: one padding segment of its own
                pos[r, at:] = torch.arange(n - at)
        self.padded_tokens += len(batch) * n
        self.batches.append((sum(len(ex["input_ids"]) for row in batch for ex in row), len(batch) * n))
        self.longest = max(self.longest, n)
        out = {"input_ids": ids, "labels": labels, "position_ids": pos}
        check_packed_batch(out)
        return out


def check_packed_batch(batch: dict) -> None:
    """Refuse a packed batch (position_ids that restart inside a row) that also carries an attention_mask:
    transformers would then ignore the row boundaries and let examples attend to each other."""
    pos = batch.get("position_ids")
    if pos is None or batch.get("attention_mask") is None:
        return
    restarts = bool(((pos[..., 1:] - pos[..., :-1]) != 1).any())
    if restarts:
        raise ValueError("a packed batch must not carry an attention_mask: transformers would let its rows attend "
                         "to each other (pass position_ids only)")


def alpaca_like_lengths(n: int, seed: int = 0, lo: int = 16, hi: int = 800) -> list[int]:
    """Row lengths shaped like Alpaca's under a Llama tokenizer: log-normal, median 114, 99th percentile
    about 538 (sigma 0.667), clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [min(hi, max(lo, int(rng.lognormvariate(4.736, 0.667)))) for _ in range(n)]
