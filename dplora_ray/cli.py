"""Command line: ``dplora-ray`` / ``python -m dplora_ray``.

Every user error (:class:`~dplora_ray.errors.DpLoraError`) ends with exit code 2 and one
line on stderr naming the key and the value; no traceback. A run that ends early for
another reason (:class:`~dplora_ray.errors.RunFailedError`, e.g. a lost worker under
``runtime.on_client_failure=fail``, or a write that failed, e.g. on a full disk) ends with
exit code 1 and one line. Ctrl-C (once or twice) ends with exit code 130 and one line
(how many rounds were kept, and the ``--resume`` to continue them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from dplora_ray.errors import DpLoraError, RunFailedError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dplora-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="run one federated experiment")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config file (optional with --resume)")
    _add_run_args(p)
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its last checkpoint (config read from "
                        "DIR/config.yaml; a given CONFIG/--set must match it outside "
                        "runtime.*)")
    p.set_defaults(func=_cmd_train, parser=p)

    p = sub.add_parser("demo", help="DP-LoRA on SmolLM2-135M with VADER sentiment "
                                    "(configs/demo.yaml)")
    p.add_argument("--config", default=None, help="config (default: the packaged demo)")
    _add_run_args(p, default_out="runs/demo")
    p.set_defaults(func=_cmd_demo)

    from dplora_ray.privacy.cli import add_parser as add_privacy

    add_privacy(sub)
    from dplora_ray.audit.modes import add_parser as add_audit

    add_audit(sub, _cmd_audit)
    from dplora_ray.tune import add_parser as add_sweep

    add_sweep(sub)
    from analysis.cli import add_parser as add_analyze

    add_analyze(sub)
    from dplora_ray.resources import add_parser as add_resources

    add_resources(sub)
    return parser


def _add_run_args(p: argparse.ArgumentParser, default_out: str | None = None) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable), "
                   "e.g. --set privacy.target_epsilon=2")
    p.add_argument("--out", default=default_out,
                   help="output folder (default: runs/<config name>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_out(config_path: str) -> str:
    import time
    from pathlib import Path

    return str(Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run(config_path: str, args: argparse.Namespace, resume: str | None = None) -> int:
    import json

    from dplora_ray.config import load_config
    from dplora_ray.federated.runner import run_experiment

    cfg = load_config(config_path, args.overrides)
    if cfg.data.recipe == "custom":  # keep stderr to our own lines (one line on bad input)
        import datasets

        datasets.disable_progress_bars()
    out = resume or args.out or _default_out(config_path)
    summary = run_experiment(cfg, out, overwrite=args.overwrite, resume=resume is not None,
                             progress=not args.no_progress)
    eps = summary["epsilon"]
    eps_text = (f"epsilon {eps:.3f} at delta {summary['delta']:g} "
                f"({summary['privacy_mode']}, protects one {summary['privacy_unit']})"
                if eps is not None else "no differential privacy (privacy.mode=none)")
    metrics = (("perplexity", "eval_perplexity"), ("ROUGE-L", "eval_rouge_l")) \
        if summary.get("task_type") == "generation" else (("accuracy", "eval_accuracy"),)
    for name, key in metrics:
        before, after = summary[f"{key}_before"], summary[key]
        print(f"{name} before training: "
              + (f"{before:.4f}" if before is not None else "n/a"))
        print(f"{name} after round {summary['rounds_completed']}: "
              + (f"{after:.4f}" if after is not None else "n/a"))
    print(f"privacy: {eps_text}")
    print(f"stop reason: {summary['stop_reason']}; bytes up {summary['bytes_up_total']:,}, "
          f"down {summary['bytes_down_total']:,}; {summary['wall_seconds']:.1f} s")
    print(f"results: {summary['output_dir']}")
    if os.environ.get("DPLORA_RAY_PRINT_SUMMARY"):
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dplora_ray.errors import OutputError

    if args.resume is None:
        if args.config is None:  # a usage error: exit 2 via argparse
            args.parser.error("the following arguments are required: config "
                              "(or --resume DIR)")
        return _run(args.config, args)
    run_dir = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise OutputError("--out", args.out, f"differs from --resume {args.resume!r}; "
                          "a resumed run writes into the folder it resumes")
    if args.overwrite:
        raise OutputError("--overwrite", True, "cannot be combined with --resume")
    saved = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise OutputError("--resume", args.resume, "no such folder")
    if not saved.is_file():
        raise OutputError("--resume", args.resume,
                          "holds no dplora-ray run (no config.yaml); nothing to resume")
    return _run(args.config or str(saved), args, resume=args.resume)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    config = args.config
    if config is None:
        here = Path(__file__).resolve().parent
        for cand in (here / "configs" / "demo.yaml", here.parent / "configs" / "demo.yaml"):
            if cand.is_file():
                config = str(cand)
                break
        else:
            from dplora_ray.errors import ConfigError

            raise ConfigError("--config", None, "configs/demo.yaml not found; pass --config")
    return _run(config, args)


def _cmd_audit(args: argparse.Namespace) -> int:
    """``dplora-ray audit`` (:mod:`dplora_ray.audit.modes`): exit 3 when the audit fails."""
    import time
    from pathlib import Path

    from dplora_ray.audit import AUDIT_FILE
    from dplora_ray.audit.modes import AUDIT_FAILED_EXIT, run_mechanism_audit
    from dplora_ray.config import load_config

    overrides = [*args.overrides, "audit.enabled=true"]
    if args.mode is not None:
        overrides.append(f"audit.mode={args.mode}")
    cfg = load_config(args.config, overrides)
    out = args.out or str(Path("runs") / f"audit-{Path(args.config).stem}-"
                                          f"{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.audit.mode == "blackbox":
        from dplora_ray.federated.runner import run_experiment

        summary = run_experiment(cfg, out, overwrite=args.overwrite,
                                 progress=not args.no_progress)
        passed = summary.get("audit_passed")
        print(f"black-box audit: epsilon >= {summary.get('audit_epsilon_lower_bound')} vs "
              f"{summary.get('audit_epsilon_compared')}; passed: {passed}; results: {out}")
    else:
        passed = run_mechanism_audit(cfg, out)["audit_passed"]
        print(f"results: {Path(out) / AUDIT_FILE}")
    return AUDIT_FAILED_EXIT if passed is False else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Called without ``argv`` (the ``dplora-ray`` process itself), it
    also takes over Ctrl-C (:mod:`dplora_ray.interrupts`): the first stops the run after
    writing what is done, the second skips the writing; Ray is shut down and this
    process's own child processes are ended either way; exit code 130."""
    import signal

    from dplora_ray import interrupts

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    own_process = argv is None
    if own_process:
        interrupts.install()
    try:
        return int(args.func(args) or 0)
    except BaseException as exc:
        if not (isinstance(exc, KeyboardInterrupt) or interrupts.interrupted()):
            if isinstance(exc, RunFailedError):  # not bad input: the run ended early
                print(f"dplora-ray: run failed: {exc}", file=sys.stderr)
                return 1
            if isinstance(exc, DpLoraError):
                print(f"dplora-ray: error: {exc}", file=sys.stderr)
                return 2
            if isinstance(exc, OSError):  # a write failed mid-run: what was done stays
                from dplora_ray.fileio import one_line

                print(f"dplora-ray: run failed: {one_line(exc)}", file=sys.stderr)
                return 1
            raise
        if own_process:  # from here on Ctrl-C is ignored: the process is ending
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            interrupts.kill_processes(interrupts.children())  # what Ray's shutdown left
        from dplora_ray.errors import RunInterrupted

        if isinstance(exc, RunInterrupted):
            print(f"dplora-ray: interrupted; {exc.rounds_kept} round(s) kept, resume with "
                  f"--resume {exc.out_dir}", file=sys.stderr)
        else:
            print("dplora-ray: interrupted", file=sys.stderr)
        return 130
