"""``dplora-ray train`` end to end on the tiny config: result files and their schema, the
adapter, the actors backend (on the session's Ray), each privacy mode, and bad input
(exit code 2, one line on stderr, no output folder)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from dplora_ray import results as R
from dplora_ray.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
FILES = {
    "config.yaml",
    "rounds.parquet",
    "clients.parquet",
    "summary.json",
    "ledger.json",
    "adapter",
}
ROUND_NAMES = {
    "server_round",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_f1_macro",
    "num_clients_sampled",
    "num_clients_completed",
    "bytes_up",
    "bytes_down",
    "round_seconds",
    "epsilon",
}
CLIENT_NAMES = {
    "server_round",
    "client_id",
    "num_examples",
    "train_loss",
    "update_norm",
    "bytes_up",
    "seconds",
}
SUMMARY_NAMES = {
    "eval_accuracy_before",
    "eval_accuracy",
    "eval_f1_macro",
    "epsilon",
    "rounds_completed",
    "stop_reason",
    "bytes_up_total",
    "bytes_down_total",
    "wall_seconds",
}
ROUNDS, PER_ROUND = 3, 3  # configs/tiny.yaml (fixed cohorts without privacy)
TRAINABLE_BYTES = 896 * 4  # LoRA r=4 on q_proj, v_proj of tiny-llama, float32


def _train(out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> int:
    argv = ["train", TINY, "--out", str(out), "--no-progress", *extra]
    for o in overrides:
        argv += ["--set", o]
    return main(argv)


def _load(out: Path) -> dict[str, Any]:
    return R.load_run(out)


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inline") / "run"
    assert _train(out, "runtime.backend=inline") == 0
    return out


# --------------------------------------------------------------------------- results
def test_train_writes_every_result_file(inline_run: Path) -> None:
    assert {p.name for p in inline_run.iterdir()} >= FILES
    assert (inline_run / "adapter" / "adapter_config.json").is_file()
    assert (inline_run / "adapter" / "adapter_model.safetensors").is_file()


def test_result_columns_follow_the_schema(inline_run: Path) -> None:
    # Execute
    run = _load(inline_run)
    rounds, clients = run["rounds"], run["clients"]

    # Assert
    assert tuple(rounds.columns) == R.ROUND_COLUMNS
    assert tuple(clients.columns) == R.CLIENT_COLUMNS
    assert ROUND_NAMES <= set(rounds.columns)
    assert CLIENT_NAMES <= set(clients.columns)
    assert SUMMARY_NAMES <= set(run["summary"])
    assert set(R.SUMMARY_KEYS) <= set(run["summary"])


def test_round_and_client_rows(inline_run: Path) -> None:
    # Execute
    run = _load(inline_run)
    rounds, clients, summary = run["rounds"], run["clients"], run["summary"]

    # Assert
    assert rounds["server_round"].tolist() == [1, 2, 3]
    assert rounds["num_clients_sampled"].tolist() == [PER_ROUND] * ROUNDS
    assert rounds["num_clients_completed"].tolist() == [PER_ROUND] * ROUNDS
    assert len(clients) == ROUNDS * PER_ROUND
    assert (clients["status"] == "ok").all()
    assert (clients["bytes_up"] == TRAINABLE_BYTES).all()
    per_round = clients.groupby("server_round")["bytes_up"].sum()
    assert rounds.set_index("server_round")["bytes_up"].equals(per_round)
    assert rounds["bytes_down"].tolist() == [PER_ROUND * TRAINABLE_BYTES] * ROUNDS
    assert rounds["epsilon"].isna().all()  # no privacy
    assert rounds["eval_accuracy"].between(0, 1).all()
    assert summary["rounds_completed"] == ROUNDS
    assert summary["stop_reason"] == "completed"
    assert summary["epsilon"] is None
    assert summary["bytes_up_total"] == int(rounds["bytes_up"].sum())
    assert summary["bytes_down_total"] == int(rounds["bytes_down"].sum())
    assert summary["eval_accuracy"] == pytest.approx(rounds["eval_accuracy"].iloc[-1])
    assert summary["wall_seconds"] > 0


def test_resolved_config_is_written(inline_run: Path) -> None:
    from dplora_ray.config import load_config

    # Execute
    written = load_config(inline_run / "config.yaml")

    # Assert
    assert written == load_config(TINY, ["runtime.backend=inline"])


def test_adapter_loads_with_peft(inline_run: Path) -> None:
    from peft import PeftModel

    from dplora_ray.config import ModelConfig
    from dplora_ray.models import load_base_model, lora_state

    # Prepare
    base, _ = load_base_model(ModelConfig(name="tiny-llama"))
    saved = _adapter_tensors(inline_run / "adapter")

    # Execute
    model = PeftModel.from_pretrained(base, str(inline_run / "adapter"))
    loaded = lora_state(model, trainable_only=False)

    # Assert: every saved tensor was loaded, and training moved B away from zero
    assert sorted(saved) == list(loaded) and len(loaded) == 8
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    assert all(bool((v != 0).any()) for k, v in loaded.items() if ".lora_B." in k)


@pytest.mark.ray
def test_actors_backend_matches_inline(ray_session: Any, inline_run: Path, tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "actors"

    # Execute
    rc = _train(
        out, "runtime.backend=actors", "runtime.num_workers=2", "runtime.cpus_per_worker=0.5"
    )

    # Assert
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= FILES
    run, ref = _load(out), _load(inline_run)
    assert tuple(run["rounds"].columns) == R.ROUND_COLUMNS
    assert tuple(run["clients"].columns) == R.CLIENT_COLUMNS
    assert set(run["clients"]["worker"]) == {0, 1}
    # clients' seeds depend on (seed, round, client) only and updates are summed in
    # client order, so the backend does not change the result
    keys = ["server_round", "client_id"]
    for col in ("train_loss", "update_norm", "bytes_up"):
        a = run["clients"].sort_values(keys)[col].tolist()
        b = ref["clients"].sort_values(keys)[col].tolist()
        assert a == b, col
    got, want = _adapter_tensors(out / "adapter"), _adapter_tensors(inline_run / "adapter")
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert ray_session.is_initialized()  # the session's Ray is still up


# --------------------------------------------------------------------------- privacy
@pytest.mark.parametrize("mode", ["dpsgd", "paper", "client", "local"])
def test_each_privacy_mode_completes_with_finite_epsilon(tmp_path: Path, mode: str) -> None:
    # Prepare
    out = tmp_path / mode

    # Execute
    rc = _train(out, "runtime.backend=inline", f"privacy.mode={mode}")

    # Assert
    assert rc == 0
    run = _load(out)
    eps = run["rounds"]["epsilon"].tolist()
    assert len(eps) == ROUNDS
    assert all(math.isfinite(e) and e > 0 for e in eps), eps
    assert eps == sorted(eps)  # spending only grows
    assert eps[-1] <= 8.0 * (1 + 1e-9)  # privacy.target_epsilon in tiny.yaml
    summary = run["summary"]
    assert summary["privacy_mode"] == mode
    assert summary["epsilon"] == pytest.approx(eps[-1])
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["entries"], "the ledger records what was spent"


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("lora.r=0",), "lora.r=0"),
        (("privacy.delt=1",), "privacy.delt=1"),
        (("runtime.backend=foo",), "runtime.backend='foo'"),
        (("runtime.backend=inline", "model.name=./nope"), "model.name='./nope'"),
        # checked against the data: delta must be below 1/n (largest client: 67 examples)
        (
            ("runtime.backend=inline", "privacy.mode=dpsgd", "privacy.delta=0.1"),
            "privacy.delta=0.1",
        ),
    ],
    ids=["range", "unknown-key", "literal", "model", "delta-vs-data"],
)
def test_bad_input_exits_2_with_one_line_and_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: tuple[str, ...], named: str
) -> None:
    # Prepare
    out = tmp_path / "run"

    # Execute
    rc = _train(out, *overrides)

    # Assert
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"dplora-ray: error: {named}: "), err
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    missing = tmp_path / "nope.yaml"
    out = tmp_path / "run"

    # Execute
    rc = main(["train", str(missing), "--out", str(out), "--no-progress"])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"dplora-ray: error: config={str(missing)!r}: no such file\n"
    assert not out.exists()


def test_non_empty_output_folder_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")

    # Execute
    rc = _train(out, "runtime.backend=inline")

    # Assert
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1
    assert err.startswith(f"dplora-ray: error: --out={str(out)!r}: exists and is not empty")
    assert "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as info:
        main(["train"])

    # Assert
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_rounds_dataframe_helpers_are_pandas(inline_run: Path) -> None:
    run = _load(inline_run)
    assert isinstance(run["rounds"], pd.DataFrame)
    assert run["rounds"]["server_round"].dtype == "int64"
