"""Robustness of the command line against bad input (issue 15, classes 1, 6, 7 and 8):
every case ends with exit code 2 and ONE line on stderr, ``dplora-ray: error: KEY=VALUE:
reason``, naming the key (or the file) and the value; no traceback; no output folder.

* class 1, errors inside a worker: a model folder without weights, LoRA target modules
  the model lacks, a truncated weights file, weights whose shapes do not match the
  config; checked by the driver before any worker starts, and a worker's own error
  carried back across Ray as the same one line (the ``actors`` backend);
* class 6, files read outside the error handling: binary or unreadable YAML configs and
  sweep files, a run folder's binary ``config.yaml``, a model ``config.json`` that is not
  a JSON object, truncated ``model.safetensors``, corrupt ``summary.json`` /
  ``rounds.parquet`` / ``sweep.parquet`` given to ``analyze``, data files that are not
  UTF-8;
* class 7, values that cannot work: non-finite ``lora.alpha``,
  ``federation.server_learning_rate``, ``runtime.cpus_per_worker``; seeds outside
  [0, 2**63); ``privacy.max_epsilon`` below one round's cost; ``model.max_length`` past
  the model's context; vanishing noise multipliers; sweep ``randint`` bounds past int64;
  absurd counts (documented limits in :mod:`dplora_ray.config.checks`);
* class 8, silent surprises: empty config files, keys given twice, true/false labels,
  empty texts (dropped with a warning line, refused when nothing is left), list-valued
  texts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from dplora_ray.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
INLINE = "runtime.backend=inline"


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _train(config: str, *overrides: str, inline: bool = True) -> list[str]:
    return ["train", config, *_sets(*((INLINE,) if inline else ()), *overrides)]


def _custom(path: Path) -> list[str]:
    return _train(TINY, "data.recipe=custom", f"data.path={path}")


# --------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def tiny_model() -> Path:
    """The tiny-llama preset's checkpoint folder (built once into the cache)."""
    from dplora_ray.config import ModelConfig
    from dplora_ray.models import prepare_model

    return Path(prepare_model(ModelConfig(name="tiny-llama")))


def _model_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    d = tmp_path_factory.mktemp("robust")
    # YAML configs and sweep files
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00model:\x80\x81\n")
    (d / "empty.yaml").write_text("")
    (d / "comments.yaml").write_text("# nothing but a comment\n\n")
    (d / "dup_top.yaml").write_text("federation:\n  rounds: 2\nseed: 1\nfederation:\n"
                                    "  rounds: 3\n")
    (d / "dup_nested.yaml").write_text("model:\n  name: tiny-llama\nfederation:\n"
                                       "  rounds: 2\n  rounds: 3\n")
    (d / "sweep_dup.yaml").write_text(f"base: {TINY}\nnum_samples: 2\nnum_samples: 3\n")
    (d / "sweep_randint.yaml").write_text(
        f"base: {TINY}\nspace:\n  seed: {{randint: [0, 99999999999999999999]}}\n")
    (d / "sweep_samples.yaml").write_text(f"base: {TINY}\nnum_samples: 1000000\n")
    (d / "sweep_grid.yaml").write_text(
        f"base: {TINY}\nnum_samples: 1001\nspace:\n  lora.r: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
        "  seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n")
    # data files
    (d / "bad_bytes.csv").write_bytes(b"text,label\n\"good \xff\xfe\",positive\nbad,negative\n")
    (d / "bad_bytes.json").write_bytes(
        b'[{"text": "good \xff", "label": "positive"}, {"text": "bad", "label": "negative"}]')
    (d / "bool_labels.json").write_text(json.dumps(
        [{"text": "good", "label": True}, {"text": "bad", "label": False}]))
    (d / "bool_labels.csv").write_text("text,label\ngood,True\nbad,False\n")
    (d / "all_empty.json").write_text(json.dumps(
        [{"text": "", "label": "positive"}, {"text": "   ", "label": "negative"}]))
    (d / "list_texts.json").write_text(json.dumps(
        [{"text": ["a", "b"], "label": "positive"}, {"text": ["c"], "label": "negative"}]))
    # model folders
    (_model_copy(tiny_model, d / "no_weights") / "model.safetensors").unlink()
    weights = (tiny_model / "model.safetensors").read_bytes()
    (_model_copy(tiny_model, d / "cut_header") / "model.safetensors").write_bytes(weights[:6])
    (_model_copy(tiny_model, d / "cut_data") / "model.safetensors").write_bytes(weights[:-100])
    (_model_copy(tiny_model, d / "config_list") / "config.json").write_text("[1, 2]\n")
    (_model_copy(tiny_model, d / "config_broken") / "config.json").write_text('{"model_type"')
    wide = _model_copy(tiny_model, d / "wide")  # weights that do not fit its config.json
    config = json.loads((wide / "config.json").read_text())
    config["intermediate_size"] = 2 * config["intermediate_size"]
    (wide / "config.json").write_text(json.dumps(config))
    # analyze: a run folder with one damaged file each, and a damaged sweep table
    for name in ("bad_summary", "bad_rounds"):
        run = d / name
        run.mkdir()
        pd.DataFrame({"server_round": [1]}).to_parquet(run / "rounds.parquet")
        pd.DataFrame({"server_round": [1]}).to_parquet(run / "clients.parquet")
        (run / "summary.json").write_text('{"stop_reason": "completed"}')
    (d / "bad_summary" / "summary.json").write_text('{"stop_reason": "comple')
    (d / "bad_rounds" / "rounds.parquet").write_bytes(b"PAR1 cut short")
    (d / "bad_sweep").mkdir()
    (d / "bad_sweep" / "sweep.parquet").write_bytes(b"not parquet")
    return d


