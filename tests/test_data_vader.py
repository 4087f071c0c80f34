"""The real VADER corpora, fetched from PyPI (``vaderSentiment==3.3.2`` sdist).

Slow and needs the package index: it downloads into a temporary cache folder once per
test session and then reads the cached Parquet table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dplora_ray.config import DataConfig
from dplora_ray.data import load_data, partition_indices

pytestmark = pytest.mark.slow

SOURCES = {"tweets": 4200, "nyt": 5190, "movies": 10605, "amazon": 3708}


@pytest.fixture(scope="module")
def vader_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vader_cache")


def test_vader_download_sources_size_and_labels(vader_cache: Path) -> None:
    cfg = DataConfig(recipe="vader", cache_dir=str(vader_cache), test_size=300)
    data = load_data(cfg, seed=0)
    table = pd.read_parquet(vader_cache / "vader" / "vader.parquet")
    assert list(table.columns) == ["text", "rating", "source"]
    assert len(table) == sum(SOURCES.values()) == 23703
    assert table["source"].value_counts().to_dict() == SOURCES
    assert table["rating"].between(-4, 4).all()

    both = pd.concat([data.train, data.test])
    assert len(both) == 23703
    assert both.groupby("group").size().to_dict() == SOURCES
    shares = np.bincount(both["label"], minlength=3) / len(both)
    assert shares.min() > 0.25  # every class a real share, neutral included
    assert data.test["label"].value_counts().to_dict() == {0: 100, 1: 100, 2: 100}
    # disjoint splits: a text in both is one of the corpus' 84 repeated texts
    repeated = set(both["text"][both["text"].duplicated()])
    assert (set(data.test["text"]) & set(data.train["text"])) <= repeated


def test_vader_cache_is_reused_and_natural_partition_gives_four_clients(vader_cache: Path) -> None:
    cfg = DataConfig(recipe="vader", cache_dir=str(vader_cache), max_train_examples=4000)
    first = load_data(cfg, seed=3)
    again = load_data(cfg, seed=3)
    pd.testing.assert_frame_equal(first.train, again.train)
    assert len(first.train) == 4000
    parts = partition_indices(
        first.train["label"].to_numpy(), first.train["group"].to_numpy(), 4, "natural", seed=3
    )
    assert [sorted(set(first.train["group"].to_numpy()[p])) for p in parts] == [
        ["amazon"],
        ["movies"],
        ["nyt"],
        ["tweets"],
    ]
