"""Readers of the DP-LoRA paper's data sets (see :mod:`dplora_ray.data.recipes`).

For each recipe a local reader (``<recipe>_local(folder or file, cfg)``: the project's
offline copies) and a hub reader (``<recipe>_hub(hub id, cfg)``: ``datasets``, imported
on use), each returning the recipe's clean frame with a ``split`` column; plus the
recipes' label sets, ``fpb``'s agreement levels (:data:`FPB_SUBSETS`) and ``medquad``'s
test rule. Malformed data raises :class:`~dplora_ray.errors.DataError` naming
``data.path``.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.sources import SPLIT_TEST, SPLIT_TRAIN, cache_dir
from dplora_ray.errors import DataError
from dplora_ray.fileio import one_line

__all__ = [
    "FPB_DEFAULT_SUBSET",
    "FPB_SUBSETS",
    "MEDQUAD_TEST_MODULUS",
    "fpb_hub",
    "fpb_local",
    "fpb_subset",
    "medquad_hub",
    "medquad_local",
    "piqa_hub",
    "piqa_local",
    "pubmedqa_hub",
    "pubmedqa_local",
    "tfns_hub",
    "tfns_local",
]

#: data.subset -> (file of the release, configuration on the hub)
FPB_SUBSETS: dict[str, tuple[str, str]] = {
    "50agree": ("Sentences_50Agree.txt", "sentences_50agree"),
    "66agree": ("Sentences_66Agree.txt", "sentences_66agree"),
    "75agree": ("Sentences_75Agree.txt", "sentences_75agree"),
    "allagree": ("Sentences_AllAgree.txt", "sentences_allagree"),
}
FPB_DEFAULT_SUBSET = "50agree"
_FPB_LABELS = ("negative", "neutral", "positive")  # also the hub's ids 0, 1, 2
_TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}  # bearish, bullish, neutral
_PUBMEDQA_LABELS = ("yes", "no", "maybe")
MEDQUAD_TEST_MODULUS = 10  # documents with crc32(source/doc_id) % 10 == 0 are test


# ----------------------------------------------------------------------- helpers


def _frame(columns: dict[str, Iterable[Any]]) -> pd.DataFrame:
    return pd.DataFrame({k: list(v) for k, v in columns.items()})


def _classification(
    texts: Iterable[str], labels: Iterable[str], groups: Iterable[str], splits: Iterable[str]
) -> pd.DataFrame:
    return _frame({"text": texts, "label": labels, "group": groups, "split": splits})


def _where(cfg: DataConfig) -> tuple[str, Any]:
    return ("data.path", cfg.path)


def _read_text(path: Path, cfg: DataConfig, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(*_where(cfg), f"cannot read {path.name} ({one_line(exc)})") from None


def _load_hub(
    hub_id: str, cfg: DataConfig, name: str | None = None, revision: str | None = None
) -> Any:
    """``datasets.load_dataset(hub_id, name, revision)`` (all splits, a DatasetDict)."""
    import datasets

    try:
        return datasets.load_dataset(
            hub_id, name=name, revision=revision, cache_dir=str(cache_dir(cfg) / "datasets")
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, format: all data errors
        raise DataError(
            *_where(cfg),
            f"recipe {cfg.recipe!r}: {hub_id!r} could not be loaded "
            f"from the Hugging Face hub ({one_line(exc)})",
        ) from exc


def _hub_columns(split: Any, need: Iterable[str], hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    frame = split.to_pandas()
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise DataError(
            *_where(cfg),
            f"{hub_id!r} lacks the column(s) {', '.join(missing)} "
            f"(has {', '.join(map(str, frame.columns))})",
        )
    return frame


# --------------------------------------------------------------------------- fpb


def fpb_subset(cfg: DataConfig) -> str:
    subset = FPB_DEFAULT_SUBSET if cfg.subset is None else cfg.subset.strip().lower()
    if subset not in FPB_SUBSETS:
        raise DataError(
            "data.subset",
            cfg.subset,
            f"recipe 'fpb' has the agreement levels {', '.join(FPB_SUBSETS)}",
        )
    return subset


def _fpb_rows(sentences: list[str], labels: list[str]) -> pd.DataFrame:
    frame = _classification(sentences, labels, [""] * len(sentences), [""] * len(sentences))
    return frame.drop_duplicates(subset=["text", "label"], keep="first").reset_index(drop=True)


def fpb_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    """``sentence@label`` lines, ISO-8859-1, CRLF; the label after the last ``@``."""
    file = path if path.is_file() else path / FPB_SUBSETS[fpb_subset(cfg)][0]
    if cfg.subset is not None and file.name != FPB_SUBSETS[fpb_subset(cfg)][0]:
        raise DataError(
            "data.subset",
            cfg.subset,
            f"contradicts data.path={cfg.path!r} "
            f"(a {file.name}); name the folder instead, or drop data.subset",
        )
    sentences: list[str] = []
    labels: list[str] = []
    for lineno, line in enumerate(_read_text(file, cfg, "latin-1").splitlines(), 1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        label = label.strip().lower()
        if not sep or label not in _FPB_LABELS or not sentence.strip():
            raise DataError(
                *_where(cfg),
                f"{file.name} line {lineno} is not 'sentence@label' "
                f"with a label in {', '.join(_FPB_LABELS)}",
            )
        sentences.append(sentence.strip())
        labels.append(label)
    if not sentences:
        raise DataError(*_where(cfg), f"{file.name} is empty (no rows)")
    return _fpb_rows(sentences, labels)


def fpb_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    # the hub copy is a loading script, which datasets>=4 no longer runs; its automatic
    # Parquet export (one config per agreement level, one `train` split) loads instead
    loaded = _load_hub(
        hub_id, cfg, name=FPB_SUBSETS[fpb_subset(cfg)][1], revision="refs/convert/parquet"
    )
    frame = pd.concat(
        [_hub_columns(s, ("sentence", "label"), hub_id, cfg) for s in loaded.values()],
        ignore_index=True,
    )
    labels = [_FPB_LABELS[int(v)] for v in frame["label"]]  # ClassLabel ids 0 neg, 1 neu, 2 pos
    return _fpb_rows([str(s).strip() for s in frame["sentence"]], labels)


# -------------------------------------------------------------------------- tfns


def _tfns_label(value: Any, cfg: DataConfig, where: str) -> str:
    try:
        return _TFNS_LABELS[int(value)]
    except (KeyError, TypeError, ValueError):
        raise DataError(
            *_where(cfg), f"{where}: label {value!r} is not 0 (bearish), 1 (bullish) or 2 (neutral)"
        ) from None


def tfns_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    texts: list[str] = []
    labels: list[str] = []
    splits: list[str] = []
    for name, split in (("sent_train.csv", SPLIT_TRAIN), ("sent_valid.csv", SPLIT_TEST)):
        # newline="": quoted tweets hold line breaks of their own (CRLF ends the rows)
        reader = csv.DictReader(io.StringIO(_read_text(path / name, cfg), newline=""))
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(*_where(cfg), f"{name} needs the header 'text,label'")
        for row in reader:
            texts.append((row["text"] or "").strip())
            labels.append(_tfns_label(row["label"], cfg, f"{name} line {reader.line_num}"))
            splits.append(split)
    return _classification(texts, labels, [""] * len(texts), splits)


def tfns_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    loaded = _load_hub(hub_id, cfg)
    parts = []
    for split_name, split in (("train", SPLIT_TRAIN), ("validation", SPLIT_TEST)):
        if split_name not in loaded:
            raise DataError(*_where(cfg), f"{hub_id!r} has no {split_name!r} split")
        frame = _hub_columns(loaded[split_name], ("text", "label"), hub_id, cfg)
        parts.append(
            _classification(
                frame["text"].astype(str).str.strip(),
                [_tfns_label(v, cfg, f"{hub_id} {split_name}") for v in frame["label"]],
                [""] * len(frame),
                [split] * len(frame),
            )
        )
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------- pubmedqa


def _pubmedqa_text(question: str, contexts: Iterable[Any]) -> str:
    context = " ".join(str(c).strip() for c in contexts)
    return f"{str(question).strip()}\nContext: {context}"


def _pubmedqa_label(value: Any, cfg: DataConfig, pmid: Any) -> str:
    label = str(value).strip().lower()
    if label not in _PUBMEDQA_LABELS:
        raise DataError(
            *_where(cfg), f"PMID {pmid}: final_decision {value!r} is not yes, no or maybe"
        )
    return label


def pubmedqa_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    def load(name: str) -> Any:
        try:
            return json.loads(_read_text(path / name, cfg))
        except json.JSONDecodeError as exc:
            raise DataError(
                *_where(cfg), f"{name} is not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None

    records = load("ori_pqal.json")
    if not isinstance(records, dict) or not records:
        raise DataError(*_where(cfg), "ori_pqal.json must be a non-empty object keyed by PMID")
    truth = load("test_ground_truth.json") if (path / "test_ground_truth.json").is_file() else None
    texts, labels, splits = [], [], []
    for pmid, rec in records.items():
        try:
            text = _pubmedqa_text(rec["QUESTION"], rec["CONTEXTS"])
            label = _pubmedqa_label(rec["final_decision"], cfg, pmid)
        except (KeyError, TypeError):
            raise DataError(
                *_where(cfg),
                f"ori_pqal.json: PMID {pmid} lacks QUESTION, CONTEXTS or final_decision",
            ) from None
        texts.append(text)
        labels.append(label)
        splits.append("" if truth is None else SPLIT_TEST if pmid in truth else SPLIT_TRAIN)
    if truth is not None:
        missing = sorted(set(truth) - set(records))
        if missing:
            raise DataError(
                *_where(cfg),
                f"test_ground_truth.json names {len(missing)} PMID(s) "
                f"not in ori_pqal.json, e.g. {missing[0]}",
            )
        wrong = [
            p
            for p, lab in truth.items()
            if str(lab).lower() != str(records[p]["final_decision"]).lower()
        ]
        if wrong:
            raise DataError(
                *_where(cfg),
                f"test_ground_truth.json disagrees with "
                f"final_decision for {len(wrong)} PMID(s), e.g. {wrong[0]}",
            )
    return _classification(texts, labels, [""] * len(texts), splits)


def pubmedqa_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    loaded = _load_hub(hub_id, cfg, name="pqa_labeled")
    frame = pd.concat(
        [
            _hub_columns(s, ("pubid", "question", "context", "final_decision"), hub_id, cfg)
            for s in loaded.values()
        ],
        ignore_index=True,
    )
    texts = [
        _pubmedqa_text(q, ctx["contexts"]) for q, ctx in zip(frame["question"], frame["context"])
    ]
    labels = [_pubmedqa_label(v, cfg, p) for v, p in zip(frame["final_decision"], frame["pubid"])]
    # the hub has the 1000 questions as one split: no official test marker
    return _classification(texts, labels, [""] * len(texts), [""] * len(texts))


# ----------------------------------------------------------------------- medquad


def _medquad_split(source: str, doc_id: str) -> str:
    key = f"{source}/{doc_id}".encode()
    return SPLIT_TEST if zlib.crc32(key) % MEDQUAD_TEST_MODULUS == 0 else SPLIT_TRAIN


def _medquad_frame(
    questions: list[str],
    answers: list[str],
    qtypes: list[str],
    sources: list[str],
    doc_ids: list[str],
) -> pd.DataFrame:
    keep = [i for i, a in enumerate(answers) if a.strip() and questions[i].strip()]
    return _frame(
        {
            "question": [questions[i].strip() for i in keep],
            "answer": [answers[i].strip() for i in keep],
            "qtype": [qtypes[i] for i in keep],
            "group": [sources[i] for i in keep],
            "split": [_medquad_split(sources[i], doc_ids[i]) for i in keep],
        }
    )


def medquad_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    name = "medquad_answered.jsonl"
    cols: dict[str, list[str]] = {
        k: [] for k in ("question", "answer", "qtype", "source", "doc_id")
    }
    for lineno, line in enumerate(_read_text(path / name, cfg).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            for k in cols:
                cols[k].append("" if rec[k] is None else str(rec[k]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                *_where(cfg), f"{name} line {lineno} is not a JSON object with {', '.join(cols)}"
            ) from None
    return _medquad_frame(
        cols["question"], cols["answer"], cols["qtype"], cols["source"], cols["doc_id"]
    )


def medquad_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    need = ("question", "answer", "question_type", "document_source", "document_id")
    loaded = _load_hub(hub_id, cfg)
    frame = pd.concat(
        [_hub_columns(s, need, hub_id, cfg) for s in loaded.values()], ignore_index=True
    )

    def text(col: str) -> list[str]:
        return [
            "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
            for v in frame[col]
        ]

    # answers of three MedlinePlus subsets were removed upstream (copyright): dropped here
    return _medquad_frame(
        text("question"),
        text("answer"),
        text("question_type"),
        text("document_source"),
        text("document_id"),
    )


# -------------------------------------------------------------------------- piqa


def _piqa_part(path: Path, cfg: DataConfig, data: str, labels: str, split: str) -> pd.DataFrame:
    rows = [ln for ln in _read_text(path / data, cfg).splitlines() if ln.strip()]
    marks = [ln.strip() for ln in _read_text(path / labels, cfg).splitlines() if ln.strip()]
    if len(rows) != len(marks):
        raise DataError(
            *_where(cfg), f"{data} has {len(rows)} items but {labels} {len(marks)} labels"
        )
    cols: dict[str, list[Any]] = {"goal": [], "sol1": [], "sol2": [], "label": []}
    for lineno, (row, mark) in enumerate(zip(rows, marks), 1):
        try:
            rec = json.loads(row)
            item = [str(rec[k]).strip() for k in ("goal", "sol1", "sol2")]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                *_where(cfg), f"{data} item {lineno} is not a JSON object with goal, sol1, sol2"
            ) from None
        if mark not in ("0", "1"):
            raise DataError(*_where(cfg), f"{labels} line {lineno} is {mark!r}, not 0 or 1")
        for k, v in zip(("goal", "sol1", "sol2"), item):
            cols[k].append(v)
        cols["label"].append(int(mark))
    cols["split"] = [split] * len(rows)
    return _piqa_frame(cols)


def _piqa_frame(cols: dict[str, Any]) -> pd.DataFrame:
    frame = _frame(cols)
    frame["label"] = frame["label"].astype(np.int64)
    return frame


def piqa_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    parts = []
    if (path / "train.jsonl").is_file() and (path / "train-labels.lst").is_file():
        parts.append(_piqa_part(path, cfg, "train.jsonl", "train-labels.lst", SPLIT_TRAIN))
    parts.append(_piqa_part(path, cfg, "valid.jsonl", "valid-labels.lst", SPLIT_TEST))
    return pd.concat(parts, ignore_index=True)


def piqa_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    # a loading script upstream; its Parquet export names the configuration "default"
    loaded = _load_hub(hub_id, cfg, name="default", revision="refs/convert/parquet")
    parts = []
    for split_name, split in (("train", SPLIT_TRAIN), ("validation", SPLIT_TEST)):
        if split_name not in loaded:  # the unlabelled `test` split is never used
            continue
        frame = _hub_columns(loaded[split_name], ("goal", "sol1", "sol2", "label"), hub_id, cfg)
        parts.append(
            _piqa_frame(
                {
                    **{k: frame[k].astype(str).str.strip() for k in ("goal", "sol1", "sol2")},
                    "label": frame["label"].astype(np.int64),
                    "split": [split] * len(frame),
                }
            )
        )
    if not parts:
        raise DataError(*_where(cfg), f"{hub_id!r} has neither a 'train' nor a 'validation' split")
    return pd.concat(parts, ignore_index=True)
