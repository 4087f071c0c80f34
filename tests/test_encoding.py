"""Encoding: prompt = head + truncated text + tail, right-padded batches, label token ids.

Most tests use a character-level fake tokenizer (one token per character, id = ord), so
expected ids are computed by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from dplora_ray.errors import DataError
from dplora_ray.federated.encoding import encode_split, label_token_ids

PAD = 0


class CharTokenizer:
    """One token per character (id = ord(char)); optional BOS."""

    def __init__(self, bos: int | None = None) -> None:
        self.bos_token_id = bos
        self.add_bos_token = bos is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [ord(c) for c in text]

    def __call__(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}


class TableTokenizer:
    """Encodes whole strings through a fixed table (for label words)."""

    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.table[text])


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


# --------------------------------------------------------------------------- encode_split
def test_encode_split_truncates_text_and_keeps_template_tail() -> None:
    # Prepare: head "T:" (2) + tail "|A:" (3) leave 10 - 5 = 5 tokens of text
    template = "T:{text}|A:"

    # Execute
    split = encode_split(CharTokenizer(), template, ["hi", "hello world"], [2, 0], max_length=10)

    # Assert
    assert len(split) == 2
    assert split.offsets.tolist() == [0, 7, 17]
    assert split.lengths().tolist() == [7, 10]
    assert split.ids.dtype == np.int32
    assert split.ids.tolist() == ids("T:hi|A:") + ids("T:hello|A:")
    assert split.labels.tolist() == [2, 0]


def test_encode_split_prepends_bos_within_the_budget() -> None:
    # Execute: BOS takes one of the 10 tokens -> 4 tokens of text
    split = encode_split(CharTokenizer(bos=1), "T:{text}|A:", ["hello world"], [1], max_length=10)

    # Assert
    assert split.ids.tolist() == [1] + ids("T:hell|A:")


def test_batch_is_right_padded_with_mask_and_last_index() -> None:
    # Prepare
    split = encode_split(
        CharTokenizer(), "T:{text}|A:", ["hi", "hello world", "x"], [2, 0, 1], max_length=10
    )

    # Execute: examples in the order 1, 2 (lengths 10, 6)
    batch = split.batch(np.array([1, 2]), pad_id=PAD)

    # Assert
    assert batch["input_ids"].tolist() == [
        ids("T:hello|A:"),
        ids("T:x|A:") + [PAD] * 4,
    ]
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 6 + [0] * 4]
    assert batch["last_index"].tolist() == [9, 5]
    assert batch["labels"].tolist() == [0, 1]
    rows = torch.arange(2)
    assert batch["input_ids"][rows, batch["last_index"]].tolist() == [ord(":")] * 2
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_batch_of_nothing_has_zero_rows() -> None:
    # Prepare
    split = encode_split(CharTokenizer(), "{text}:", ["ab"], [0], max_length=8)

    # Execute
    batch = split.batch(np.array([], dtype=np.int64), pad_id=PAD)

    # Assert
    assert batch["input_ids"].shape == (0, 1)
    assert batch["attention_mask"].shape == (0, 1)
    assert batch["last_index"].shape == (0,)
    assert batch["labels"].shape == (0,)


def test_tiny_tokenizer_keeps_the_task_tail_of_a_long_text() -> None:
    from transformers import AutoTokenizer

    from dplora_ray.config import ModelConfig
    from dplora_ray.data import get_task
    from dplora_ray.models import prepare_model

    # Prepare
    tok = AutoTokenizer.from_pretrained(prepare_model(ModelConfig(name="tiny-llama")))
    task = get_task("sentiment3")
    head, tail = task.prompt_template.split("{text}")
    tail_ids = tok.encode(tail, add_special_tokens=False)
    long_text = " ".join(["this movie was really very good"] * 60)

    # Execute
    split = encode_split(tok, task.prompt_template, [long_text, "good"], [2, 2], max_length=48)
    batch = split.batch(np.array([0, 1]), pad_id=int(tok.pad_token_id))

    # Assert
    n_long, n_short = split.lengths().tolist()
    assert n_long == 48
    assert n_short < 48
    for row, n in enumerate((n_long, n_short)):
        seq = batch["input_ids"][row, :n].tolist()
        assert seq[-len(tail_ids) :] == tail_ids
        assert int(batch["last_index"][row]) == n - 1
        assert batch["attention_mask"][row].sum() == n


# --------------------------------------------------------------------------- label ids
def test_label_token_ids_are_first_tokens() -> None:
    # Prepare
    tok = TableTokenizer({" negative": [10, 11], " neutral": [12], " positive": [13, 11]})

    # Execute
    out = label_token_ids(tok, [" negative", " neutral", " positive"])

    # Assert
    assert out == (10, 12, 13)


def test_label_words_sharing_a_first_token_are_rejected() -> None:
    # Prepare: " no" and " not" both start with token 5
    tok = TableTokenizer({" yes": [4], " no": [5], " not": [5, 6]})

    # Execute
    with pytest.raises(DataError) as info:
        label_token_ids(tok, [" yes", " no", " not"])

    # Assert
    assert info.value.key == "data.task"
    assert "share their first token" in str(info.value)
    assert "' not'" in str(info.value)


def test_label_word_without_tokens_is_rejected() -> None:
    with pytest.raises(DataError, match="encodes to no token"):
        label_token_ids(TableTokenizer({" yes": [4], "": []}), [" yes", ""])


def test_tiny_tokenizer_label_words_are_distinct() -> None:
    from transformers import AutoTokenizer

    from dplora_ray.config import ModelConfig
    from dplora_ray.data import TASKS
    from dplora_ray.models import prepare_model

    # Prepare
    tok: Any = AutoTokenizer.from_pretrained(prepare_model(ModelConfig(name="tiny-llama")))

    # Execute / Assert
    for task in TASKS.values():
        out = label_token_ids(tok, task.label_words)
        assert len(set(out)) == len(task.label_words)
