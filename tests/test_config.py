"""Configs: defaults, YAML + ``--set`` overrides, round trips, and one-line errors that
name the dotted key and the bad value."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest

from dplora_ray.config import (
    ExperimentConfig,
    LoraSection,
    PrivacyConfig,
    all_keys,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from dplora_ray.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


# --------------------------------------------------------------------------- valid configs
def test_defaults_are_valid() -> None:
    # Execute
    cfg = ExperimentConfig()

    # Assert
    assert cfg.privacy.mode == "none"
    assert cfg.privacy.budget is None
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.federation.clients_per_round <= cfg.federation.num_clients
    assert load_config(None) == cfg


def test_yaml_file_is_loaded() -> None:
    # Execute
    cfg = load_config(TINY)

    # Assert: values written in configs/tiny.yaml
    assert cfg.model.name == "tiny-llama"
    assert cfg.model.max_length == 48
    assert cfg.lora.r == 4
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)  # int -> float
    assert cfg.federation.num_clients == 6
    assert cfg.privacy.delta == 1e-3
    assert cfg.privacy.target_epsilon == 8.0
    assert cfg.runtime.cpus_per_worker == 0.5


def test_set_overrides_are_parsed_as_typed_yaml_values() -> None:
    # Prepare
    overrides = [
        "federation.rounds=5",  # int
        "federation.learning_rate=0.05",  # float
        "privacy.delta=1e-6",  # float in scientific notation (plain YAML reads a string)
        "lora.target_modules=[q_proj, k_proj, v_proj]",  # list -> tuple
        "lora.train_a=false",  # bool
        "data.max_train_examples=null",  # null
        "privacy.target_epsilon=",  # empty -> None
        "privacy.noise_multiplier=0.8",
        "runtime.backend=inline",  # Literal
        "seed=7",
    ]

    # Execute
    cfg = load_config(TINY, overrides)

    # Assert
    assert cfg.federation.rounds == 5
    assert cfg.federation.learning_rate == 0.05
    assert cfg.privacy.delta == 1e-6
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.lora.train_a is False
    assert cfg.data.max_train_examples is None
    assert cfg.privacy.target_epsilon is None
    assert cfg.privacy.noise_multiplier == 0.8
    assert cfg.runtime.backend == "inline"
    assert cfg.seed == 7
    assert cfg.model.name == "tiny-llama"  # untouched keys keep the file's values


def test_scientific_notation_in_yaml_file_is_a_number(tmp_path: Path) -> None:
    # Prepare: PyYAML reads "1e-5" (no dot) as a string
    path = tmp_path / "sci.yaml"
    path.write_text("privacy:\n  delta: 1e-5\nfederation:\n  learning_rate: 5E-3\n")

    # Execute
    cfg = load_config(path)

    # Assert
    assert cfg.privacy.delta == 1e-5
    assert cfg.federation.learning_rate == 5e-3


def test_override_value_may_contain_equals_sign() -> None:
    # Execute: only the first "=" separates key and value
    cfg = load_config(None, ["model.name=./models/a=b"])

    # Assert
    assert cfg.model.name == "./models/a=b"


def test_typed_mapping_overrides() -> None:
    # Execute: sweeps pass already-typed values
    cfg = load_config(TINY, {"lora.r": 16, "privacy.delta": 1e-4, "seed": 3})

    # Assert
    assert (cfg.lora.r, cfg.privacy.delta, cfg.seed) == (16, 1e-4, 3)


def test_apply_overrides_does_not_mutate_input() -> None:
    # Prepare
    raw = {"lora": {"r": 4}}

    # Execute
    out = apply_overrides(raw, ["lora.r=8"])

    # Assert
    assert raw == {"lora": {"r": 4}}
    assert out == {"lora": {"r": 8}}


def test_all_keys_are_dotted_and_cover_every_section() -> None:
    keys = all_keys()
    assert "seed" in keys
    assert {"privacy.delta", "lora.train_a", "runtime.backend", "federation.rounds"} <= set(keys)


# --------------------------------------------------------------------------- round trips
def _nondefault() -> ExperimentConfig:
    return load_config(
        TINY,
        [
            "lora.train_a=false",
            "privacy.mode=dpsgd",
            "data.label_map={a: negative, b: positive}",
            "seed=11",
        ],
    )


def test_dict_round_trip() -> None:
    # Prepare
    cfg = _nondefault()

    # Execute
    back = config_from_dict(config_to_dict(cfg))

    # Assert
    assert back == cfg
    assert isinstance(config_to_dict(cfg)["lora"]["target_modules"], list)  # YAML-safe


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    # Prepare
    cfg = _nondefault()

    # Execute
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")

    # Assert
    assert back == cfg


def test_copy_and_pickle_round_trip() -> None:
    # Prepare
    cfg = _nondefault()

    # Execute / Assert
    assert copy.copy(cfg) == cfg
    assert copy.deepcopy(cfg) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_config_error_survives_pickling() -> None:
    # Prepare
    err = ConfigError("privacy.delta", 1.5, "must be in (0, 1)")

    # Execute
    back = pickle.loads(pickle.dumps(err))

    # Assert
    assert type(back) is ConfigError
    assert (back.key, back.value, back.reason) == ("privacy.delta", 1.5, "must be in (0, 1)")
    assert str(back) == "privacy.delta=1.5: must be in (0, 1)"


def test_configs_are_frozen() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(AttributeError):
        cfg.lora.r = 2  # type: ignore[misc]


def test_budget_defaults_to_target_epsilon() -> None:
    assert PrivacyConfig(mode="dpsgd", target_epsilon=3.0).budget == 3.0
    assert PrivacyConfig(mode="dpsgd", target_epsilon=3.0, max_epsilon=4.0).budget == 4.0


# --------------------------------------------------------------------------- bad values
# (config file or None, overrides, the dotted key and the value text the error must name)
INVALID: list[tuple[Path | None, Any, str, str]] = [
    (TINY, ["lora.r=2.5"], "lora.r", "2.5"),
    (TINY, {"lora.train_a": "yes"}, "lora.train_a", "'yes'"),
    (TINY, ["lora.train_a=1"], "lora.train_a", "1"),
    (TINY, ["federation.rounds=true"], "federation.rounds", "True"),
    (TINY, ["federation.learning_rate=fast"], "federation.learning_rate", "'fast'"),
    (TINY, ["lora.target_modules={a: 1}"], "lora.target_modules", "{'a': 1}"),
    (TINY, ["privacy.delta=0"], "privacy.delta", "0.0"),
    (TINY, ["privacy.delta=1.5"], "privacy.delta", "1.5"),
    (TINY, ["privacy.target_epsilon=0"], "privacy.target_epsilon", "0.0"),
    (TINY, ["privacy.target_epsilon=-2"], "privacy.target_epsilon", "-2.0"),
    (TINY, ["lora.r=0"], "lora.r", "0"),
    (TINY, ["lora.alpha=-1"], "lora.alpha", "-1.0"),
    (TINY, ["lora.dropout=1.0"], "lora.dropout", "1.0"),
    (TINY, ["lora.target_modules=[]"], "lora.target_modules", "[]"),
    (TINY, ["federation.clients_per_round=7"], "federation.clients_per_round", "7"),
    (TINY, ["federation.num_clients=0"], "federation.num_clients", "0"),
    (TINY, ["privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier", "-0.5"),
    (TINY, ["privacy.clipping_norm=0"], "privacy.clipping_norm", "0.0"),
    (TINY, ["privacy.max_epsilon=0"], "privacy.max_epsilon", "0.0"),
    (TINY, ["model.max_length=4"], "model.max_length", "4"),
    (TINY, ["runtime.cpus_per_worker=0"], "runtime.cpus_per_worker", "0.0"),
    (TINY, ["seed=-1"], "seed", "-1"),
    # both target_epsilon (8.0 in tiny.yaml) and noise_multiplier in a private mode
    (
        TINY,
        ["privacy.mode=dpsgd", "privacy.noise_multiplier=1.0"],
        "privacy.noise_multiplier",
        "1.0",
    ),
    # a private mode with neither
    (None, ["privacy.mode=paper"], "privacy.target_epsilon", "None"),
    (TINY, ["runtime.backend=foo"], "runtime.backend", "'foo'"),
    (TINY, ["privacy.mode=dp"], "privacy.mode", "'dp'"),
    (TINY, ["federation.transfer_dtype=int8"], "federation.transfer_dtype", "'int8'"),
    (TINY, ["data.recipe=custom"], "data.path", "None"),
    (
        TINY,
        ["data.recipe=custom", "data.path=x.csv", "federation.partition=natural"],
        "data.group_column",
        "None",
    ),
    (TINY, ["nosuch.key=1"], "nosuch.key", "1"),
    (TINY, ["lora.r"], "--set", "'lora.r'"),
]


@pytest.mark.parametrize(
    ("path", "overrides", "key", "value"),
    INVALID,
    ids=[f"{c[2]}-{i}" for i, c in enumerate(INVALID)],
)
def test_invalid_value_names_key_and_value(
    path: Path | None, overrides: Any, key: str, value: str
) -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)

    # Assert: one line "key=value: reason"
    msg = str(info.value)
    assert info.value.key == key
    assert msg.startswith(f"{key}={value}: "), msg
    assert "\n" not in msg


def test_unknown_key_suggests_the_closest_key() -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["privacy.delt=1"])

    # Assert
    msg = str(info.value)
    assert msg.startswith("privacy.delt=1: unknown key")
    assert "did you mean 'privacy.delta'?" in msg


def test_unknown_key_in_yaml_file_suggests_the_closest_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 4\n")

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Assert
    assert str(info.value).startswith("lora.rank=4: unknown key")
    assert "'lora.r'" in str(info.value)


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "nope.yaml"

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(missing)

    # Assert
    assert info.value.key == "config"
    assert str(missing) in str(info.value)
    assert "no such file" in str(info.value)


@pytest.mark.parametrize("text", ["lora: [r: 4\n", "model:\n  name: a\n b: 2\n"])
def test_invalid_yaml_is_a_one_line_config_error(tmp_path: Path, text: str) -> None:
    # Prepare
    path = tmp_path / "broken.yaml"
    path.write_text(text)

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Assert
    assert info.value.key == "config"
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_section_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lora": 4})
    assert str(info.value).startswith("lora=4: ")


def test_constructor_validates_without_yaml() -> None:
    with pytest.raises(ConfigError, match=r"^lora\.r=0: "):
        LoraSection(r=0)
