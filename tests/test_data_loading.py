"""Tasks and loaders: synthetic and custom recipes, test split, error messages.

No network: ``custom`` files are written to ``tmp_path``; hub lookups must hit the
offline guard (run with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dplora_ray.config import DataConfig
from dplora_ray.data import TASKS, LoadedData, cache_dir, get_task, load_data
from dplora_ray.data.loading import vader_labels
from dplora_ray.errors import ConfigError, DataError

ROWS = [  # text, raw label, source
    ("great stuff", "pos", "web"),
    ("bad stuff", "neg", "web"),
    ("some stuff", "neu", "mail"),
    ("lovely stuff", "pos", "mail"),
    ("awful stuff", "neg", "web"),
    ("plain stuff", "neu", "mail"),
] * 5
LABEL_MAP = {"neg": "negative", "neu": "neutral", "pos": "positive"}


def _custom(tmp_path: Path, path: Path | str, **kwargs: Any) -> DataConfig:
    base: dict[str, Any] = dict(
        recipe="custom",
        path=str(path),
        text_column="sentence",
        label_column="tag",
        label_map=LABEL_MAP,
        test_size=6,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kwargs)
    return DataConfig(**base)


def _write(
    tmp_path: Path, kind: str, rows: list[tuple[Any, ...]] = ROWS, name: str = "data"
) -> Path:
    frame = pd.DataFrame(rows, columns=["sentence", "tag", "source"])
    path = tmp_path / f"{name}.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    elif kind == "json":
        path.write_text(json.dumps(frame.to_dict("records")))
    elif kind == "parquet":
        frame.to_parquet(path, index=False)
    return path


def _error(cfg: DataConfig, seed: int = 0) -> DataError:
    with pytest.raises(DataError) as info:
        load_data(cfg, seed)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ConfigError)
    return info.value


def _assert_frames(data: LoadedData) -> None:
    for frame in (data.train, data.test):
        assert list(frame.columns) == ["text", "label", "group"]
        assert frame["label"].dtype == np.int64
        assert isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0
        assert all(isinstance(t, str) for t in frame["text"])
        assert all(isinstance(g, str) for g in frame["group"])
        assert frame["label"].between(0, data.task.num_labels - 1).all()


# ------------------------------------------------------------------------------ tasks


def test_tasks_registry_and_prompts() -> None:
    task = get_task("sentiment3")
    assert task.label_names == ("negative", "neutral", "positive")
    assert task.label_words == (" negative", " neutral", " positive")
    prompt = task.format_prompt("I like {braces} here")
    assert prompt == (
        "Classify the sentiment of the text as negative, neutral or positive.\n"
        "Text: I like {braces} here\nSentiment:"
    )
    assert TASKS["yesno"].label_names == ("no", "yes")
    assert TASKS["yesno"].format_prompt("Is it?") == "Question: Is it?\nAnswer (yes or no):"
    assert TASKS["yesnomaybe"].label_names == ("no", "yes", "maybe")
    for t in TASKS.values():
        assert all(w.startswith(" ") for w in t.label_words)
        assert t.format_prompt("x").endswith(":")


def test_unknown_task_names_data_task() -> None:
    with pytest.raises(DataError) as info:
        get_task("topic7")
    assert str(info.value).startswith("data.task='topic7': unknown task")


# -------------------------------------------------------------------------- synthetic


def test_synthetic_default_sizes_balance_and_groups() -> None:
    data = load_data(DataConfig(), seed=0)
    _assert_frames(data)
    assert len(data.train) == 2000 and len(data.test) == 300
    assert data.test["label"].value_counts().to_dict() == {0: 100, 1: 100, 2: 100}
    assert set(data.train["group"]) == {"g0", "g1", "g2", "g3"}
    train_counts = np.bincount(data.train["label"], minlength=3)
    assert train_counts.min() > 600  # every label about a third


def test_synthetic_labels_use_disjoint_vocabularies() -> None:
    data = load_data(DataConfig(), seed=0)
    frame = pd.concat([data.train, data.test])
    vocab = [
        set(" ".join(frame.loc[frame["label"] == k, "text"]).lower().split()) for k in range(3)
    ]
    only = [vocab[k] - vocab[(k + 1) % 3] - vocab[(k + 2) % 3] for k in range(3)]
    assert all(len(words) >= 6 for words in only)
    assert {"excellent", "wonderful"} <= only[2]
    assert {"terrible", "awful"} <= only[0]


def test_synthetic_is_deterministic_given_seed() -> None:
    a, b = load_data(DataConfig(), 4), load_data(DataConfig(), 4)
    c = load_data(DataConfig(), 5)
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert not a.test.equals(c.test)
    # the corpus is fixed; only the split depends on the seed
    pool_a = sorted(pd.concat([a.train, a.test])["text"])
    pool_c = sorted(pd.concat([c.train, c.test])["text"])
    assert pool_a == pool_c


def test_synthetic_max_train_examples_sets_the_pool_size() -> None:
    data = load_data(DataConfig(max_train_examples=120, test_size=30), 0)
    assert len(data.train) == 120 and len(data.test) == 30


def test_synthetic_other_task_names_data_task() -> None:
    err = _error(DataConfig(task="yesno"))
    assert err.key == "data.task" and "data.task='yesno'" in str(err)


# ------------------------------------------------------------------------- test split


def test_test_split_is_disjoint_balanced_and_held_out_before_the_cap(tmp_path: Path) -> None:
    rows = [(f"text number {i}", ["neg", "neu", "pos"][i % 3], "s") for i in range(300)]
    path = _write(tmp_path, "csv", rows)
    full = load_data(_custom(tmp_path, path, test_size=60), seed=1)
    capped = load_data(_custom(tmp_path, path, test_size=60, max_train_examples=50), seed=1)
    _assert_frames(full)
    assert not set(full.train["text"]) & set(full.test["text"])
    assert len(full.train) + len(full.test) == 300
    assert full.test["label"].value_counts().to_dict() == {0: 20, 1: 20, 2: 20}
    pd.testing.assert_frame_equal(full.test, capped.test)  # the cap does not move it
    assert len(capped.train) == 50
    assert set(capped.train["text"]) <= set(full.train["text"])
    # rows keep the source order
    numbers = [int(t.split()[-1]) for t in full.train["text"]]
    assert numbers == sorted(numbers)


def test_unbalanced_test_split_has_exact_size(tmp_path: Path) -> None:
    rows = [(f"t{i}", "neg" if i < 25 else "pos", "s") for i in range(30)]
    data = load_data(
        _custom(tmp_path, _write(tmp_path, "csv", rows), test_size=10, balanced_test=False), 0
    )
    assert len(data.test) == 10 and len(data.train) == 20


def test_balanced_test_lacking_a_label_names_test_size(tmp_path: Path) -> None:
    rows = [(f"t{i}", "neg" if i < 28 else "pos", "s") for i in range(30)]
    err = _error(_custom(tmp_path, _write(tmp_path, "csv", rows), test_size=9))
    assert err.key == "data.test_size" and "data.test_size=9" in str(err)
    assert "'neutral'" in str(err)


def test_test_split_taking_everything_names_test_size(tmp_path: Path) -> None:
    path = _write(tmp_path, "csv")
    err = _error(_custom(tmp_path, path, test_size=30, balanced_test=False))
    assert err.key == "data.test_size" and "leaves no training examples" in str(err)
    err = _error(_custom(tmp_path, path, test_size=30))  # 10 per label = all 30 rows
    assert err.key == "data.test_size" and "leaves no training examples" in str(err)
    err = _error(_custom(tmp_path, path, test_size=2))  # < one per label
    assert err.key == "data.test_size"


# ----------------------------------------------------------------------------- custom


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_custom_formats_with_column_mapping_and_label_map(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, kind)
    data = load_data(_custom(tmp_path, path, group_column="source"), seed=0)
    _assert_frames(data)
    assert len(data.train) == 24 and len(data.test) == 6
    both = pd.concat([data.train, data.test])
    expected = {t: (["negative", "neutral", "positive"].index(LABEL_MAP[r]), s) for t, r, s in ROWS}
    got = {t: (lab, g) for t, lab, g in both.itertuples(index=False)}
    assert got == expected
    assert set(both["group"]) == {"web", "mail"}
    assert (tmp_path / "cache" / "datasets").is_dir()  # the datasets cache stays inside


def test_custom_without_group_column_has_empty_groups(tmp_path: Path) -> None:
    data = load_data(_custom(tmp_path, _write(tmp_path, "csv")), 0)
    assert set(data.train["group"]) == {""}


def test_custom_labels_as_names_or_indices_without_label_map(tmp_path: Path) -> None:
    names = [(f"t{i}", ["Negative", "neutral", "POSITIVE"][i % 3], "s") for i in range(30)]
    data = load_data(_custom(tmp_path, _write(tmp_path, "csv", names), label_map=None), 0)
    assert sorted(set(data.train["label"])) == [0, 1, 2]
    ints = [(f"t{i}", i % 3, "s") for i in range(30)]
    data = load_data(_custom(tmp_path, _write(tmp_path, "parquet", ints), label_map=None), 0)
    both = pd.concat([data.train, data.test])
    assert all(lab == int(t[1:]) % 3 for t, lab in zip(both["text"], both["label"]))


def test_custom_integer_labels_through_label_map(tmp_path: Path) -> None:
    rows = [(f"t{i}", i % 2, "s") for i in range(20)]
    data = load_data(
        _custom(
            tmp_path,
            _write(tmp_path, "jsonl", rows),
            task="yesno",
            test_size=4,
            label_map={"0": "yes", "1": "no"},
        ),
        0,
    )
    both = pd.concat([data.train, data.test])
    assert all(lab == 1 - int(t[1:]) % 2 for t, lab in zip(both["text"], both["label"]))
    assert data.task.name == "yesno"


def test_custom_folder_of_files(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(folder, "csv", ROWS[:12], name="a")
    _write(folder, "jsonl", ROWS[12:], name="b")
    (folder / "README.md").write_text("ignored")
    data = load_data(_custom(tmp_path, folder), 0)
    assert len(data.train) + len(data.test) == len(ROWS)


def test_custom_is_deterministic_given_seed(tmp_path: Path) -> None:
    rows = [(f"t{i}", ["neg", "neu", "pos"][i % 3], "s") for i in range(90)]
    cfg = _custom(tmp_path, _write(tmp_path, "csv", rows), test_size=9, max_train_examples=40)
    a, b, c = load_data(cfg, 7), load_data(cfg, 7), load_data(cfg, 8)
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert not a.test.equals(c.test)


# ------------------------------------------------------------------------ custom errors


def test_missing_file_names_data_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.csv")
    err = _error(_custom(tmp_path, missing))
    assert err.key == "data.path" and f"data.path={missing!r}" in str(err)
    assert "no such file" in str(err)


def test_hub_id_while_offline_names_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = _error(_custom(tmp_path, "someone/some-dataset"))
    assert str(err).startswith(
        "data.path='someone/some-dataset': not a local file and the "
        "hub is offline (HF_DATASETS_OFFLINE=1)"
    )


@pytest.mark.parametrize("content", ["", "sentence,tag,source\n"])
def test_empty_file_names_data_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(content)
    err = _error(_custom(tmp_path, path))
    assert err.key == "data.path" and str(path) in str(err) and "is empty" in str(err)


def test_empty_folder_and_unsupported_file_name_data_path(tmp_path: Path) -> None:
    folder = tmp_path / "void"
    folder.mkdir()
    assert _error(_custom(tmp_path, folder)).key == "data.path"
    xlsx = tmp_path / "sheet.xlsx"
    xlsx.write_text("x")
    err = _error(_custom(tmp_path, xlsx))
    assert err.key == "data.path" and "'.xlsx'" in str(err)


def test_unreadable_file_names_data_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"sentence": "a", "tag": \n')
    err = _error(_custom(tmp_path, path))
    assert err.key == "data.path" and "could not be read as JSONL" in str(err)


@pytest.mark.parametrize(
    ("key", "field", "value"),
    [
        ("data.text_column", "text_column", "body"),
        ("data.label_column", "label_column", "stars"),
        ("data.group_column", "group_column", "origin"),
    ],
)
def test_missing_column_names_the_key_and_lists_columns(
    tmp_path: Path, key: str, field: str, value: str
) -> None:
    err = _error(_custom(tmp_path, _write(tmp_path, "csv"), **{field: value}))
    assert err.key == key and f"{key}={value!r}" in str(err)
    assert "available columns: sentence, tag, source" in str(err)


def test_label_missing_from_label_map_names_label_map(tmp_path: Path) -> None:
    rows = ROWS + [("odd stuff", "mixed", "web")]
    err = _error(_custom(tmp_path, _write(tmp_path, "csv", rows)))
    assert err.key == "data.label_map" and "data.label_map=" in str(err)
    assert "'mixed'" in str(err)


def test_label_map_target_outside_task_names_label_map(tmp_path: Path) -> None:
    bad = {**LABEL_MAP, "neu": "meh"}
    err = _error(_custom(tmp_path, _write(tmp_path, "csv"), label_map=bad))
    assert err.key == "data.label_map" and "'meh'" in str(err) and "positive" in str(err)


def test_raw_label_outside_task_names_label_column(tmp_path: Path) -> None:
    err = _error(_custom(tmp_path, _write(tmp_path, "csv"), label_map=None))
    assert err.key == "data.label_column" and "data.label_column='tag'" in str(err)
    assert "'pos'" in str(err)  # the first bad value
    ints = [(f"t{i}", i % 4, "s") for i in range(20)]
    err = _error(_custom(tmp_path, _write(tmp_path, "csv", ints), label_map=None))
    assert err.key == "data.label_column" and "'3'" in str(err)


def test_missing_values_name_the_column(tmp_path: Path) -> None:
    path = tmp_path / "holes.csv"
    path.write_text("sentence,tag,source\na,pos,web\n,neg,web\nc,,web\n")
    err = _error(_custom(tmp_path, path))
    assert err.key == "data.text_column" and "row 1" in str(err)


# -------------------------------------------------------------------------- vader, cache


def test_vader_thresholds() -> None:
    ratings = np.array([-4.0, -1.0, -0.99, 0.0, 0.99, 1.0, 3.2])
    assert vader_labels(ratings).tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_vader_from_local_hutto_folder_and_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "hutto_ICWSM_2014"
    folder.mkdir()
    stems = ["tweets", "nytEditorialSnippets", "movieReviewSnippets", "amazonReviewSnippets"]
    for k, stem in enumerate(stems):
        lines = [
            f'{k}_{i}\t{r}\t{stem} text {i} with "quote\tand tab'
            for i, r in enumerate([-2.5, -1.0, 0.3, 0.0, 1.5, 2.0] * 4)
        ]
        (folder / f"{stem}_GroundTruth.txt").write_bytes("\r\n".join(lines).encode())
    cfg = DataConfig(recipe="vader", path=str(tmp_path), test_size=12)
    data = load_data(cfg, 0)
    _assert_frames(data)
    both = pd.concat([data.train, data.test])
    assert len(both) == 96
    assert set(both["group"]) == {"tweets", "nyt", "movies", "amazon"}
    assert np.bincount(both["label"]).tolist() == [32, 32, 32]
    assert any('"quote\tand tab' in t for t in both["text"])
    # the same rows from a vader.parquet
    table = tmp_path / "vader.parquet"
    pd.DataFrame({"text": both["text"], "rating": 0.0, "source": both["group"]}).to_parquet(table)
    data = load_data(dataclasses.replace(cfg, path=str(table), balanced_test=False), 0)
    assert len(data.train) + len(data.test) == 96
    err = _error(dataclasses.replace(cfg, path=str(tmp_path / "missing")))
    assert err.key == "data.path"


def test_vader_other_task_names_data_task() -> None:
    err = _error(DataConfig(recipe="vader", task="yesnomaybe"))
    assert err.key == "data.task"


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPLORA_RAY_CACHE", str(tmp_path / "env"))
    assert cache_dir(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_dir(DataConfig()) == tmp_path / "env"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("DPLORA_RAY_CACHE")
    assert cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "dplora_ray"


def test_vader_download_failure_is_one_line_naming_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from dplora_ray.data import loading

    def failed_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "vaderSentiment==3.3.2" in cmd
        return subprocess.CompletedProcess(
            cmd,
            1,
            "",
            "WARNING: x\nERROR: No matching distribution found for vaderSentiment==3.3.2\n",
        )

    monkeypatch.setattr(loading.subprocess, "run", failed_pip)
    err = _error(DataConfig(recipe="vader", cache_dir=str(tmp_path)))
    assert str(err).startswith(
        "data.recipe='vader': could not download "
        "vaderSentiment==3.3.2 from the package index (ERROR: No "
        "matching distribution"
    )
    assert "data.path" in str(err)
    assert not (tmp_path / "vader" / "vader.parquet").exists()


def test_vader_cache_is_written_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dplora_ray.data import loading

    calls = []

    def fake_download() -> pd.DataFrame:
        calls.append(1)
        return pd.DataFrame(
            {
                "text": [f"t{i}" for i in range(30)],
                "rating": np.tile([-2.0, 0.0, 2.0], 10),
                "source": ["tweets", "nyt", "movies"] * 10,
            }
        )

    monkeypatch.setattr(loading, "_download_vader", fake_download)
    cfg = DataConfig(recipe="vader", cache_dir=str(tmp_path), test_size=6)
    first = load_data(cfg, 0)
    second = load_data(cfg, 0)
    assert calls == [1]
    assert sorted(p.name for p in (tmp_path / "vader").iterdir()) == ["vader.parquet"]
    pd.testing.assert_frame_equal(first.train, second.train)
    assert np.bincount(first.test["label"]).tolist() == [2, 2, 2]
