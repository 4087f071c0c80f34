"""Bad input at the command line: every case ends with exit code 2 and one line on stderr
that names the key and the value, no traceback, and no output folder (or, where the
folder existed before, the folder exactly as it was).

Covered: config keys (unknown with a did-you-mean, in ``--set`` and in the YAML file,
wrong types, out-of-range values, cross-field rules, invalid YAML, a missing file), the
privacy plan (delta against the data, both epsilon and noise, an unreachable target),
data (missing file, no rows, missing column, unknown label, no training examples left,
more clients than examples, too few clients for the groups), model (unknown preset,
missing folder, hub id while offline), the failure settings, output and resume folders,
and a failed privacy preflight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dplora_ray.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
INLINE = ("runtime.backend=inline",)


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    (d / "header_only.csv").write_text("text,label\n")
    (d / "no_text.csv").write_text("sentence,label\nhello,positive\nbad,negative\n")
    (d / "banana.csv").write_text("text,label\nhello there,banana\nhi,positive\n")
    (d / "three.csv").write_text("text,label\ngood,positive\nbad,negative\nmeh,neutral\n")
    (d / "typo.yaml").write_text("federaton:\n  rounds: 2\n")
    (d / "broken.yaml").write_text("model: [1, 2\n")
    (d / "not_a_mapping.yaml").write_text("- 1\n- 2\n")
    return d


def _custom(path: str, *more: str) -> list[str]:
    return _sets(*INLINE, "data.recipe=custom", f"data.path={path}", *more)


#: id -> (argv after "train" given the inputs folder, start of the message after
#: "dplora-ray: error: ")
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # config keys
    "unknown-key-set": (lambda f: [TINY, *_sets("federation.num_client=3")],
                        "federation.num_client=3: unknown key; did you mean "
                        "'federation.num_clients'?"),
    "unknown-section-yaml": (lambda f: [str(f / "typo.yaml")],
                             "federaton={'rounds': 2}: unknown key; did you mean"),
    "invalid-yaml": (lambda f: [str(f / "broken.yaml")], "config='"),
    "yaml-not-a-mapping": (lambda f: [str(f / "not_a_mapping.yaml")], "config='"),
    "missing-config": (lambda f: [str(f / "nope.yaml")], "config='"),
    "int-type": (lambda f: [TINY, *_sets("federation.rounds=abc")],
                 "federation.rounds='abc': must be an integer"),
    "bool-type": (lambda f: [TINY, *_sets("lora.train_a=maybe")],
                  "lora.train_a='maybe': must be true or false"),
    "list-type": (lambda f: [TINY, *_sets("lora.target_modules={a: 1}")],
                  "lora.target_modules={'a': 1}: must be a list"),
    "epsilon-zero": (lambda f: [TINY, *_sets("privacy.mode=dpsgd",
                                             "privacy.target_epsilon=0")],
                     "privacy.target_epsilon=0.0: must be a finite number > 0"),
    "epsilon-negative": (lambda f: [TINY, *_sets("privacy.mode=client",
                                                 "privacy.target_epsilon=-1")],
                         "privacy.target_epsilon=-1.0: must be a finite number > 0"),
    "delta-above-1": (lambda f: [TINY, *_sets("privacy.delta=1.5")],
                      "privacy.delta=1.5: must be in (0, 1)"),
    "delta-zero": (lambda f: [TINY, *_sets("privacy.delta=0")],
                   "privacy.delta=0.0: must be in (0, 1)"),
    "delta-vs-clients": (lambda f: [TINY, *_sets(*INLINE, "privacy.mode=client",
                                                 "privacy.delta=0.5")],
                         "privacy.delta=0.5: must be below 1/federation.num_clients"),
    "rank-negative": (lambda f: [TINY, *_sets("lora.r=-2")],
                      "lora.r=-2: must be an integer >= 1"),
    "cohort-larger-than-population": (
        lambda f: [TINY, *_sets("federation.clients_per_round=10")],
        "federation.clients_per_round=10: cohort larger than the population"),
    "epsilon-and-noise": (lambda f: [TINY, *_sets("privacy.mode=dpsgd",
                                                  "privacy.noise_multiplier=1.0")],
                          "privacy.noise_multiplier=1.0: is exclusive with "
                          "privacy.target_epsilon"),
    "unreachable-epsilon": (lambda f: [TINY, *_sets(
        *INLINE, "privacy.mode=dpsgd", "privacy.target_epsilon=1e-6", "privacy.delta=1e-10",
        "federation.local_steps=50")], "target_epsilon=1e-06 is unreachable"),
    # failure settings
    "timeout-zero": (lambda f: [TINY, *_sets("runtime.round_timeout_s=0")],
                     "runtime.round_timeout_s=0.0: must be a number of seconds > 0"),
    "failure-policy": (lambda f: [TINY, *_sets("runtime.on_client_failure=ignore")],
                       "runtime.on_client_failure='ignore': must be one of 'retry', "
                       "'drop', 'fail'"),
    "kill-after-last-round": (lambda f: [TINY, *_sets("runtime.kill_worker_at_round=9")],
                              "runtime.kill_worker_at_round=9: must be <= federation.rounds"),
    "restarts-negative": (lambda f: [TINY, *_sets("runtime.max_worker_restarts=-1")],
                          "runtime.max_worker_restarts=-1: must be an integer >= 0"),
    # data
    "more-clients-than-examples": (
        lambda f: [TINY, *_sets(*INLINE, "federation.num_clients=150",
                                "data.max_train_examples=100")],
        "federation.num_clients=150: more clients than training examples (100)"),
    "fewer-clients-than-groups": (
        lambda f: [TINY, *_sets(*INLINE, "federation.partition=natural",
                                "federation.num_clients=2", "federation.clients_per_round=1")],
        "federation.num_clients=2: natural partition has 4 groups"),
    "data-missing-file": (lambda f: [TINY, *_custom("/no/such/data.csv")],
                          "data.path='/no/such/data.csv': no such file or folder"),
    "data-no-rows": (lambda f: [TINY, *_custom(str(f / "header_only.csv"))],
                     "data.path='"),
    "data-missing-text-column": (lambda f: [TINY, *_custom(str(f / "no_text.csv"))],
                                 "data.text_column='text': no such column"),
    "data-unknown-label": (lambda f: [TINY, *_custom(str(f / "banana.csv"))],
                           "data.label_column='label': holds the value 'banana'"),
    "data-no-training-examples-left": (
        lambda f: [TINY, *_custom(str(f / "three.csv"), "data.test_size=3",
                                  "data.balanced_test=false")],
        "data.test_size=3: leaves no training examples"),
    # model
    "model-unknown-preset": (lambda f: [TINY, *_sets(*INLINE, "model.name=gpt-17")],
                             "model.name='gpt-17': unknown preset"),
    "model-missing-folder": (lambda f: [TINY, *_sets(*INLINE, "model.name=/no/such/model")],
                             "model.name='/no/such/model': no such local folder"),
    "model-hub-id-offline": (lambda f: [TINY, *_sets(*INLINE, "model.name=acme/llm")],
                             "model.name='acme/llm': is a hub id but the hub is offline"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_output(
        case: str, files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, expected = CASES[case]
    out = tmp_path / "run"

    # Execute
    rc = main(["train", *argv(files), "--out", str(out), "--no-progress"])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"dplora-ray: error: {expected}"), err
    assert "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------- folders
def test_existing_output_folder_is_left_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    # Execute
    rc = main(["train", TINY, "--out", str(out), "--no-progress", *_sets(*INLINE)])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"dplora-ray: error: --out={str(out)!r}: exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("make", "extra", "expected"), [
    (None, [], "--resume='{d}': no such folder"),
    ("empty-ish", [], "--resume='{d}': holds no dplora-ray run (no config.yaml)"),
    ("bad-checkpoint", [], "--resume='{d}': checkpoint.pt cannot be read"),
    ("bad-checkpoint", ["--overwrite"], "--overwrite=True: cannot be combined with --resume"),
    ("bad-checkpoint", ["--out", "elsewhere"], "--out='elsewhere': differs from --resume"),
], ids=["missing", "not-a-run", "unreadable-checkpoint", "with-overwrite", "other-out"])
def test_bad_resume_folder_exits_2_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str | None,
        extra: list[str], expected: str) -> None:
    # Prepare
    d = tmp_path / "run"
    if make is not None:
        d.mkdir()
        (d / "notes.txt").write_text("mine")
    if make == "bad-checkpoint":
        (d / "config.yaml").write_text(Path(TINY).read_text())
        (d / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = sorted(p.name for p in d.iterdir()) if d.exists() else None

    # Execute
    rc = main(["train", "--resume", str(d), "--no-progress", *extra])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("dplora-ray: error: " + expected.format(d=d)), err
    assert (sorted(p.name for p in d.iterdir()) if d.exists() else None) == before


def test_train_without_config_or_resume_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "config (or --resume DIR)" in err


def test_failed_preflight_leaves_no_output_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: LoRA on lm_head gets no per-sample gradient (the classifier reads its rows
    # directly); the preflight runs on the started backend, before the folder exists
    out = tmp_path / "run"

    # Execute
    rc = main(["train", TINY, "--out", str(out), "--no-progress",
               *_sets(*INLINE, "privacy.mode=dpsgd",
                      "lora.target_modules=[q_proj, v_proj, lm_head]")])

    # Assert: progress lines, then the one error line, last
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith("dplora-ray: error: privacy preflight (dpsgd) failed for 2 LoRA")
    assert not any(line.startswith("Traceback") for line in err)
    assert not out.exists()


def test_lora_off_the_classifier_path_is_refused_without_privacy_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: without privacy, LoRA on lm_head would silently stay untrained
    out = tmp_path / "run"

    # Execute
    rc = main(["train", TINY, "--out", str(out), "--no-progress",
               *_sets(*INLINE, "privacy.mode=none",
                      "lora.target_modules=[q_proj, v_proj, lm_head]")])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("dplora-ray: error: preflight (none) failed for 2 LoRA")
    assert "lm_head" in err[-1] and "no gradient" in err[-1]
    assert not out.exists()
