"""``dplora-ray privacy epsilon`` and ``dplora-ray privacy calibrate``.

The accountant and the noise calibration on their own, for planning a budget before a
run. Every bad flag value raises :class:`~dplora_ray.errors.ConfigError` naming the flag
(the top-level command line turns it into exit code 2 and one line on stderr).

Units: ``dpsgd``/``paper`` protect one example (steps are the client's local steps,
sampling rate its Poisson batch rate); ``client`` protects one client (steps are rounds,
sampling rate the client sampling rate); ``local`` protects one client against the
server too (steps are the client's participations, sampling rate 1).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from dplora_ray.errors import ConfigError
from dplora_ray.privacy.accountant import SampledGaussian, compute_epsilon
from dplora_ray.privacy.calibration import calibrate_noise_multiplier
from dplora_ray.privacy.ledger import protects_sentence, unit_of_privacy_for
from dplora_ray.privacy.mechanisms import DP_MODES, effective_noise_scale

__all__ = ["add_parser"]

#: the smallest nonzero noise multiplier accepted (as ``privacy.noise_multiplier``)
MIN_NOISE_MULTIPLIER = 1e-6
_STEPS_MEANING = {"dpsgd": "local steps", "paper": "local steps", "client": "rounds",
                  "local": "participations"}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ConfigError("--train-a", text, "must be true or false")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, choices=DP_MODES,
                        help="privacy mode (unit protected: example for dpsgd/paper, "
                             "client for client/local)")
    parser.add_argument("--sampling-rate", type=float, default=None,
                        help="Poisson sampling rate per step: batch rate for "
                             "dpsgd/paper, client sampling rate for client; "
                             "local accepts only 1 (the default there)")
    parser.add_argument("--steps", type=int, required=True,
                        help="local steps (dpsgd/paper), rounds (client) or "
                             "participations (local)")
    parser.add_argument("--delta", type=float, required=True, help="target delta in (0, 1)")
    parser.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    parser.add_argument("--train-a", default="true",
                        help="true (A and B trained) or false (FFA-LoRA); matters for "
                             "--mode paper")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(subparsers: Any) -> None:
    """Register ``privacy epsilon`` and ``privacy calibrate`` on a subparsers action."""
    privacy = subparsers.add_parser(
        "privacy", help="privacy accounting and noise calibration",
        description="Privacy accounting (RDP or PRV) and noise calibration.")
    sub = privacy.add_subparsers(dest="privacy_command", required=True)

    eps = sub.add_parser("epsilon", help="epsilon of a noise multiplier",
                         description="Epsilon spent by a noise multiplier over steps.")
    _common(eps)
    eps.add_argument("--noise-multiplier", type=float, required=True,
                     help="noise multiplier (for paper: the paper's sigma)")
    eps.set_defaults(func=run_epsilon)

    cal = sub.add_parser("calibrate", help="smallest noise multiplier for a target epsilon",
                         description="Smallest noise multiplier meeting a target epsilon.")
    _common(cal)
    cal.add_argument("--target-epsilon", type=float, required=True)
    cal.set_defaults(func=run_calibrate)


def _settings(args: argparse.Namespace) -> tuple[float, int, float, bool]:
    """Validate the shared flags; returns (sampling_rate, steps, delta, train_a)."""
    train_a = _bool(args.train_a)
    q = args.sampling_rate
    if args.mode == "local":
        if q is None:
            q = 1.0
        elif q != 1.0:
            raise ConfigError("--sampling-rate", q,
                              "must be 1 for --mode local (each participation is one "
                              "unsampled Gaussian release; give participations as --steps)")
    elif q is None:
        raise ConfigError("--sampling-rate", None, f"is required for --mode {args.mode}")
    if math.isnan(q) or not 0 < q <= 1:
        raise ConfigError("--sampling-rate", q, "must be in (0, 1]")
    if args.steps < 1:
        raise ConfigError("--steps", args.steps, "must be an integer >= 1")
    delta = args.delta
    if math.isnan(delta) or not 0 < delta < 1:
        raise ConfigError("--delta", delta, "must be in (0, 1)")
    return q, args.steps, delta, train_a


def _report(args: argparse.Namespace, *, epsilon: float, noise_multiplier: float,
            scale: float, q: float, steps: int, delta: float, train_a: bool,
            extra: dict[str, Any]) -> None:
    effective = noise_multiplier * scale
    record: dict[str, Any] = {
        "command": args.privacy_command,
        "mode": args.mode,
        "unit": unit_of_privacy_for(args.mode),
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "effective_noise_multiplier": effective,
        "effective_noise_scale": scale,
        "sampling_rate": q,
        "steps": steps,
        "steps_are": _STEPS_MEANING[args.mode],
        "accountant": args.accountant,
        "train_a": train_a,
        **extra,
        "protects": protects_sentence(args.mode),
    }
    if args.json:
        print(json.dumps(record, allow_nan=False))
        return
    eps_text = f"{epsilon:.6g}" if math.isfinite(epsilon) else "inf (no noise)"
    lines = [f"epsilon = {eps_text} at delta = {delta:g} ({args.accountant} accountant)"]
    if "target_epsilon" in extra:
        lines.insert(0, f"noise_multiplier = {noise_multiplier:.6g} meets target_epsilon = "
                        f"{extra['target_epsilon']:g}")
    lines.append(f"mode {args.mode}: noise_multiplier {noise_multiplier:.6g}, effective "
                 f"{effective:.6g}; sampling_rate {q:g}; {steps} {_STEPS_MEANING[args.mode]}")
    lines.append(f"protects one {record['unit']}: {record['protects']}")
    print("\n".join(lines))


def run_epsilon(args: argparse.Namespace) -> int:
    """``privacy epsilon``: the epsilon of a given noise multiplier."""
    q, steps, delta, train_a = _settings(args)
    z = args.noise_multiplier
    if math.isnan(z) or math.isinf(z) or z < 0:
        raise ConfigError("--noise-multiplier", z, "must be a finite number >= 0")
    if 0 < z < MIN_NOISE_MULTIPLIER:
        raise ConfigError("--noise-multiplier", z, f"must be 0 or >= {MIN_NOISE_MULTIPLIER:g} "
                          "(smaller noise protects nothing and cannot be accounted)")
    scale = effective_noise_scale(args.mode, train_a)
    eps = compute_epsilon([SampledGaussian(z * scale, q, steps)], delta, args.accountant)
    _report(args, epsilon=eps, noise_multiplier=z, scale=scale, q=q, steps=steps,
            delta=delta, train_a=train_a, extra={})
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """``privacy calibrate``: the smallest noise multiplier meeting --target-epsilon."""
    q, steps, delta, train_a = _settings(args)
    target = args.target_epsilon
    if math.isnan(target) or math.isinf(target) or target <= 0:
        raise ConfigError("--target-epsilon", target, "must be a finite number > 0")
    scale = effective_noise_scale(args.mode, train_a)
    z = calibrate_noise_multiplier(target, q, steps, delta, args.accountant,
                                   effective_scale=scale)
    eps = compute_epsilon([SampledGaussian(z * scale, q, steps)], delta, args.accountant)
    _report(args, epsilon=eps, noise_multiplier=z, scale=scale, q=q, steps=steps,
            delta=delta, train_a=train_a, extra={"target_epsilon": target})
    return 0
