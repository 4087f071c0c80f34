"""Tokenised data shared by all workers (one flat int32 array + offsets per split).

Prompts are ``template_head + text + template_tail``; the text is truncated so the
template's tail (which ends right before the label word) always survives. Batches are
right-padded; the classifier reads the hidden state at the last real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["EncodedData", "EncodedSplit", "encode_split", "label_token_ids"]


@dataclass(frozen=True)
class EncodedSplit:
    ids: np.ndarray  # int32, all prompts concatenated
    offsets: np.ndarray  # int64, len n + 1
    labels: np.ndarray  # int64 label index per example

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, index: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded batch of the examples in ``index`` (may be empty)."""
        index = np.asarray(index, dtype=np.int64)
        lens = self.offsets[index + 1] - self.offsets[index]
        width = int(lens.max()) if len(index) else 1
        ids = np.full((len(index), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        for row, (i, n) in enumerate(zip(index, lens)):
            start = self.offsets[i]
            ids[row, :n] = self.ids[start:start + n]
            mask[row, :n] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "last_index": torch.from_numpy(np.maximum(lens - 1, 0).astype(np.int64)),
            "labels": torch.from_numpy(self.labels[index].astype(np.int64)),
        }


@dataclass(frozen=True)
class EncodedData:
    """Everything a worker needs about the data; no raw text."""

    train: EncodedSplit
    test: EncodedSplit
    label_token_ids: tuple[int, ...]
    pad_id: int
    num_labels: int


def label_token_ids(tokenizer, label_words: Sequence[str]) -> tuple[int, ...]:
    """First token of each label word; they must be distinct to be scored in one pass."""
    from dplora_ray.errors import DataError

    ids = []
    for word in label_words:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if not toks:
            raise DataError("data.task", word, "label word encodes to no token")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise DataError("data.task", list(label_words),
                        "label words share their first token in this tokenizer")
    return tuple(ids)


def encode_split(tokenizer, template: str, texts: Sequence[str], labels: Sequence[int],
                 max_length: int) -> EncodedSplit:
    head, tail = template.split("{text}", 1)
    head_ids = tokenizer.encode(head, add_special_tokens=False) if head else []
    tail_ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    bos = [tokenizer.bos_token_id] if (getattr(tokenizer, "add_bos_token", False)
                                       and tokenizer.bos_token_id is not None) else []
    budget = max(1, max_length - len(head_ids) - len(tail_ids) - len(bos))
    body = tokenizer([str(t).strip() for t in texts], add_special_tokens=False)["input_ids"]
    seqs = [bos + head_ids + b[:budget] + tail_ids for b in body]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(lens.sum()))
    return EncodedSplit(ids=flat, offsets=offsets, labels=np.asarray(labels, dtype=np.int64))
