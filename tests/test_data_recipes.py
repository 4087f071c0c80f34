"""The DP-LoRA paper's data sets (issue 7): recipes on the offline copies in
``../shared/data``, their splits and labels, the hub code paths (with a stand-in for
``datasets.load_dataset``, no network), the offline error, the metrics on hand-made
predictions, the presets and sweeps, and a tiny end-to-end ``train`` on FPB.

The data folder is the project's offline copy (``<repo>/../shared/data``, laid out like
``$DPLORA_DATA_DIR``); tests that read it are skipped when it is missing.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dplora_ray.config import DataConfig, load_config
from dplora_ray.data import PAPER_RECIPES, load_data, load_examples
from dplora_ray.data.metrics import (
    accuracy,
    f1_per_label,
    f1_weighted,
    lcs_length,
    multiple_choice_accuracy,
    perplexity,
    rouge_l,
    rouge_tokenize,
)
from dplora_ray.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.usefixtures("shared_data")  # fails (never skips) without it
SENTIMENT = ("negative", "neutral", "positive")  # label order of fin_sentiment/sentiment3
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch, shared_data: Path) -> Path:
    """``DPLORA_DATA_DIR`` pointing at the offline copies."""
    monkeypatch.setenv("DPLORA_DATA_DIR", str(DATA))
    return DATA


def _counts(frame: pd.DataFrame, column: str = "label") -> dict[Any, int]:
    return {k: int(v) for k, v in frame[column].value_counts().items()}


def _data_error(cfg: DataConfig) -> DataError:
    with pytest.raises(DataError) as info:
        load_data(cfg, 0)
    assert "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------------------------- fpb


@needs_data
@pytest.mark.parametrize(
    ("subset", "rows", "counts"),
    [
        ("50agree", 4840, {"neutral": 2873, "positive": 1363, "negative": 604}),
        ("66agree", 4211, {"neutral": 2529, "positive": 1168, "negative": 514}),
        ("75agree", 3448, {"neutral": 2141, "positive": 887, "negative": 420}),
        ("allagree", 2259, {"neutral": 1386, "positive": 570, "negative": 303}),
    ],
)
def test_fpb_subsets_rows_and_labels(
    data_dir: Path, subset: str, rows: int, counts: dict[str, int]
) -> None:
    # Execute
    frame = load_examples(DataConfig(recipe="fpb", task="fin_sentiment", subset=subset))

    # Assert: the release's rows less exact duplicate lines, no official split
    assert len(frame) == rows
    assert _counts(frame) == counts
    assert list(frame.columns) == ["text", "label", "group", "split"]
    assert not frame.duplicated(["text", "label"]).any()
    assert set(frame["split"]) == {""}


@needs_data
def test_fpb_default_subset_and_latin1_text(data_dir: Path) -> None:
    frame = load_examples(DataConfig(recipe="fpb"))  # sentiment3 is accepted too
    assert len(frame) == 4840  # 50agree
    first = frame["text"][0]
    assert first.startswith("According to Gran , the company has no plans")
    assert not first.endswith("@neutral") and frame["label"][0] == "neutral"


@needs_data
def test_fpb_reads_data_path_as_root_folder_or_file(data_dir: Path) -> None:
    folder = DATA / "financial_phrasebank"
    for path in (DATA, folder, folder / "Sentences_AllAgree.txt"):
        subset = None if path.is_file() else "allagree"
        frame = load_examples(DataConfig(recipe="fpb", path=str(path), subset=subset))
        assert len(frame) == 2259


@needs_data
def test_fpb_load_data_holds_out_a_seeded_quarter(data_dir: Path) -> None:
    # Prepare
    cfg = DataConfig(recipe="fpb", task="fin_sentiment", test_size=1210, balanced_test=False)

    # Execute
    a, b = load_data(cfg, 0), load_data(cfg, 0)

    # Assert
    assert len(a.train) == 3630 and len(a.test) == 1210
    assert not set(a.train["text"]) & set(a.test["text"])
    pd.testing.assert_frame_equal(a.test, b.test)
    assert a.task.name == "fin_sentiment" and a.task.label_names == SENTIMENT
    assert set(a.test["label"]) == {0, 1, 2}
    balanced = load_data(DataConfig(recipe="fpb", task="fin_sentiment"), 0)
    assert _counts(balanced.test) == {0: 100, 1: 100, 2: 100}


@needs_data
def test_fpb_bad_subset_names_data_subset(data_dir: Path) -> None:
    err = _data_error(DataConfig(recipe="fpb", subset="90agree"))
    assert err.key == "data.subset" and "50agree, 66agree, 75agree, allagree" in str(err)
    err = _data_error(
        DataConfig(
            recipe="fpb",
            path=str(DATA / "financial_phrasebank" / "Sentences_50Agree.txt"),
            subset="allagree",
        )
    )
    assert err.key == "data.subset" and "contradicts data.path" in str(err)


# ------------------------------------------------------------------------------ tfns


@needs_data
def test_tfns_official_split_and_label_mapping(data_dir: Path) -> None:
    # Prepare: the whole official test split, natural label distribution
    cfg = DataConfig(recipe="tfns", task="fin_sentiment", test_size=2388, balanced_test=False)

    # Execute
    frame = load_examples(cfg)
    data = load_data(cfg, 0)

    # Assert: 0 bearish -> negative, 1 bullish -> positive, 2 neutral -> neutral
    assert _counts(frame[frame["split"] == "train"]) == {
        "neutral": 6178,
        "positive": 1923,
        "negative": 1442,
    }
    assert _counts(frame[frame["split"] == "test"]) == {
        "neutral": 1566,
        "positive": 475,
        "negative": 347,
    }
    assert len(data.train) == 9543 and len(data.test) == 2388
    assert _counts(data.test) == {1: 1566, 2: 475, 0: 347}
    assert data.test["text"][0].startswith("$ALLY - Ally Financial pulls outlook")


@needs_data
def test_tfns_smaller_test_size_draws_from_the_official_test_only(data_dir: Path) -> None:
    # Prepare
    valid = set(pd.read_csv(DATA / "tfns" / "sent_valid.csv")["text"].str.strip())
    assert any("\n" in t for t in valid)  # quoted tweets with line breaks of their own

    # Execute
    data = load_data(DataConfig(recipe="tfns", task="fin_sentiment", test_size=300), 3)

    # Assert: balanced draw from sent_valid.csv; the training pool stays sent_train.csv
    assert _counts(data.test) == {0: 100, 1: 100, 2: 100}
    assert set(data.test["text"]) <= valid
    assert len(data.train) == 9543 and not set(data.train["text"]) & valid


# -------------------------------------------------------------------------- pubmedqa


@needs_data
def test_pubmedqa_official_test_pmids(data_dir: Path) -> None:
    # Prepare
    truth = json.loads((DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    records = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    test_questions = {records[p]["QUESTION"].strip() for p in truth}
    cfg = DataConfig(recipe="pubmedqa", task="yesnomaybe", test_size=500, balanced_test=False)

    # Execute
    data = load_data(cfg, 0)

    # Assert: (no, yes, maybe) = (0, 1, 2)
    assert len(data.train) == 500 and len(data.test) == 500
    assert _counts(data.test) == {1: 276, 0: 169, 2: 55}
    assert _counts(data.train) == {1: 276, 0: 169, 2: 55}
    assert {t.split("\nContext: ")[0] for t in data.test["text"]} == test_questions
    prompt = data.task.format_prompt(data.test["text"][0])
    assert prompt.startswith("Question: ") and "\nContext: " in prompt
    assert prompt.endswith("\nAnswer (yes, no or maybe):")


@needs_data
def test_pubmedqa_without_ground_truth_is_split_by_seed(tmp_path: Path) -> None:
    shutil.copy(DATA / "pubmedqa" / "ori_pqal.json", tmp_path / "ori_pqal.json")
    frame = load_examples(DataConfig(recipe="pubmedqa", task="yesnomaybe", path=str(tmp_path)))
    assert len(frame) == 1000 and set(frame["split"]) == {""}
    data = load_data(DataConfig(recipe="pubmedqa", task="yesnomaybe", path=str(tmp_path)), 0)
    assert len(data.test) == 300 and len(data.train) == 700


@needs_data
def test_pubmedqa_needs_the_yesnomaybe_task(data_dir: Path) -> None:
    err = _data_error(DataConfig(recipe="pubmedqa"))
    assert err.key == "data.task" and "data.task=yesnomaybe" in str(err)


# ------------------------------------------------------------------- medquad and piqa


@needs_data
def test_medquad_frame_and_document_split(data_dir: Path) -> None:
    # Execute
    frame = load_examples(DataConfig(recipe="medquad", task="qa_generation"))

    # Assert
    assert list(frame.columns) == ["question", "answer", "qtype", "group", "split"]
    assert len(frame) == 16407
    assert _counts(frame, "split") == {"train": 14837, "test": 1570}
    assert frame["group"].nunique() == 9  # the NIH source sites
    assert (frame["question"].str.len() > 0).all() and (frame["answer"].str.len() > 0).all()
    assert _counts(frame, "qtype")["information"] == 4535
    # every pair of one document is on one side of the split
    lines = (DATA / "medquad" / "medquad_answered.jsonl").read_text().splitlines()
    docs = [f"{r['source']}/{r['doc_id']}" for r in map(json.loads, lines)]
    sides = pd.Series(frame["split"].to_numpy(), index=docs)
    assert (sides.groupby(level=0).nunique() == 1).all()


@needs_data
def test_piqa_frame(data_dir: Path) -> None:
    frame = load_examples(DataConfig(recipe="piqa", task="multiple_choice"))
    assert list(frame.columns) == ["goal", "sol1", "sol2", "label", "split"]
    assert len(frame) == 1838 and set(frame["split"]) == {"test"}
    assert _counts(frame) == {1: 928, 0: 910}
    assert frame["label"].dtype == np.int64
    assert frame["goal"][0] == "How do I ready a guinea pig cage for it's new occupants?"


def test_sequence_tasks_need_their_recipes() -> None:
    # the generation / multiple-choice tasks only come from medquad / piqa
    from dplora_ray.data import load_data

    for task, recipe in (("qa_generation", "medquad"), ("multiple_choice", "piqa")):
        with pytest.raises(DataError) as info:
            load_data(DataConfig(recipe="synthetic", task=task), seed=0)
        assert info.value.key == "data.task"
        assert f"only the recipes {recipe} provide its data" in str(info.value)


# ----------------------------------------------------------------- where data comes from


@pytest.mark.parametrize("recipe", ["fpb", "tfns", "pubmedqa", "medquad", "piqa"])
def test_offline_without_local_copy_names_data_path(
    monkeypatch: pytest.MonkeyPatch, recipe: str
) -> None:
    # Prepare
    monkeypatch.delenv("DPLORA_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DataConfig(recipe=recipe, task=PAPER_RECIPES[recipe].tasks[0])

    # Execute
    with pytest.raises(DataError) as info:
        load_examples(cfg)

    # Assert
    msg = str(info.value)
    assert info.value.key == "data.path" and "\n" not in msg
    assert msg.startswith("data.path=None: ") and "hub is offline" in msg
    assert "set data.path or DPLORA_DATA_DIR" in msg


def test_offline_hub_id_as_data_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(recipe="tfns", path="someone/tfns-copy"))
    msg = str(info.value)
    assert msg.startswith("data.path='someone/tfns-copy': not a local file or folder and the hub")
    assert "is offline (HF_" in msg and "\n" not in msg


def test_data_dir_without_the_recipe_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DPLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(recipe="tfns"))
    assert f"DPLORA_DATA_DIR={tmp_path} holds no tfns/" in str(info.value)


def test_bad_local_files_name_data_path(tmp_path: Path) -> None:
    (tmp_path / "Sentences_50Agree.txt").write_bytes(b"fine sentence@neutral\r\nno label here\r\n")
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(recipe="fpb", path=str(tmp_path)))
    assert str(info.value).startswith(f"data.path={str(tmp_path)!r}: Sentences_50Agree.txt line 2")
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(recipe="piqa", task="multiple_choice", path=str(tmp_path)))
    assert "valid.jsonl has 1 items but valid-labels.lst 2 labels" in str(info.value)


def test_subset_on_a_recipe_without_subsets() -> None:
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(recipe="tfns", subset="all"))
    assert info.value.key == "data.subset"


class _FakeHub:
    """Stands in for ``datasets.load_dataset``: records the call, returns a DatasetDict."""

    def __init__(self, splits: dict[str, dict[str, list[Any]]]) -> None:
        self.splits = splits
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, path: str, name: Any = None, revision: Any = None, **kw: Any) -> Any:
        import datasets

        self.calls.append((path, name, revision))
        return datasets.DatasetDict(
            {k: datasets.Dataset.from_dict(v) for k, v in self.splits.items()}
        )


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    pytest.importorskip("datasets")
    for var in (*OFFLINE_VARS, "DPLORA_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DPLORA_RAY_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def _hub(monkeypatch: pytest.MonkeyPatch, splits: dict[str, dict[str, list[Any]]]) -> _FakeHub:
    import datasets

    fake = _FakeHub(splits)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_hub_fpb_tfns_column_mapping(online: pytest.MonkeyPatch) -> None:
    # Prepare: the hub schemas (FPB ClassLabel 0 neg / 1 neu / 2 pos; TFNS 0/1/2 bear/bull/neu)
    fpb = _hub(online, {"train": {"sentence": ["a", "b", "b", "c"], "label": [0, 1, 1, 2]}})

    # Execute
    frame = load_examples(DataConfig(recipe="fpb", subset="allagree"))

    # Assert
    assert fpb.calls == [
        ("takala/financial_phrasebank", "sentences_allagree", "refs/convert/parquet")
    ]
    assert frame["label"].tolist() == ["negative", "neutral", "positive"]  # duplicate dropped
    tfns = _hub(
        online,
        {
            "train": {"text": [" up ", "down", "flat"], "label": [1, 0, 2]},
            "validation": {"text": ["x"], "label": [0]},
        },
    )
    frame = load_examples(DataConfig(recipe="tfns"))
    assert tfns.calls == [("zeroshot/twitter-financial-news-sentiment", None, None)]
    assert frame["label"].tolist() == ["positive", "negative", "neutral", "negative"]
    assert frame["split"].tolist() == ["train"] * 3 + ["test"]
    assert frame["text"][0] == "up"


def test_hub_pubmedqa_medquad_piqa_column_mapping(online: pytest.MonkeyPatch) -> None:
    pub = _hub(
        online,
        {
            "train": {
                "pubid": [1, 2],
                "question": ["Q1?", "Q2?"],
                "context": [
                    {"contexts": ["c1", "c2"], "labels": ["A", "B"]},
                    {"contexts": ["d"], "labels": ["A"]},
                ],
                "long_answer": ["l1", "l2"],
                "final_decision": ["yes", "maybe"],
            }
        },
    )
    frame = load_examples(DataConfig(recipe="pubmedqa", task="yesnomaybe"))
    assert pub.calls == [("qiaojin/PubMedQA", "pqa_labeled", None)]
    assert frame["text"].tolist() == ["Q1?\nContext: c1 c2", "Q2?\nContext: d"]
    assert frame["label"].tolist() == ["yes", "maybe"] and set(frame["split"]) == {""}

    med = _hub(
        online,
        {
            "train": {
                "document_id": ["0000001_1", "0000002_1"],
                "document_source": ["CancerGov", "MPlusDrugs"],
                "question_type": ["information", "usage"],
                "question": ["What is X ?", "How to use Y ?"],
                "answer": ["X is a disease.", None],  # removed upstream (copyright)
            }
        },
    )
    frame = load_examples(DataConfig(recipe="medquad", task="qa_generation"))
    assert med.calls == [("lavita/MedQuAD", None, None)]
    assert frame[["question", "answer", "qtype", "group"]].values.tolist() == [
        ["What is X ?", "X is a disease.", "information", "CancerGov"]
    ]

    piqa = _hub(
        online,
        {
            split: {"goal": ["g"], "sol1": ["a"], "sol2": ["b"], "label": [label]}
            for split, label in (("train", 1), ("validation", 0), ("test", -1))
        },
    )
    frame = load_examples(DataConfig(recipe="piqa", task="multiple_choice"))
    assert piqa.calls == [("ybisk/piqa", "default", "refs/convert/parquet")]
    assert frame["split"].tolist() == ["train", "test"] and frame["label"].tolist() == [1, 0]


def test_hub_failure_is_one_line_naming_data_path(online: pytest.MonkeyPatch) -> None:
    import datasets

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("no route to host\nmore detail")

    online.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(recipe="tfns"))
    msg = str(info.value)
    assert "\n" not in msg and info.value.key == "data.path"
    assert "'zeroshot/twitter-financial-news-sentiment' could not be loaded" in msg
    assert "ConnectionError: no route to host" in msg


# --------------------------------------------------------------------------- metrics


def test_weighted_f1_by_hand() -> None:
    # Prepare: per label (tp, fp, fn): 0 -> (2, 0, 1), 1 -> (1, 1, 1), 2 -> (1, 1, 0)
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    f1 = [4 / 5, 2 / 4, 2 / 3]  # 2tp / (2tp + fp + fn)

    # Execute / Assert: supports 3, 2, 1
    assert np.allclose(f1_per_label(y_true, y_pred, 3), f1)
    assert f1_weighted(y_true, y_pred, 3) == pytest.approx((3 * f1[0] + 2 * f1[1] + f1[2]) / 6)
    assert f1_weighted(y_true, y_pred, 3) == pytest.approx(0.6777777777777778)
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # a label predicted but never true weighs nothing
    assert f1_weighted([0, 0], [0, 1], 2) == pytest.approx(2 / 3)
    assert f1_weighted([2, 2, 2], [2, 2, 2], 3) == 1.0
    with pytest.raises(ValueError):
        f1_weighted([], [], 3)


def test_weighted_f1_agrees_with_the_engines_macro_f1_when_balanced() -> None:
    from dplora_ray.data.metrics import f1_macro

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)  # equal supports: weighted = macro
    p = rng.integers(0, 3, size=60)
    assert f1_weighted(y, p, 3) == pytest.approx(f1_macro(y, p, 3))


def test_rouge_l_by_hand() -> None:
    # "the cat sat on the mat" vs "the cat is on the mat": LCS the cat on the mat = 5 of 6
    assert rouge_l(["The cat sat on the mat."], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # "the cat" vs "the cat sat down": LCS 2, P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3
    assert rouge_l(["the cat"], ["the cat sat down"]) == pytest.approx(2 / 3)
    # Lin (2004): "police killed the gunman" vs "police kill the gunman": LCS 3, F = 3/4
    assert rouge_l(["police killed the gunman"], ["police kill the gunman"]) == 0.75
    # nothing shared; empty prediction
    assert rouge_l(["dogs bark"], ["cats meow"]) == 0.0
    assert rouge_l([""], ["anything"]) == 0.0
    # the corpus score is the mean over pairs
    pairs = rouge_l(["the cat", "dogs bark"], ["the cat sat down", "cats meow"])
    assert pairs == pytest.approx((2 / 3 + 0.0) / 2)
    assert rouge_tokenize("Don't STOP-now, 42x!") == ["don", "t", "stop", "now", "42x"]
    with pytest.raises(ValueError):
        rouge_l("a string", "another")


def test_lcs_matches_the_dynamic_programme() -> None:
    def lcs_dp(a: list[str], b: list[str]) -> int:
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 15))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 15))]
        assert lcs_length(a, b) == lcs_dp(a, b)


def test_multiple_choice_accuracy_and_perplexity_by_hand() -> None:
    # predictions 0, 1, 0 (tie: the first), 1 against labels 0, 1, 1, 0: two right
    scores = [[-1.0, -2.0], [-3.0, -1.0], [0.0, 0.0], [-5.0, -4.0]]
    assert multiple_choice_accuracy(scores, [0, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError):
        multiple_choice_accuracy(scores, [0, 1, 2, 0])
    # two tokens of NLL ln 2 each: perplexity 2; per-sequence sums with counts
    assert perplexity([math.log(2), math.log(2)]) == pytest.approx(2.0)
    assert perplexity([3 * math.log(4), math.log(4)], token_counts=[3, 1]) == pytest.approx(4.0)


# ----------------------------------------------------------------- presets and sweeps


@pytest.mark.parametrize(
    ("name", "recipe", "task"),
    [
        ("finance_fpb", "fpb", "fin_sentiment"),
        ("finance_tfns", "tfns", "fin_sentiment"),
        ("medical_pubmedqa", "pubmedqa", "yesnomaybe"),
        ("medical_medquad", "medquad", "qa_generation"),
        ("general_piqa", "piqa", "multiple_choice"),
    ],
)
def test_paper_presets_have_the_papers_hyper_parameters(name: str, recipe: str, task: str) -> None:
    cfg = load_config(REPO / "configs" / "paper" / f"{name}.yaml")
    fed, pc = cfg.federation, cfg.privacy
    assert (cfg.data.recipe, cfg.data.task) == (recipe, task)
    assert (fed.num_clients, fed.clients_per_round, fed.rounds) == (5, 5, 50)
    # the paper names the learning rate, not the optimizer: AdamW (docs/reproduction.md)
    assert (fed.batch_size, fed.learning_rate, fed.optimizer) == (8, 5e-4, "adamw")
    assert fed.local_steps == 1
    assert (pc.mode, pc.target_epsilon, pc.clipping_norm) == ("paper", 2.0, 10.0)
    assert cfg.model.name == "smollm2-135m"


def test_paper_sweeps_validate() -> None:
    from dplora_ray.tune import expand_trials, load_sweep

    finance = expand_trials(load_sweep(REPO / "sweeps" / "paper_finance.yaml"))
    medical = expand_trials(load_sweep(REPO / "sweeps" / "paper_medical.yaml"))
    assert len(finance) == 10 and len(medical) == 10
    recipes = {(t.config.data.recipe, t.config.privacy.mode) for t in finance}
    assert recipes == {(r, m) for r in ("fpb", "tfns") for m in ("paper", "none")}
    cases = {(t.config.data.recipe, t.config.data.task) for t in medical}
    assert cases == {("pubmedqa", "yesnomaybe"), ("medquad", "qa_generation")}
    eps = sorted({t.config.privacy.target_epsilon or math.inf for t in medical})
    assert eps == [1.0, 2.0, 4.0, 8.0, math.inf]


def test_unknown_recipe_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.recipe=boolq"])
    assert info.value.key == "data.recipe"


# ------------------------------------------------------------------------ end to end


@needs_data
def test_train_fpb_preset_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    # Prepare: the FPB preset, shrunk: tiny model, inline clients, 2 rounds
    from dplora_ray import results as R
    from dplora_ray.cli import main

    out = tmp_path / "run"
    sets = [
        "model.name=tiny-llama",
        "model.max_length=64",
        "runtime.backend=inline",
        "runtime.torch_threads=1",
        "federation.rounds=2",
        "federation.eval_every=1",
        "data.max_train_examples=200",
        "data.test_size=60",
    ]
    argv = ["train", str(REPO / "configs" / "paper" / "finance_fpb.yaml"), "--out", str(out)]
    argv += ["--no-progress", *[a for s in sets for a in ("--set", s)]]

    # Execute
    rc = main(argv)

    # Assert
    assert rc == 0
    run = R.load_run(out)
    summary, rounds = run["summary"], run["rounds"]
    assert summary["stop_reason"] == "completed" and summary["rounds_completed"] == 2
    assert summary["privacy_mode"] == "paper" and 0 < summary["epsilon"] <= 2.0 + 1e-9
    assert summary["num_train_examples"] == 200 and summary["num_test_examples"] == 60
    assert 0.0 <= summary["eval_f1_weighted"] <= 1.0
    assert 0.0 <= summary["eval_f1_weighted_before"] <= 1.0
    assert tuple(rounds.columns) == R.ROUND_COLUMNS
    assert rounds[R.EVAL_F1_WEIGHTED].notna().all()
    assert load_config(out / "config.yaml").data.recipe == "fpb"