# --------------------------------------------------------------------------- cases
#: id -> (argv given the inputs folder, start of the message after "dplora-ray: error: ")
Case = tuple[Callable[[Path], list[str]], Callable[[Path], str]]
CASES: dict[str, Case] = {
    # ---- class 1: what a worker would fail on, checked by the driver first (inline)
    "model-without-weights": (
        lambda f: _train(TINY, f"model.name={f / 'no_weights'}"),
        lambda f: f"model.name='{f / 'no_weights'}': folder holds no weights"),
    "lora-target-module-missing": (
        lambda f: _train(TINY, "lora.target_modules=[q_proj, qkv_proj]"),
        lambda f: "lora.target_modules=['q_proj', 'qkv_proj']: module 'qkv_proj' not found "
                  "in the model"),
    # ---- class 6: files
    "config-binary": (lambda f: _train(str(f / "binary.yaml")),
                      lambda f: f"config='{f / 'binary.yaml'}': is not a UTF-8 text file "
                                "(byte 0xff at offset 0)"),
    "sweep-binary": (lambda f: ["sweep", str(f / "binary.yaml")],
                     lambda f: f"sweep='{f / 'binary.yaml'}': is not a UTF-8 text file"),
    "model-config-json-list": (
        lambda f: _train(TINY, f"model.name={f / 'config_list'}"),
        lambda f: f"model.name='{f / 'config_list'}': config.json holds a JSON list, not an "
                  "object"),
    "model-config-json-broken": (
        lambda f: _train(TINY, f"model.name={f / 'config_broken'}"),
        lambda f: f"model.name='{f / 'config_broken'}': config.json is not valid JSON"),
    "model-safetensors-cut-in-header": (
        lambda f: _train(TINY, f"model.name={f / 'cut_header'}"),
        lambda f: f"model.name='{f / 'cut_header'}': model.safetensors is truncated"),
    "model-safetensors-cut-in-data": (
        lambda f: _train(TINY, f"model.name={f / 'cut_data'}"),
        lambda f: f"model.name='{f / 'cut_data'}': model.safetensors is truncated ("),
    "analyze-corrupt-summary": (
        lambda f: ["analyze", str(f / "bad_summary")],
        lambda f: f"DIR='{f / 'bad_summary'}': summary.json cannot be read (JSONDecodeError"),
    "analyze-corrupt-rounds": (
        lambda f: ["analyze", str(f / "bad_rounds")],
        lambda f: f"DIR='{f / 'bad_rounds'}': rounds.parquet cannot be read"),
    "analyze-corrupt-sweep-table": (
        lambda f: ["analyze", str(f / "bad_sweep")],
        lambda f: f"DIR='{f / 'bad_sweep'}': sweep.parquet cannot be read"),
    "data-csv-not-utf8": (lambda f: _custom(f / "bad_bytes.csv"),
                          lambda f: f"data.path='{f / 'bad_bytes.csv'}': bad_bytes.csv is not "
                                    "UTF-8 text (byte 0xff at offset 17)"),
    "data-json-not-utf8": (lambda f: _custom(f / "bad_bytes.json"),
                           lambda f: f"data.path='{f / 'bad_bytes.json'}': bad_bytes.json is "
                                     "not UTF-8 text (byte 0xff at offset 16)"),
    # ---- class 7: values that cannot work
    "lora-alpha-inf": (lambda f: _train(TINY, "lora.alpha=.inf"),
                       lambda f: "lora.alpha=inf: must be a finite number > 0"),
    "server-learning-rate-inf": (
        lambda f: _train(TINY, "federation.server_learning_rate=.inf"),
        lambda f: "federation.server_learning_rate=inf: must be a finite number > 0"),
    "cpus-per-worker-inf": (lambda f: _train(TINY, "runtime.cpus_per_worker=.inf"),
                            lambda f: "runtime.cpus_per_worker=inf: must be a finite number"),
    "cpus-per-worker-nan": (lambda f: _train(TINY, "runtime.cpus_per_worker=.nan"),
                            lambda f: "runtime.cpus_per_worker=nan: must be a number, not NaN"),
    "seed-past-int64": (lambda f: _train(TINY, f"seed={2**63}"),
                        lambda f: f"seed={2**63}: must be an integer in [0, 2**63)"),
    "seed-negative": (lambda f: _train(TINY, "seed=-1"),
                      lambda f: "seed=-1: must be an integer in [0, 2**63)"),
    "max-epsilon-below-one-round": (
        lambda f: _train(TINY, "privacy.mode=dpsgd", "privacy.target_epsilon=8",
                         "privacy.max_epsilon=0.001"),
        lambda f: "privacy.max_epsilon=0.001: is below what round 1 alone costs (epsilon "),
    "max-length-past-context": (
        lambda f: _train(TINY, "model.max_length=100000"),
        lambda f: "model.max_length=100000: exceeds the model's context of 512 tokens"),
    "noise-multiplier-vanishing": (
        lambda f: _train(TINY, "privacy.mode=dpsgd", "privacy.target_epsilon=null",
                         "privacy.noise_multiplier=1e-300"),
        lambda f: "privacy.noise_multiplier=1e-300: must be 0 or a finite number >= 1e-06"),
    "privacy-cli-noise-vanishing": (
        lambda f: ["privacy", "epsilon", "--mode", "dpsgd", "--noise-multiplier", "1e-300",
                   "--sampling-rate", "0.01", "--steps", "1000", "--delta", "1e-5"],
        lambda f: "--noise-multiplier=1e-300: must be 0 or >= 1e-06"),
    "rounds-absurd": (lambda f: _train(TINY, "federation.rounds=10000000000"),
                      lambda f: "federation.rounds=10000000000: must be <= 1,000,000"),
    "test-size-absurd": (lambda f: _train(TINY, "data.test_size=1000000000000"),
                         lambda f: "data.test_size=1000000000000: must be <= 1,000,000"),
    "synthetic-corpus-absurd": (
        lambda f: _train(TINY, "data.max_train_examples=100000000"),
        lambda f: "data.max_train_examples=100000000: the synthetic recipe generates at most"),
    "sweep-randint-past-int64": (
        lambda f: ["sweep", str(f / "sweep_randint.yaml")],
        lambda f: "space.seed=[0, 99999999999999999999]: randint bounds must lie in "
                  "[-2**63, 2**63 - 1]"),
    "sweep-num-samples-absurd": (lambda f: ["sweep", str(f / "sweep_samples.yaml")],
                                 lambda f: "num_samples=1000000: must be <= 100,000"),
    "sweep-too-many-trials": (lambda f: ["sweep", str(f / "sweep_grid.yaml")],
                              lambda f: "num_samples=1001: the sweep would have 100,100 trials"),
    # ---- class 8: silent surprises
    "config-empty": (lambda f: _train(str(f / "empty.yaml")),
                     lambda f: f"config='{f / 'empty.yaml'}': the file is empty"),
    "config-only-comments": (lambda f: _train(str(f / "comments.yaml")),
                             lambda f: f"config='{f / 'comments.yaml'}': the file is empty"),
    "config-duplicate-section": (
        lambda f: _train(str(f / "dup_top.yaml")),
        lambda f: f"config='{f / 'dup_top.yaml'}': key 'federation' is given twice "
                  "(lines 1 and 4)"),
    "config-duplicate-nested-key": (
        lambda f: _train(str(f / "dup_nested.yaml")),
        lambda f: f"config='{f / 'dup_nested.yaml'}': key 'federation.rounds' is given "
                  "twice (lines 4 and 5)"),
    "set-value-duplicate-key": (
        lambda f: _train(TINY, "data.label_map={a: positive, a: negative}"),
        lambda f: "data.label_map='{a: positive, a: negative}': key 'a' is given twice"),
    "sweep-duplicate-key": (
        lambda f: ["sweep", str(f / "sweep_dup.yaml")],
        lambda f: f"sweep='{f / 'sweep_dup.yaml'}': key 'num_samples' is given twice"),
    "data-boolean-labels-json": (
        lambda f: _custom(f / "bool_labels.json"),
        lambda f: "data.label_column='label': holds true/false values; say which label "
                  "each means with data.label_map"),
    "data-boolean-labels-csv": (lambda f: _custom(f / "bool_labels.csv"),
                                lambda f: "data.label_column='label': holds true/false"),
    "data-only-empty-texts": (lambda f: _custom(f / "all_empty.json"),
                              lambda f: "data.text_column='text': holds only empty texts"),
    "data-list-texts": (lambda f: _custom(f / "list_texts.json"),
                        lambda f: "data.text_column='text': holds list values, not text "
                                  "(first in row 0)"),
}


