"""``dplora-ray privacy epsilon|calibrate`` through the top-level main()."""

from __future__ import annotations

import json
import math

import pytest

from dplora_ray.cli import main
from dplora_ray.privacy import SampledGaussian, compute_epsilon

COMMON = ["--sampling-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]
KEYS = {"epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "accountant",
        "mode", "effective_noise_multiplier", "unit"}


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    return json.loads(out)


def test_epsilon_json(capsys):
    record = _json(capsys, ["privacy", "epsilon", "--mode", "dpsgd", "--noise-multiplier",
                            "1.1", *COMMON, "--json"])
    assert KEYS <= set(record)
    assert record["mode"] == "dpsgd" and record["unit"] == "example"
    assert record["noise_multiplier"] == record["effective_noise_multiplier"] == 1.1
    assert (record["sampling_rate"], record["steps"], record["delta"]) == (0.01, 1000, 1e-5)
    assert record["accountant"] == "rdp"
    assert record["epsilon"] == compute_epsilon([SampledGaussian(1.1, 0.01, 1000)], 1e-5)


@pytest.mark.parametrize("train_a,scale", [("true", 1 / (2 * math.sqrt(2))), ("false", 0.5)])
def test_epsilon_paper_uses_the_effective_multiplier(capsys, train_a, scale):
    record = _json(capsys, ["privacy", "epsilon", "--mode", "paper", "--noise-multiplier", "4",
                            *COMMON, "--train-a", train_a, "--json"])
    assert record["noise_multiplier"] == 4.0
    assert record["effective_noise_multiplier"] == pytest.approx(4.0 * scale)
    assert record["epsilon"] == pytest.approx(
        compute_epsilon([SampledGaussian(4.0 * scale, 0.01, 1000)], 1e-5))


def test_epsilon_client_and_local_units(capsys):
    client = _json(capsys, ["privacy", "epsilon", "--mode", "client", "--noise-multiplier", "1",
                            "--sampling-rate", "0.1", "--steps", "100", "--delta", "1e-5",
                            "--json"])
    assert client["unit"] == "client"
    local = _json(capsys, ["privacy", "epsilon", "--mode", "local", "--noise-multiplier", "5",
                           "--steps", "10", "--delta", "1e-5", "--json"])
    assert local["unit"] == "client" and local["sampling_rate"] == 1.0
    # replacement neighbours: two clipped updates differ by up to 2C -> multiplier sigma / 2
    assert local["effective_noise_multiplier"] == 2.5
    assert local["epsilon"] == compute_epsilon([SampledGaussian(2.5, 1.0, 10)], 1e-5)


def test_calibrate_json_meets_target(capsys):
    record = _json(capsys, ["privacy", "calibrate", "--mode", "dpsgd", "--target-epsilon", "2",
                            *COMMON, "--json"])
    assert KEYS <= set(record)
    assert 0.98 * 2 <= record["epsilon"] <= 2.0
    assert record["target_epsilon"] == 2.0
    eps = compute_epsilon([SampledGaussian(record["noise_multiplier"], 0.01, 1000)], 1e-5)
    assert eps <= 2.0


def test_calibrate_paper_reports_the_papers_sigma(capsys):
    record = _json(capsys, ["privacy", "calibrate", "--mode", "paper", "--target-epsilon", "2",
                            *COMMON, "--json"])
    assert record["effective_noise_multiplier"] == pytest.approx(
        record["noise_multiplier"] / (2 * math.sqrt(2)))
    assert record["epsilon"] <= 2.0


def test_human_output_states_the_unit(capsys):
    assert main(["privacy", "epsilon", "--mode", "client", "--noise-multiplier", "1",
                 "--sampling-rate", "0.1", "--steps", "100", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "epsilon = " in out and "protects one client" in out


def test_zero_noise_reports_infinite_epsilon_as_null(capsys):
    record = _json(capsys, ["privacy", "epsilon", "--mode", "dpsgd", "--noise-multiplier", "0",
                            *COMMON, "--json"])
    assert record["epsilon"] is None


@pytest.mark.parametrize("argv,flag", [
    (["epsilon", "--mode", "dpsgd", "--noise-multiplier", "1", "--sampling-rate", "0.01",
      "--steps", "10", "--delta", "2"], "--delta"),
    (["epsilon", "--mode", "dpsgd", "--noise-multiplier", "1", "--sampling-rate", "0.01",
      "--steps", "10", "--delta", "0"], "--delta"),
    (["epsilon", "--mode", "dpsgd", "--noise-multiplier", "-1", "--sampling-rate", "0.01",
      "--steps", "10", "--delta", "1e-5"], "--noise-multiplier"),
    (["epsilon", "--mode", "dpsgd", "--noise-multiplier", "1", "--sampling-rate", "0",
      "--steps", "10", "--delta", "1e-5"], "--sampling-rate"),
    (["epsilon", "--mode", "dpsgd", "--noise-multiplier", "1", "--steps", "10", "--delta",
      "1e-5"], "--sampling-rate"),
    (["epsilon", "--mode", "local", "--noise-multiplier", "1", "--sampling-rate", "0.5",
      "--steps", "10", "--delta", "1e-5"], "--sampling-rate"),
    (["epsilon", "--mode", "dpsgd", "--noise-multiplier", "1", "--sampling-rate", "0.01",
      "--steps", "0", "--delta", "1e-5"], "--steps"),
    (["epsilon", "--mode", "paper", "--noise-multiplier", "1", "--sampling-rate", "0.01",
      "--steps", "10", "--delta", "1e-5", "--train-a", "maybe"], "--train-a"),
    (["calibrate", "--mode", "dpsgd", "--target-epsilon", "0", "--sampling-rate", "0.01",
      "--steps", "10", "--delta", "1e-5"], "--target-epsilon"),
    (["calibrate", "--mode", "dpsgd", "--target-epsilon", "1", "--sampling-rate", "0.01",
      "--steps", "10", "--delta", "1.5"], "--delta"),
])
def test_bad_values_exit_2_with_one_line_naming_the_flag(capsys, argv, flag):
    assert main(["privacy", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dplora-ray: error: ")
    assert flag in lines[0]
    assert captured.out == ""


def test_unreachable_target_exits_2(capsys):
    argv = ["privacy", "calibrate", "--mode", "local", "--target-epsilon", "0.001",
            "--steps", "1000000", "--delta", "1e-5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_epsilon=0.001" in err[0]
