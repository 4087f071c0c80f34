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
This module holds the registry (:data:`PAPER_RECIPES`), where the data is found and
:func:`load_examples`; the readers are in :mod:`~dplora_ray.data.paper_readers`.

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

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.paper_readers import (
    FPB_DEFAULT_SUBSET,
    FPB_SUBSETS,
    MEDQUAD_TEST_MODULUS,
    fpb_hub,
    fpb_local,
    fpb_subset,
    medquad_hub,
    medquad_local,
    piqa_hub,
    piqa_local,
    pubmedqa_hub,
    pubmedqa_local,
    tfns_hub,
    tfns_local,
)
from dplora_ray.data.sources import SPLIT_TEST, SPLIT_TRAIN, hub_offline, looks_like_hub_id
from dplora_ray.data.tasks import CLASSIFICATION, GENERATION, MULTIPLE_CHOICE
from dplora_ray.errors import DataError

__all__ = [
    "DATA_DIR_ENV",
    "FPB_DEFAULT_SUBSET",
    "FPB_SUBSETS",
    "MEDQUAD_TEST_MODULUS",
    "PAPER_RECIPES",
    "SPLIT_TEST",
    "SPLIT_TRAIN",
    "RecipeSpec",
    "load_examples",
]

DATA_DIR_ENV = "DPLORA_DATA_DIR"


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
            return (FPB_SUBSETS[fpb_subset(cfg)][0],)
        return self.files


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
        read_local=fpb_local,
        read_hub=fpb_hub,
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
        read_local=tfns_local,
        read_hub=tfns_hub,
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
        read_local=pubmedqa_local,
        read_hub=pubmedqa_hub,
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
        read_local=medquad_local,
        read_hub=medquad_hub,
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
        read_local=piqa_local,
        read_hub=piqa_hub,
    ),
}


# ----------------------------------------------------------------- where it lives


def _holds(folder: Path, files: Iterable[str]) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in files)


def _locate(spec: RecipeSpec, cfg: DataConfig) -> tuple[str, Path | str]:
    """``("local", file or folder)`` or ``("hub", hub id)``; see the module doc."""
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
        if looks_like_hub_id(cfg.path):
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
    var = hub_offline()
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
        if (var := hub_offline()) is not None:  # a hub id given as data.path
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
