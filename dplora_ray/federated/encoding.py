"""Tokenised data shared by all workers (one flat int32 array + offsets per split).

Prompts are ``template_head + text + template_tail``; the text is truncated so the
template's tail (which ends right before the label word or the answer) always survives.
Batches are right-padded; the classifier reads the hidden state at the last real token.

Sequence tasks (multiple choice, generation) store, per sequence, where its prompt ends
(``prompt_lens``): the tokens after it are the target, scored by the causal-LM
log-likelihood. A multiple-choice example is ``choices`` consecutive sequences (the same
prompt followed by each choice). Token budgets (``model.max_length`` per sequence): the
prompt's text keeps at most half of it, the target gets the rest (generation answers end
with the end-of-sequence token when it fits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["EncodedData", "EncodedSplit", "encode_choices", "encode_generation", "encode_split",
           "label_token_ids"]


@dataclass(frozen=True)
class EncodedSplit:
    """Attributes:
        ids: int32, all sequences concatenated.
        offsets: int64, one more than the number of sequences.
        labels: int64 per example (classification: the label; multiple choice: the index
            of the right choice; generation: 0).
        prompt_lens: per sequence, the tokens of its prompt (sequence tasks; None for
            classification); the rest of the sequence is the target.
        choices: sequences per example (multiple choice), else 1.
    """

    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    prompt_lens: np.ndarray | None = None
    choices: int = 1

    def __len__(self) -> int:
        return len(self.labels)

    def sequence_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def lengths(self) -> np.ndarray:
        """Per example: its (longest) sequence's length."""
        lens = self.sequence_lengths()
        if self.choices > 1:
            return lens.reshape(-1, self.choices).max(axis=1)
        return lens

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The sequence rows of the examples in ``index`` (``choices`` per example,
        consecutive)."""
        index = np.asarray(index, dtype=np.int64)
        if self.choices == 1:
            return index
        return (index[:, None] * self.choices + np.arange(self.choices)).reshape(-1)

    def batch(self, index: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded batch of the examples in ``index`` (may be empty); a
        multiple-choice example gives ``choices`` consecutive rows. Sequence tasks add
        ``target_mask`` (1 on the target tokens)."""
        index = np.asarray(index, dtype=np.int64)
        seq = self.rows(index)
        lens = self.offsets[seq + 1] - self.offsets[seq]
        width = int(lens.max()) if len(seq) else 1
        ids = np.full((len(seq), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(seq), width), dtype=np.int64)
        for row, (i, n) in enumerate(zip(seq, lens)):
            start = self.offsets[i]
            ids[row, :n] = self.ids[start:start + n]
            mask[row, :n] = 1
        out = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "last_index": torch.from_numpy(np.maximum(lens - 1, 0).astype(np.int64)),
            "labels": torch.from_numpy(self.labels[index].astype(np.int64)),
        }
        if self.prompt_lens is not None:
            pos = np.arange(width)[None, :]
            target = (pos >= self.prompt_lens[seq][:, None]) & (pos < lens[:, None])
            out["target_mask"] = torch.from_numpy(target.astype(np.int64))
        return out

    def prompt_batch(self, index: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """Left-padded prompts (without targets) of the examples in ``index``, for
        generation."""
        assert self.prompt_lens is not None and self.choices == 1
        index = np.asarray(index, dtype=np.int64)
        plens = self.prompt_lens[index]
        width = int(plens.max()) if len(index) else 1
        ids = np.full((len(index), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        for row, (i, n) in enumerate(zip(index, plens)):
            start = self.offsets[i]
            ids[row, width - n:] = self.ids[start:start + n]
            mask[row, width - n:] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def target_ids(self, i: int) -> np.ndarray:
        """The target tokens of sequence ``i``."""
        assert self.prompt_lens is not None
        return self.ids[self.offsets[i] + self.prompt_lens[i]:self.offsets[i + 1]]


@dataclass(frozen=True)
class EncodedData:
    """Everything a worker needs about the data; no raw text."""

    train: EncodedSplit
    test: EncodedSplit
    label_token_ids: tuple[int, ...]
    pad_id: int
    num_labels: int
    task_type: str = "classification"
    eos_id: int | None = None


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


def encode_split(tokenizer, template: str, texts: Sequence[str],
                 labels: Sequence[int] | np.ndarray,
                 max_length: int) -> EncodedSplit:
    """Classification: one prompt per example, at most ``max_length`` tokens."""
    return _pack(_prompts(tokenizer, template, texts, max_length), None, labels, 1)


def _prompts(tokenizer, template: str, texts: Sequence[str], budget: int) -> list[list[int]]:
    """Prompt token ids of at most ``budget`` tokens: the text part is cut so the
    template's head and tail (and a BOS token, when the tokenizer adds one) survive."""
    head, tail = template.split("{text}", 1)
    head_ids = tokenizer.encode(head, add_special_tokens=False) if head else []
    tail_ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    bos = [tokenizer.bos_token_id] if (getattr(tokenizer, "add_bos_token", False)
                                       and tokenizer.bos_token_id is not None) else []
    room = max(1, budget - len(head_ids) - len(tail_ids) - len(bos))
    body = tokenizer([str(t).strip() for t in texts], add_special_tokens=False)["input_ids"]
    return [bos + head_ids + b[:room] + tail_ids for b in body]


def _pack(seqs: list[list[int]], prompt_lens: list[int] | None,
          labels: Sequence[int] | np.ndarray,
          choices: int) -> EncodedSplit:
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(lens.sum()))
    return EncodedSplit(ids=flat, offsets=offsets, labels=np.asarray(labels, dtype=np.int64),
                        prompt_lens=(None if prompt_lens is None
                                     else np.asarray(prompt_lens, dtype=np.int64)),
                        choices=choices)


def encode_choices(tokenizer, template: str, texts: Sequence[str],
                   choices: Sequence[Sequence[str]], labels: Sequence[int], num_choices: int,
                   max_length: int, prefix: str = " ") -> EncodedSplit:
    """Multiple choice: per example ``num_choices`` sequences, prompt + prefix + choice;
    each choice keeps at least one token."""
    prompts = _prompts(tokenizer, template, texts, max_length // 2)
    seqs, plens = [], []
    flat_choices: list[str] = []
    for i, ch in enumerate(choices):
        ch = list(ch)
        if len(ch) != num_choices:
            raise ValueError(f"example {i} has {len(ch)} choices, the task {num_choices}")
        flat_choices.extend(prefix + str(c).strip() for c in ch)
    enc = tokenizer(flat_choices, add_special_tokens=False)["input_ids"]
    for i, p in enumerate(prompts):
        room = max(1, max_length - len(p))
        for k in range(num_choices):
            target = enc[i * num_choices + k][:room] or [tokenizer.eos_token_id]
            seqs.append(p + target)
            plens.append(len(p))
    return _pack(seqs, plens, labels, num_choices)


def encode_generation(tokenizer, template: str, texts: Sequence[str], answers: Sequence[str],
                      max_length: int, prefix: str = " ") -> EncodedSplit:
    """Generation: prompt + prefix + answer (+ end-of-sequence when it fits); the answer
    keeps at least one token."""
    prompts = _prompts(tokenizer, template, texts, max_length // 2)
    enc = tokenizer([prefix + str(a).strip() for a in answers],
                    add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    seqs, plens = [], []
    for p, a in zip(prompts, enc):
        room = max(1, max_length - len(p))
        target = a + ([eos] if eos is not None else [])
        seqs.append(p + (target[:room] or [eos]))
        plens.append(len(p))
    return _pack(seqs, plens, np.zeros(len(prompts), dtype=np.int64), 1)
