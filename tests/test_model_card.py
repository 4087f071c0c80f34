"""The privacy model card beside every adapter (issue 21): ``adapter/README.md`` in the
Hugging Face model card format, written from the same values as ``summary.json``.

Runs: the tiny model on the inline backend, one round (a few seconds each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

from dplora_ray.config import load_config
from dplora_ray.federated.runner import run_experiment
from dplora_ray.model_card import (
    SMOLLM2_HUB_ID,
    base_model_id,
    card_datasets,
    model_card,
    write_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ("runtime.backend=inline", "federation.rounds=1")
DP_TAGS = {"differential-privacy", "federated-learning", "lora"}


def _run(out: Path, *overrides: str) -> dict[str, Any]:
    cfg = load_config(TINY, [*FAST, *overrides])
    run_experiment(cfg, out, progress=False, log=lambda m: None)
    return json.loads((out / "summary.json").read_text())


def _card(out: Path, folder: str = "adapter") -> ModelCard:
    return ModelCard.load(out / folder / "README.md")


@pytest.fixture(scope="module")
def dpsgd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("card") / "dpsgd"
    _run(out, "privacy.mode=dpsgd")
    return out


# --------------------------------------------------------------------------- real runs
def test_private_run_card_parses_and_states_the_summary_epsilon(dpsgd_run: Path) -> None:
    # Execute
    card = _card(dpsgd_run)
    summary = json.loads((dpsgd_run / "summary.json").read_text())
    meta = card.data.to_dict()
    privacy = meta["dplora_ray"]["privacy"]

    # Assert: Hugging Face metadata
    assert meta["base_model"] == "tiny-llama"
    assert meta["library_name"] == "peft"
    assert DP_TAGS <= set(meta["tags"]) and "dplora_ray" in meta["tags"]
    assert "datasets" not in meta  # synthetic data: no hub id
    # the same epsilon, delta and unit as summary.json, exactly
    assert isinstance(summary["epsilon"], float) and summary["epsilon"] > 0
    assert privacy["epsilon"] == summary["epsilon"]
    assert privacy["delta"] == summary["delta"]
    assert privacy["unit"] == summary["privacy_unit"] == "example"
    assert privacy["private"] is True and privacy["mode"] == "dpsgd"
    assert privacy["accountant"] == summary["accountant"]
    assert repr(summary["epsilon"]) in card.text
    assert "one training example of one client" in card.text
    assert "Papernot & Steinke 2022" in card.text and "pretraining data" in card.text
    assert "PeftModel.from_pretrained" in card.text
    assert "NO differential-privacy guarantee" not in card.text


def test_card_sits_beside_the_adapter_files(dpsgd_run: Path) -> None:
    adapter = dpsgd_run / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "dplora_ray.json"]
    assert not list(adapter.glob(".*"))  # no temporary file left


def test_non_private_run_card_says_there_is_no_guarantee(tmp_path: Path) -> None:
    # Execute
    summary = _run(tmp_path / "plain")
    card = _card(tmp_path / "plain")
    privacy = card.data.to_dict()["dplora_ray"]["privacy"]

    # Assert
    assert summary["epsilon"] is None
    assert "NO differential-privacy guarantee" in card.text
    assert privacy["private"] is False and privacy["epsilon"] is None
    assert privacy["unit"] == summary["privacy_unit"] == "none"
    assert "differential-privacy" not in card.data.tags  # no DP tag without DP
    assert {"federated-learning", "lora"} <= set(card.data.tags)


def test_client_level_run_card_protects_a_whole_client(tmp_path: Path) -> None:
    # Execute
    summary = _run(tmp_path / "client", "privacy.mode=client")
    card = _card(tmp_path / "client")
    privacy = card.data.to_dict()["dplora_ray"]["privacy"]

    # Assert
    assert privacy["unit"] == summary["privacy_unit"] == "client"
    assert privacy["epsilon"] == summary["epsilon"]
    assert "one whole client" in card.text
    assert "server is trusted" in card.text  # DP-FedAvg: the server sees clipped updates


def test_rebuilt_finished_run_gets_the_card_with_the_kept_epsilon(
        dpsgd_run: Path, tmp_path: Path) -> None:
    # Prepare: a finished run that lost its adapter folder
    out = tmp_path / "rebuilt"
    shutil.copytree(dpsgd_run, out)
    shutil.rmtree(out / "adapter")
    kept = json.loads((out / "summary.json").read_text())
    cfg = load_config(out / "config.yaml")

    # Execute
    summary = run_experiment(cfg, out, resume=True, progress=False, log=lambda m: None)

    # Assert
    privacy = _card(out).data.to_dict()["dplora_ray"]["privacy"]
    assert summary == kept
    assert privacy["epsilon"] == kept["epsilon"]


def test_full_model_run_gets_a_transformers_card(tmp_path: Path) -> None:
    # full fine-tuning is a non-private baseline only
    summary = _run(tmp_path / "full", "federation.strategy=full")
    card = _card(tmp_path / "full", "model")
    assert card.data.library_name == "transformers" and "lora" not in card.data.tags
    assert summary["epsilon"] is None and "NO differential-privacy guarantee" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text
    assert not (tmp_path / "full" / "adapter").exists()


# --------------------------------------------------------------------------- the text
def _summary(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "epsilon": 2.718281828459045, "delta": 1e-5, "privacy_mode": "dpsgd",
        "privacy_unit": "example", "accountant": "rdp", "noise_multiplier": 1.25,
        "effective_noise_multiplier": 1.25, "planned_epsilon": 2.7,
        "noise_reproducible": False, "rounds_completed": 2, "rounds_planned": 2,
        "stop_reason": "completed", "task_type": "classification",
        "eval_accuracy_before": 0.3, "eval_accuracy": 0.6, "num_train_examples": 400,
        "num_test_examples": 60, "trainable_parameters": 1024,
        "audit_epsilon_lower_bound": None,
    }
    base.update(over)
    return base


LEDGER = {"entries": [
    {"unit": "client-0", "server_round": 1, "noise_multiplier": 1.25,
     "sampling_rate": 0.125, "steps": 3, "note": ""},
    {"unit": "client-1", "server_round": 1, "noise_multiplier": 1.25,
     "sampling_rate": 0.12, "steps": 3, "note": ""},
    {"unit": "client-0", "server_round": 2, "noise_multiplier": 1.25,
     "sampling_rate": 0.125, "steps": 3, "note": ""},
]}


def _parse(text: str, tmp_path: Path) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def test_text_states_ledger_facts_and_recipe(tmp_path: Path) -> None:
    # Prepare
    cfg = load_config(TINY, ["privacy.mode=dpsgd", "lora.train_a=false"])

    # Execute
    text = model_card(_summary(), LEDGER, cfg)
    card = _parse(text, tmp_path)

    # Assert
    assert card.data.to_dict()["dplora_ray"]["privacy"]["epsilon"] == 2.718281828459045
    assert "| sampling rate(s) in the ledger | 0.12, 0.125 |" in text
    assert "| accounted steps (most charged unit) | 6 |" in text
    assert "| rounds charged (most charged unit) | 2 |" in text
    assert "| clipping bound C | 1 |" in text
    assert "FFA-LoRA" in text and "| LoRA rank r, alpha | 4, 8 |" in text
    assert "| local steps per round | 3 |" in text and "| batch size | 8 |" in text
    assert "Empirical audit" not in text


def test_text_reports_the_audit_lower_bound(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["privacy.mode=dpsgd"])
    text = model_card(_summary(audit_epsilon_lower_bound=0.42, audit_passed=True,
                               audit_epsilon_compared=2.7), LEDGER, cfg)
    assert "empirical epsilon lower bound is 0.42" in text and "(passed)" in text
    assert _parse(text, tmp_path).data.to_dict()["dplora_ray"]["privacy"][
        "audit_epsilon_lower_bound"] == 0.42


def test_reproducible_noise_is_not_private(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["privacy.mode=dpsgd", "privacy.noise_seed=7"])
    text = model_card(_summary(noise_reproducible=True), LEDGER, cfg)
    assert "**NOT private.**" in text and "noise_seed" in text
    assert _parse(text, tmp_path).data.to_dict()["dplora_ray"]["privacy"]["private"] is False


def test_infinite_epsilon_is_written_as_summary_json_writes_it(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["privacy.mode=dpsgd"])
    text = model_card(_summary(epsilon=float("inf")), LEDGER, cfg)
    assert _parse(text, tmp_path).data.to_dict()["dplora_ray"]["privacy"]["epsilon"] == "inf"


def test_base_model_ids(tmp_path: Path) -> None:
    folder = tmp_path / "my-checkpoint"
    folder.mkdir()
    assert base_model_id("smollm2-135m")[::2] == (SMOLLM2_HUB_ID, True)
    assert base_model_id("tiny-llama")[0] == "tiny-llama"
    assert "randomly initialised" in base_model_id("tiny-llama")[1]
    assert base_model_id(str(folder))[::2] == ("my-checkpoint", False)
    assert base_model_id("org/some-model")[::2] == ("org/some-model", True)


def test_smollm2_card_names_the_hub_model_and_licence(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["privacy.mode=dpsgd", "model.name=smollm2-135m"])
    card = _parse(model_card(_summary(), LEDGER, cfg), tmp_path)
    assert card.data.base_model == SMOLLM2_HUB_ID and card.data.license == "apache-2.0"
    assert f'from_pretrained("{SMOLLM2_HUB_ID}")' in card.text


def test_datasets_of_recipes() -> None:
    fpb = load_config(TINY, ["data.recipe=fpb", "data.task=fin_sentiment"])
    assert card_datasets(fpb)[0] == ["takala/financial_phrasebank"]
    assert card_datasets(fpb)[2] == "CC BY-NC-SA 3.0"
    custom = load_config(TINY, ["data.recipe=custom", "data.path=someone/their-data"])
    assert card_datasets(custom)[0] == ["someone/their-data"]
    assert card_datasets(load_config(TINY))[0] == []  # synthetic


def test_write_model_card_is_one_atomic_file(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    path = write_model_card(tmp_path, _summary(privacy_mode="none", privacy_unit="none",
                                               epsilon=None, delta=None), None, cfg)
    assert path == tmp_path / "README.md" and [p.name for p in tmp_path.iterdir()] == [
        "README.md"]
    assert path.read_text().startswith("---\n")