def _assert_one_error_line(err: str, expected: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith(f"dplora-ray: error: {expected}"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        case: str, files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    argv, expected = CASES[case]
    out = tmp_path / "out"
    args = argv(files)
    if args[0] != "privacy":
        args += ["--out", str(out)]
    if args[0] == "train":
        args.append("--no-progress")

    # Execute
    rc = main(args)

    # Assert
    err = capsys.readouterr().err
    assert rc == 2, err
    _assert_one_error_line(err, expected(files))
    assert not out.exists()


def test_unreadable_config_names_the_file(
        files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a config the process may not read (root reads anything: simulated)
    config = tmp_path / "secret.yaml"
    config.write_text(Path(TINY).read_text())
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == config:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = tmp_path / "out"

    # Execute
    rc = main(["train", str(config), "--out", str(out), "--no-progress"])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2
    _assert_one_error_line(err, f"config='{config}': cannot be read (Permission denied)")
    assert not out.exists()


def test_resume_with_binary_saved_config_leaves_the_folder_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a run folder whose config.yaml is not text
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "notes.txt").write_text("mine")
    before = sorted(p.name for p in run.iterdir())

    # Execute
    rc = main(["train", "--resume", str(run), "--no-progress"])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2
    _assert_one_error_line(err, f"config='{run / 'config.yaml'}': is not a UTF-8 text file "
                                "(byte 0x89 at offset 0)")
    assert sorted(p.name for p in run.iterdir()) == before


def test_empty_texts_are_dropped_with_one_warning_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    from dplora_ray.config import DataConfig
    from dplora_ray.data import load_data

    path = tmp_path / "some_empty.json"
    path.write_text(json.dumps([{"text": t, "label": lab} for t, lab in (
        ("good", "positive"), ("", "negative"), ("fine", "neutral"), (" \t", "positive"),
        ("bad", "negative"))]))

    # Execute
    data = load_data(DataConfig(recipe="custom", path=str(path), test_size=1,
                                balanced_test=False), seed=0)

    # Assert
    err = capsys.readouterr().err
    assert err == "warning: data.text_column='text': dropped 2 row(s) with an empty text\n"
    texts = sorted([*data.train["text"], *data.test["text"]])
    assert texts == ["bad", "fine", "good"]


def test_vanishing_noise_multiplier_is_infinite_epsilon_not_an_overflow() -> None:
    import math
    import warnings

    from dplora_ray.privacy.accountant import SampledGaussian, compute_epsilon

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from numpy either
        for accountant in ("rdp", "prv"):
            eps = compute_epsilon([SampledGaussian(1e-300, 0.01, 1000)], 1e-5, accountant)
            assert eps == math.inf


# --------------------------------------------------------------------------- actors
ACTOR_CASES: dict[str, Case] = {  # the same cases, on the default backend
    "model-without-weights": (
        lambda f: _train(TINY, f"model.name={f / 'no_weights'}", inline=False),
        CASES["model-without-weights"][1]),
    "lora-target-module-missing": (
        lambda f: _train(TINY, "lora.target_modules=[q_proj, qkv_proj]", inline=False),
        CASES["lora-target-module-missing"][1]),
    "model-safetensors-cut-in-data": (
        lambda f: _train(TINY, f"model.name={f / 'cut_data'}", inline=False),
        CASES["model-safetensors-cut-in-data"][1]),
}


@pytest.mark.parametrize("case", list(ACTOR_CASES))
def test_actor_backend_checks_the_model_before_any_worker_starts(
        case: str, files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        ray_session: object) -> None:
    # Prepare: the default backend (actors); the driver must refuse before starting them
    argv, expected = ACTOR_CASES[case]
    args = argv(files)
    assert INLINE not in args
    out = tmp_path / "out"

    # Execute
    rc = main([*args, "--set", "runtime.backend=actors", "--out", str(out), "--no-progress"])

    # Assert: one line, not a 27-line ActorDiedError, no "starting actors backend" line
    err = capsys.readouterr().err
    assert rc == 2, err
    _assert_one_error_line(err, expected(files))
    assert not out.exists()


def test_a_workers_own_error_comes_back_across_ray_as_one_line(
        files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        ray_session: object) -> None:
    # Prepare: weights whose shapes do not match config.json: only loading them tells
    out = tmp_path / "out"
    wide = files / "wide"

    # Execute
    rc = main(["train", TINY, "--out", str(out), "--no-progress",
               *_sets("runtime.backend=actors", f"model.name={wide}")])

    # Assert: the progress line, then the worker's error as the one error line, last
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines[-1] == (f"dplora-ray: error: model.name='{wide}': could not be loaded "
                         "(the weights' tensor shapes do not match config.json)"), err
    assert [ln for ln in lines if ln.startswith("dplora-ray:")] == lines[-1:]
    assert "Traceback" not in err and "ActorDiedError" not in err and "RayTaskError" not in err
    assert not out.exists()


def test_the_inline_backend_reports_the_same_worker_error(
        files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    out = tmp_path / "out"
    rc = main(["train", TINY, "--out", str(out), "--no-progress",
               *_sets(INLINE, f"model.name={files / 'wide'}")])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == (f"dplora-ray: error: model.name='{files / 'wide'}': could not be "
                       "loaded (the weights' tensor shapes do not match config.json)")
    assert not out.exists()
