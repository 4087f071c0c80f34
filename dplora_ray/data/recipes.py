"""The DP-LoRA paper's data sets as recipes (``data.recipe``).

The paper (Liu et al., arXiv 2312.17493, Sec. 5) evaluates on financial (FPB, FiQA-SA,
TFNS), medical (MedQuAD, LiveQA, MEDIQA-Ans) and general (BoolQ, PIQA, WinoGrande) data.
The recipes here cover the ones with a public, redistributable copy:

======== ======= =============== ================ ===================== ============================
recipe   domain  task type       ``data.task``    test split            metrics
======== ======= =============== ================ ===================== ============================
fpb      finance classification  fin_sentiment,   seeded ``test_size``  accuracy, weighted F1
                                 sentiment3       (no official split)
tfns     finance classification  fin_sentiment,   official:             accuracy, weighted F1
                                 sentiment3       ``sent_valid.csv``
pubmedqa medical classification  yesnomaybe       official: the 500     accuracy, macro-F1
                                                  PMIDs of
                                                  ``test_ground_truth``
medquad  medical generation      qa_generation    by document (hash)    ROUGE-L, perplexity
piqa     general multiple_choice multiple_choice  official validation   accuracy
======== ======= =============== ================ ===================== ============================

Where the data comes from, in this order:

1. ``data.path``: the recipe's file (``fpb``: one ``Sentences_*Agree.txt``), its folder
   (e.g. ``.../financial_phrasebank``), or a data root holding that folder; or, when it
   is not a local path, a Hugging Face hub id that replaces the recipe's default.
2. ``$DPLORA_DATA_DIR``: a data root laid out like the project's offline copies::

       $DPLORA_DATA_DIR/financial_phrasebank/Sentences_50Agree.txt (... 66, 75, AllAgree)
       $DPLORA_DATA_DIR/tfns/sent_train.csv, sent_valid.csv
       $DPLORA_DATA_DIR/pubmedqa/ori_pqal.json, test_ground_truth.json
       $DPLORA_DATA_DIR/medquad/medquad_answered.jsonl
       $DPLORA_DATA_DIR/piqa/valid.jsonl, valid-labels.lst (train.jsonl, train-labels.lst)

3. The Hugging Face hub (:attr:`RecipeSpec.hub_id`), unless ``HF_DATASETS_OFFLINE`` /
   ``HF_HUB_OFFLINE`` is set: then a one-line :class:`~dplora_ray.errors.DataError`
   naming ``data.path`` says to set ``data.path`` or ``DPLORA_DATA_DIR``.

Per recipe:

* ``fpb``: Financial PhraseBank v1.0 (Malo et al. 2014; CC BY-NC-SA 3.0). Lines
  ``sentence@label`` in ISO-8859-1. ``data.subset`` picks the annotator agreement level:
  ``50agree`` (default: the Hugging Face default and FinGPT's choice), ``66agree``,
  ``75agree``, ``allagree``. Exact duplicate (sentence, label) lines are dropped (50agree:
  4846 -> 4840 rows), so no copy of a test sentence is trained on; the two 50agree
  sentences annotated with two different labels are kept as they are. No groups.
* ``tfns``: Twitter Financial News Sentiment (zeroshot; MIT). 0 bearish -> negative,
  1 bullish -> positive, 2 neutral -> neutral. Train ``sent_train.csv`` (9543), test
  ``sent_valid.csv`` (2388, the split FinGPT evaluates on).
* ``pubmedqa``: PubMedQA PQA-L (Jin et al. 2019; MIT), 1000 expert-labelled questions.
  The text is ``question`` then ``Context:`` and the abstract's sections (question first,
  so truncation cuts the context, never the question); the label is ``final_decision``.
  Test: the 500 official test PMIDs when ``test_ground_truth.json`` is present (local
  copies), otherwise (the hub's single 1000-row split) a seeded ``data.test_size`` split.
* ``medquad``: MedQuAD answered pairs (Ben Abacha & Demner-Fushman 2019; CC BY 4.0),
  question -> answer generation. Test: the documents whose CRC32 of ``source/doc_id``
  is 0 mod 10 (about a tenth; every pair of a document on one side). ``group`` is the
  NIH source site (a natural partition). Frame: ``question``, ``answer``, ``qtype``,
  ``group``, ``split``.
* ``piqa``: PIQA (Bisk et al. 2020; AFL 3.0), two solutions per goal. The labelled
  validation set is the test split; ``train.jsonl`` is used when present (local) or
  from the hub. Frame: ``goal``, ``sol1``, ``sol2``, ``label`` (0: sol1, 1: sol2),
  ``split``.

:func:`dplora_ray.data.load_data` turns these frames into the engine's pools (the
classification recipes, ``medquad`` as generation, ``piqa`` as multiple choice);
:func:`dplora_ray.data.load_examples` returns the raw frames.

Invariants:
    * A reader returns a fresh frame with a ``split`` column (``train`` / ``test``, or
      ``""`` everywhere when the source has no official test split); classification
      frames have ``text``, ``label`` (the label's *name*, e.g. ``"positive"``) and
      ``group``; rows keep the source's order.
    * Bad or missing data raises :class:`~dplora_ray.errors.DataError` (one line, naming
      the config key and the value); nothing here touches the network unless the hub is
      online and no local copy was named.
    * ``datasets`` is imported only for hub loading.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.tasks import CLASSIFICATION, GENERATION, MULTIPLE_CHOICE
from dplora_ray.errors import DataError

__all__ = [
    "DATA_DIR_ENV",
    "FPB_SUBSETS",
    "PAPER_RECIPES",
    "RecipeSpec",
    "load_examples",
]

DATA_DIR_ENV = "DPLORA_DATA_DIR"
SPLIT_TRAIN = "train"
SPLIT_TEST = "test"

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


@dataclass(frozen=True)
class RecipeSpec:
    """One paper data set: where it lives, what it is, how it is scored.

    Attributes:
        name: ``data.recipe``.
        domain: ``finance``, ``medical`` or ``general``.
        task_type: ``classification``, ``generation`` or ``multiple_choice``.
        tasks: the ``data.task`` values it accepts (the first is the presets' choice).
        folder: its folder under a data root (``$DPLORA_DATA_DIR``).
        files: files the folder must hold (``fpb``: depends on ``data.subset``).
        hub_id: Hugging Face hub dataset id.
        metrics: what the field reports for it (names of :mod:`dplora_ray.data.metrics`
            functions, ``f1_macro`` being the engine's).
        licence: the data's licence.
    """

    name: str
    domain: str
    task_type: str
    tasks: tuple[str, ...]
    folder: str
    files: tuple[str, ...]
    hub_id: str
    metrics: tuple[str, ...]
    licence: str
    read_local: Callable[[Path, DataConfig], pd.DataFrame]
    read_hub: Callable[[str, DataConfig], pd.DataFrame]
    single_file: bool = False  # data.path may name one file (fpb)

    def required_files(self, cfg: DataConfig) -> tuple[str, ...]:
        if self.name == "fpb":
            return (FPB_SUBSETS[_fpb_subset(cfg)][0],)
        return self.files


# ----------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


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
        raise DataError(*_where(cfg), f"cannot read {path.name} ({_one_line(exc)})") from None


def _hub_offline() -> str | None:
    from dplora_ray.data.loading import _hub_offline as offline

    return offline()


def _load_hub(
    hub_id: str, cfg: DataConfig, name: str | None = None, revision: str | None = None
) -> Any:
    """``datasets.load_dataset(hub_id, name, revision)`` (all splits, a DatasetDict)."""
    import datasets

    from dplora_ray.data.loading import cache_dir

    try:
        return datasets.load_dataset(
            hub_id, name=name, revision=revision, cache_dir=str(cache_dir(cfg) / "datasets")
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, format: all data errors
        raise DataError(
            *_where(cfg),
            f"recipe {cfg.recipe!r}: {hub_id!r} could not be loaded "
            f"from the Hugging Face hub ({_one_line(exc)})",
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


def _fpb_subset(cfg: DataConfig) -> str:
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


def _fpb_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    """``sentence@label`` lines, ISO-8859-1, CRLF; the label after the last ``@``."""
    file = path if path.is_file() else path / FPB_SUBSETS[_fpb_subset(cfg)][0]
    if cfg.subset is not None and file.name != FPB_SUBSETS[_fpb_subset(cfg)][0]:
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


def _fpb_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
    # the hub copy is a loading script, which datasets>=4 no longer runs; its automatic
    # Parquet export (one config per agreement level, one `train` split) loads instead
    loaded = _load_hub(
        hub_id, cfg, name=FPB_SUBSETS[_fpb_subset(cfg)][1], revision="refs/convert/parquet"
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


def _tfns_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
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


def _tfns_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
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


def _pubmedqa_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
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


def _pubmedqa_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
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


def _medquad_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
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


def _medquad_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
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


def _piqa_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    parts = []
    if (path / "train.jsonl").is_file() and (path / "train-labels.lst").is_file():
        parts.append(_piqa_part(path, cfg, "train.jsonl", "train-labels.lst", SPLIT_TRAIN))
    parts.append(_piqa_part(path, cfg, "valid.jsonl", "valid-labels.lst", SPLIT_TEST))
    return pd.concat(parts, ignore_index=True)


def _piqa_hub(hub_id: str, cfg: DataConfig) -> pd.DataFrame:
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


# ---------------------------------------------------------------------- registry

PAPER_RECIPES: dict[str, RecipeSpec] = {
    "fpb": RecipeSpec(
        name="fpb",
        domain="finance",
        task_type=CLASSIFICATION,
        tasks=("fin_sentiment", "sentiment3"),
        folder="financial_phrasebank",
        files=(),
        hub_id="takala/financial_phrasebank",
        metrics=("accuracy", "f1_weighted"),
        licence="CC BY-NC-SA 3.0",
        read_local=_fpb_local,
        read_hub=_fpb_hub,
        single_file=True,
    ),
    "tfns": RecipeSpec(
        name="tfns",
        domain="finance",
        task_type=CLASSIFICATION,
        tasks=("fin_sentiment", "sentiment3"),
        folder="tfns",
        files=("sent_train.csv", "sent_valid.csv"),
        hub_id="zeroshot/twitter-financial-news-sentiment",
        metrics=("accuracy", "f1_weighted"),
        licence="MIT",
        read_local=_tfns_local,
        read_hub=_tfns_hub,
    ),
    "pubmedqa": RecipeSpec(
        name="pubmedqa",
        domain="medical",
        task_type=CLASSIFICATION,
        tasks=("yesnomaybe",),
        folder="pubmedqa",
        files=("ori_pqal.json",),
        hub_id="qiaojin/PubMedQA",
        metrics=("accuracy", "f1_macro"),
        licence="MIT",
        read_local=_pubmedqa_local,
        read_hub=_pubmedqa_hub,
    ),
    "medquad": RecipeSpec(
        name="medquad",
        domain="medical",
        task_type=GENERATION,
        tasks=("qa_generation",),
        folder="medquad",
        files=("medquad_answered.jsonl",),
        hub_id="lavita/MedQuAD",
        metrics=("rouge_l", "perplexity"),
        licence="CC BY 4.0",
        read_local=_medquad_local,
        read_hub=_medquad_hub,
    ),
    "piqa": RecipeSpec(
        name="piqa",
        domain="general",
        task_type=MULTIPLE_CHOICE,
        tasks=("multiple_choice",),
        folder="piqa",
        files=("valid.jsonl", "valid-labels.lst"),
        hub_id="ybisk/piqa",
        metrics=("multiple_choice_accuracy",),
        licence="AFL 3.0",
        read_local=_piqa_local,
        read_hub=_piqa_hub,
    ),
}


# ----------------------------------------------------------------- where it lives


def _holds(folder: Path, files: Iterable[str]) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in files)


def _locate(spec: RecipeSpec, cfg: DataConfig) -> tuple[str, Path | str]:
    """``("local", file or folder)`` or ``("hub", hub id)``; see the module doc."""
    from dplora_ray.data.loading import _looks_like_hub_id

    files = spec.required_files(cfg)
    listed = ", ".join(files)
    if cfg.path is not None:
        p = Path(cfg.path).expanduser()
        if p.is_file():
            if spec.single_file:
                return "local", p
            if p.name in files and _holds(p.parent, files):
                return "local", p.parent
            raise DataError(
                "data.path",
                cfg.path,
                f"recipe {spec.name!r} reads a folder holding {listed}, not a single file",
            )
        if p.is_dir():
            for folder in (p, p / spec.folder):
                if _holds(folder, files):
                    return "local", folder
            raise DataError(
                "data.path",
                cfg.path,
                f"holds neither {listed} nor a "
                f"{spec.folder}/ folder with them (recipe {spec.name!r})",
            )
        if _looks_like_hub_id(cfg.path):
            return "hub", cfg.path
        raise DataError("data.path", cfg.path, "no such file or folder")
    root = os.environ.get(DATA_DIR_ENV, "").strip()
    if root:
        folder = Path(root).expanduser() / spec.folder
        if _holds(folder, files):
            return "local", folder
        raise DataError(
            "data.path",
            None,
            f"{DATA_DIR_ENV}={root} holds no {spec.folder}/ "
            f"with {listed} (recipe {spec.name!r}); fix it or set data.path",
        )
    var = _hub_offline()
    if var is not None:
        raise DataError(
            "data.path",
            None,
            f"recipe {spec.name!r} has no local copy and the "
            f"hub is offline ({var}=1); set data.path or {DATA_DIR_ENV} to a "
            f"folder holding {spec.folder}/",
        )
    return "hub", spec.hub_id


def load_examples(cfg: DataConfig) -> pd.DataFrame:
    """The clean frame of a paper recipe (all rows, with the ``split`` column).

    Raises:
        DataError: ``data.recipe`` is not a paper recipe, ``data.task`` does not fit it,
            ``data.subset`` is unknown (or given to a recipe without subsets), or the
            data is missing or malformed.
    """
    spec = PAPER_RECIPES.get(cfg.recipe)
    if spec is None:
        raise DataError(
            "data.recipe",
            cfg.recipe,
            f"not a paper recipe; choose one of {', '.join(PAPER_RECIPES)}",
        )
    if cfg.task not in spec.tasks:
        raise DataError(
            "data.task",
            cfg.task,
            f"recipe {spec.name!r} is a {spec.task_type} "
            f"data set; use data.task={' or '.join(spec.tasks)}",
        )
    if cfg.subset is not None and spec.name != "fpb":
        raise DataError("data.subset", cfg.subset, f"recipe {spec.name!r} has no subsets")
    where, source = _locate(spec, cfg)
    if where == "local":
        assert isinstance(source, Path)
        frame = spec.read_local(source, cfg)
    else:
        if (var := _hub_offline()) is not None:  # a hub id given as data.path
            raise DataError(
                "data.path",
                cfg.path,
                f"not a local file or folder and the hub "
                f"is offline ({var}=1); set data.path or {DATA_DIR_ENV} to a "
                f"folder holding {spec.folder}/",
            )
        frame = spec.read_hub(str(source), cfg)
    if len(frame) == 0:
        raise DataError("data.path", cfg.path, f"recipe {spec.name!r}: no rows")
    return frame
