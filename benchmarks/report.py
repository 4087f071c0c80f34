"""Formatting of the benchmark results as Markdown tables (printed, and pasted into
docs/benchmarks.md)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_report"]


def _num(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return format(x, spec)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _met(x: Any) -> str:
    return "n/a" if x is None else ("yes" if x else "**no**")


def format_report(res: dict[str, Any]) -> str:
    """All figures of one ``python -m benchmarks`` run as Markdown."""
    d = res.get("details", {})
    out: list[str] = []
    m = res.get("machine", {})
    out.append(f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), "
               f"{m.get('memory_total_gib')} GiB RAM, load average (1/5/15 min) at start "
               f"{m.get('load_average_1_5_15')}, at end {res.get('load_average_end')}; "
               f"torch {m.get('torch')}, ray {m.get('ray')}, opacus {m.get('opacus')}. "
               f"Mode: {'quick' if res.get('quick') else 'full'}; "
               f"{_num(res.get('total_seconds'), '.0f')} s in all.")
    out.append("")
    rows = []
    for name, t in res.get("targets", {}).items():
        rows.append([name, _num(t.get("value")), t.get("target_text", ""), _met(t.get("met")),
                     t.get("label", "")])
    out.append("### Headline figures\n")
    out.append(_table(["figure", "value", "target", "met", "measured on"], rows))
    for key in ("client_updates_per_second", "tokens_per_second_per_worker"):
        v = res.get(key) or {}
        out.append("")
        out.append(f"`{key}`: " + ", ".join(f"{n} worker(s): {_num(x, '.1f')}"
                                            for n, x in v.items())
                   + (f" ({res['labels'][key]})" if key in res.get("labels", {}) else ""))

    ro = d.get("round_overhead")
    if ro:
        out.append("\n### Round overhead\n")
        runner = ro.get("runner") or {}
        out.append(f"{ro['clients_per_round']} clients per round, {ro['num_workers']} "
                   f"workers, model {ro['model']}, {ro['local_steps']} local steps of batch "
                   f"{ro['batch_size']}, evaluation on {ro['test_examples']} examples every "
                   f"round. Runner: ratio {_num(runner.get('ratio'))} "
                   f"({runner.get('ratio_source', '')}; mean round "
                   f"{_num(runner.get('mean_inclusive_round_seconds'))} s vs ideal "
                   f"{_num(runner.get('mean_round_ideal_seconds'))} s; "
                   f"`round_seconds` alone: {_num(runner.get('round_seconds_ratio'))}, median "
                   f"round {_num(runner.get('ratio_median_round'))}; "
                   f"writes per round: "
                   + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in
                               (runner.get('mean_write_seconds') or {}).items())
                   + f"); all-inclusive "
                   f"(warm-up round, checkpoints, Parquet writes, final adapter) "
                   f"{_num(runner.get('all_inclusive_ratio'))}.\n")
        h = ro.get("harness", {})
        modes = list(h)
        if modes:
            rows = [["ratio (wall / ideal)"] + [_num(h[k]["ratio"]) for k in modes],
                    ["mean round wall, s"] + [_num(h[k]["mean_round_wall_seconds"])
                                              for k in modes],
                    ["mean ideal, s"] + [_num(h[k]["mean_round_ideal_seconds"]) for k in modes],
                    ["mean client compute, ms"] + [_num(1e3 * h[k]["mean_client_seconds"], ".1f")
                                                   for k in modes],
                    ["driver submit time (inside the start latency), ms"] + [
                        _num(1e3 * h[k]["dispatch_seconds"], ".1f") for k in modes]]
            for part in h[modes[0]]["overhead_seconds"]:
                rows.append([f"overhead: {part}, ms (% of ideal)"] + [
                    f"{1e3 * h[k]['overhead_seconds'][part]:.1f} "
                    f"({100 * h[k]['overhead_fraction_of_ideal'][part]:.1f}%)" for k in modes])
            out.append(_table(["harness"] + modes, rows))
        s = ro.get("serialization_offline", {})
        if s:
            out.append(f"\nOffline, one round's payloads: jobs {_bytes(s['jobs_bytes'])} in "
                       f"{1e3 * s['jobs_dumps_loads_seconds']:.1f} ms, results with updates "
                       f"({s['update_type']}) {_bytes(s['results_bytes'])} in "
                       f"{1e3 * s['results_dumps_loads_seconds']:.1f} ms (pickle + unpickle).")

    c = (ro or {}).get("ray_call_overhead")
    if c:
        out.append(f"\nRay's own cost per call on one worker (pipelined): ping "
                   f"{1e3 * c['ping_seconds']:.2f} ms, a no-op with a client call's arguments "
                   f"and two returns {1e3 * c['noop_client_call_seconds']:.2f} ms; unpickling "
                   f"the global state ({c['state_tensors']} tensors, "
                   f"{_bytes(c['state_bytes'])}), paid by every client call: "
                   f"{1e3 * c['state_unpickle_seconds']:.2f} ms as a plain dict, "
                   f"{1e3 * c['state_unpickle_seconds_if_packed']:.2f} ms as a PackedUpdate.")

    mem = d.get("memory")
    if mem:
        out.append("\n### Memory and start-up vs population\n")
        rows = []
        for r in mem["runs"]:
            roles = ", ".join(f"{k} {_bytes(v)}" for k, v in
                              sorted(r["peak_rss_by_role"].items(), key=lambda kv: -kv[1]))
            rows.append([str(r["num_clients"]), _bytes(r["peak_rss_bytes"]),
                         _num(r["peak_rss_bytes"] / mem["runs"][0]["peak_rss_bytes"]),
                         _num(r["plan_seconds"], ".2f"), _num(r["startup_seconds"], ".1f"),
                         _num(r["run_seconds"], ".1f"), roles])
        out.append(_table(["clients", "peak RSS (sum)", "vs first", "plan s",
                           "start-up s (to round 1)", "run s", "at peak, by role"], rows))

    dp = d.get("dp_overhead")
    if dp:
        out.append(f"\n### DP-SGD step overhead ({dp['label']})\n")
        rows = [[mode, _num(sec, ".3f"), _num(sec / dp["step_seconds"]["none"], ".2f")]
                for mode, sec in dp["step_seconds"].items()]
        bf = dp.get("bf16_autocast") or {}
        for mode, sec in (bf.get("step_seconds") or {}).items():
            rows.append([f"{mode} (bf16 autocast)", _num(sec, ".3f"),
                         _num(sec / bf["step_seconds"]["none"], ".2f")])
        tc = dp.get("train_client_per_step", {})
        if tc:
            rows.append(["train_client dpsgd vs none, per step",
                         f"{_num(tc['dpsgd_step_seconds'])} / {_num(tc['none_step_seconds'])}",
                         _num(tc["ratio"], ".2f")])
        out.append(_table(["mode", "step s (median)", "vs non-private"], rows))
        out.append(f"\nGhost clipping usable: {dp['ghost_usable']}"
                   + (f" ({dp['ghost_error']})" if dp.get("ghost_error") else "")
                   + (f"; clipped gradient vs hooks, relative difference "
                      f"{dp['ghost_vs_hooks_relative_gradient_difference']:.1e}"
                      if dp.get("ghost_vs_hooks_relative_gradient_difference") is not None
                      else "") + f". Faster: {dp['faster_mode']}.")
        rss = dp.get("process_rss_bytes")
        if rss:
            out.append(f"Process RSS (three copies of the model: plain, hooks, ghost): "
                       f"{_bytes(rss['three_models_loaded'])} loaded, "
                       f"{_bytes(rss['after_steps'])} after the steps.")

    cm = d.get("communication")
    if cm:
        out.append("\n### Communication (upload per client and round)\n")
        rows = []
        for r in cm["rows"]:
            rows.append([r["model"], r["targets"], str(r["r"]), f"{r['lora_parameters']:,}",
                         _bytes(r["standard_float32_bytes"]), _bytes(r["ffa_float32_bytes"]),
                         _bytes(r["ffa_bfloat16_bytes"]),
                         _bytes(r["full_finetune_float32_bytes"]),
                         f"{100 * r['standard_float32_fraction_of_full']:.3f}%"])
        out.append(_table(["model", "LoRA on", "r", "LoRA params", "standard fp32",
                           "FFA fp32", "FFA bf16", "full FT fp32", "standard / full"], rows))
        rows = [[k, str(v["tensors"]), _bytes(v["raw_bytes"]), f"{v['serialized_bytes']:,}",
                 f"{100 * v['overhead_fraction']:.3f}%",
                 f"{100 * v['plain_dict_overhead_fraction']:.2f}%"]
                for k, v in cm["payload_overhead"].items()]
        out.append("")
        out.append(_table(["payload", "tensors", "raw", "serialised bytes",
                           "overhead (PackedUpdate)", "overhead (plain dict)"], rows))

    tp = d.get("throughput")
    if tp:
        out.append("\n### Throughput\n")
        rows = []
        up = tp.get("updates", {})
        for mode, by_n in up.get("by_mode", {}).items():
            for n, v in by_n.items():
                rows.append([f"{up['model']}, {mode}", n,
                             _num(v["client_updates_per_second"], ".1f"),
                             _num(v["tokens_per_second_per_worker"], ".0f"),
                             _num(v["tokens_per_compute_second"], ".0f")])
        tok = tp.get("tokens", {})
        for n, v in tok.get("by_workers", {}).items():
            rows.append([tok["label"], n,
                         _num(v["client_updates_per_second"], ".2f"),
                         _num(v["tokens_per_second_per_worker"], ".0f"),
                         _num(v["tokens_per_compute_second"], ".0f")])
        out.append(_table(["model, dispatch", "workers", "client updates/s",
                           "tokens/s per worker (wall)", "tokens per compute-second"], rows))
        pl = tok.get("real_payload")
        if pl:
            out.append(f"\nReal client update from that run: {pl['tensors']} tensors, "
                       f"{pl['raw_bytes']:,} B raw, {pl['serialized_bytes']:,} B serialised "
                       f"({100 * pl['overhead_fraction']:.3f}% overhead, {pl['type']}).")

    ac = d.get("audit_cost")
    if ac:
        out.append("\n### Audit cost\n")
        out.append(f"{ac['label']}, audit off vs `audit.enabled=true`: wall "
                   f"{_num(ac['wall_seconds_off'])} s vs {_num(ac['wall_seconds_on'])} s, "
                   f"`audit_cost_fraction` {_num(ac['audit_cost_fraction'])}; "
                   f"`audit_seconds` {_num(ac['audit_seconds'])} s "
                   f"({_num(100 * ac['audit_seconds_fraction_of_run'], '.1f')}% of the "
                   f"audit-on run).")

    g = d.get("gpu")
    if g:
        out.append("\n### GPU\n")
        out.append(("measured: " + str(g.get("tokens_per_second_per_worker")))
                   if g.get("measured") else f"Not measured: {g.get('reason')}.")
    errs = res.get("errors") or {}
    if errs:
        out.append("\n### Errors\n")
        out += [f"- {k}: {v}" for k, v in errs.items()]
    return "\n".join(out)
