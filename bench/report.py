"""Results -> headline figures, targets (pass/fail), a markdown report and PNG plots.

``python -m bench.report bench/results/DATE/results.json`` rebuilds results.md and the
plots of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.stats import median, ratio

# The servers of the overload scenario, the default first: name in bench/run.py -> what
# its admission is.
OVERLOAD_SERVERS = {
    "embedserve": "default admission (64 calls in flight on 2 threads)",
    "one-worker": "the same, on one forward worker (--forward-workers 1, the sixth run's)",
    "forward-nice": "the same, torch nicer than the event loop (--forward-nice 5)",
    "no-call-limit": "no in-flight call limit (--max-calls-in-flight 0, the fourth run's)",
    "grpc-backlog": "gRPC's default pending-call bound (--max-pending-calls 0)",
    "token-bound-only": "token bound only (the first run's admission)",
    # `embedserve cluster` (bench/run.py OVERLOAD_CLUSTERS): 2 replicas behind Envoy.
    "envoy": "Envoy, 2 replicas: Envoy refuses past 32 in flight a replica",
    "envoy-64": "Envoy, 2 replicas, --replica-in-flight 64",
    "envoy-unbounded": "Envoy, 2 replicas, no Envoy limit: each replica's own limit refuses",
}

Json = dict[str, Any]


def _forward(ceiling_row: dict[str, Any]) -> str:
    """Which forward a ceiling measurement ran (runs before the sixth session: plain), and on
    how many workers (before the seventh: one)."""
    forward = "padding-free" if ceiling_row.get("packed") else "plain"
    workers = ceiling_row.get("workers", 1)
    return forward if workers == 1 else f"{forward}, {workers} workers"


def _overload_key(server: str) -> str:
    return "overload" if server == "embedserve" else "overload_" + server.replace("-", "_")


def _rounds(scen: Json, key: str) -> list[Json]:
    return [row[key] for row in scen.get("rounds", []) if key in row]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:,.{digits}f}"
    return str(value)


def headline(results: Json) -> Json:
    """The figures the targets are judged on, each from this one run."""
    s = results.get("scenarios", {})
    h: Json = {}
    ceiling = s.get("ceiling", {})
    if ceiling:
        h["ceiling_tokens_per_s"] = ceiling["best"]["tokens_per_s"]
        h["ceiling_sentences_per_s"] = ceiling["best"]["sentences_per_s"]
        h["ceiling_best_batch"] = ceiling["best"]["batch_size"]
        h["ceiling_best_sorted"] = ceiling["best"]["sorted"]
        h["forward_batch1_ms"] = ceiling["forward_batch1_ms"]["median_ms"]
        h["forward_max_ms"] = ceiling["forward_max_ms"]["median_ms"]
    unary = s.get("unary", {})
    if unary:
        es64 = _rounds(unary, "embedserve_c64")
        ceil = _rounds(unary, "ceiling")
        h["unary_c64_rps"] = median([r["rps"] for r in es64])
        h["unary_c64_tokens_per_s"] = median([r["tokens_per_s"] for r in es64])
        h["unary_c64_p99_ms"] = median([r["latency_ms"]["p99"] for r in es64])
        if ceil:
            h["round_ceiling_tokens_per_s"] = median([c["tokens_per_s"] for c in ceil])
            h["unary_vs_ceiling"] = median(
                [
                    ratio(r["tokens_per_s"], c["tokens_per_s"])
                    for r, c in zip(es64, ceil, strict=False)
                ]
            )
        merged = _rounds(unary, "embedserve_c64_coalesce")
        if merged:
            h["coalesce_c64_rps"] = median([r["rps"] for r in merged])
            h["coalesce_c64_tokens_per_s"] = median([r["tokens_per_s"] for r in merged])
            h["coalesce_c64_p99_ms"] = median([r["latency_ms"]["p99"] for r in merged])
            h["coalesce_vs_unary"] = median(
                [ratio(a["rps"], b["rps"]) for a, b in zip(merged, es64, strict=False)]
            )
            if ceil:
                h["coalesce_vs_ceiling"] = median(
                    [
                        ratio(r["tokens_per_s"], c["tokens_per_s"])
                        for r, c in zip(merged, ceil, strict=False)
                    ]
                )
        naive = _rounds(unary, "naive_c64")
        if naive:
            h["naive_c64_rps"] = median([r["rps"] for r in naive])
            h["unary_vs_naive"] = median(
                [ratio(a["rps"], b["rps"]) for a, b in zip(es64, naive, strict=False)]
            )
        inf = _rounds(unary, "infinity_c64")
        if inf:
            h["infinity_c64_rps"] = median([r["rps"] for r in inf])
            h["unary_vs_infinity"] = median(
                [ratio(a["rps"], b["rps"]) for a, b in zip(es64, inf, strict=False)]
            )
            if merged:
                h["coalesce_vs_infinity"] = median(
                    [ratio(a["rps"], b["rps"]) for a, b in zip(merged, inf, strict=False)]
                )
        if "infinity_c32" in unary:
            h["infinity_c32_rps"] = unary["infinity_c32"]["rps"]
        es1 = _rounds(unary, "embedserve_c1")
        fwd = _rounds(unary, "forward_batch1")
        h["unary_c1_p50_ms"] = median([r["latency_ms"]["p50"] for r in es1])
        if fwd:
            h["round_forward_batch1_ms"] = median([f["median_ms"] for f in fwd])
            h["c1_p50_minus_forward_ms"] = median(
                [r["latency_ms"]["p50"] - f["median_ms"] for r, f in zip(es1, fwd, strict=False)]
            )
    bulk = s.get("bulk", {})
    if bulk.get("20k"):
        h["bulk_tokens_per_s"] = bulk["20k"]["tokens_per_s"]
        h["bulk_peak_rss_20k_mib"] = bulk["20k"]["peak_rss_mib"]
        if "ceiling_before" in bulk:
            ceil_bulk = median(
                [bulk["ceiling_before"]["tokens_per_s"], bulk["ceiling_after"]["tokens_per_s"]]
            )
            h["bulk_ceiling_tokens_per_s"] = ceil_bulk
            h["bulk_vs_ceiling"] = ratio(bulk["20k"]["tokens_per_s"], ceil_bulk)
        h["bulk_stream_max_rss_20k_mib"] = _stream_max_rss(bulk["20k"])
    if bulk.get("200k"):
        h["bulk_200k_tokens_per_s"] = bulk["200k"]["tokens_per_s"]
        h["bulk_peak_rss_200k_mib"] = bulk["200k"]["peak_rss_mib"]
        h["rss_200k_vs_20k"] = ratio(bulk["200k"]["peak_rss_mib"], bulk["20k"]["peak_rss_mib"])
        # VmHWM includes the warm-up batch; the largest VmRSS sampled during each stream
        # (every 0.5 s) shows the stream's own growth.
        h["bulk_stream_max_rss_200k_mib"] = _stream_max_rss(bulk["200k"])
        h["stream_rss_200k_vs_20k"] = ratio(
            h["bulk_stream_max_rss_200k_mib"], h["bulk_stream_max_rss_20k_mib"]
        )
    inter = s.get("interactive", {})
    if inter:
        h["interactive_idle_p99_ms"] = inter["idle"]["latency_ms"]["p99"]
        h["interactive_bulk_p99_ms"] = inter["during_bulk"]["latency_ms"]["p99"]
    over = s.get("overload", {})
    for name in OVERLOAD_SERVERS:
        if name in over:
            o = over[name]
            key = _overload_key(name)
            h[f"{key}_capacity_p99_ms"] = o["at_capacity"]["latency_ms"]["p99"]
            h[f"{key}_admitted_p99_ms"] = o["overload_4x"]["latency_ms"]["p99"]
            h[f"{key}_goodput_rps"] = o["overload_4x"]["rps"]
            h[f"{key}_capacity_rps"] = o["at_capacity"]["rps"]
            rej = o["overload_4x"]["error_latency_ms"].get("RESOURCE_EXHAUSTED")
            h[f"{key}_rejected"] = o["overload_4x"]["errors"].get("RESOURCE_EXHAUSTED", 0)
            h[f"{key}_measured"] = o["overload_4x"]["measured"]
            h[f"{key}_reject_p50_ms"] = rej["p50"] if rej else None
            h[f"{key}_reject_p99_ms"] = rej["p99"] if rej else None
            # Calls gRPC's core shed before Python saw them (--max-pending-calls).
            shed = o["overload_4x"]["error_latency_ms"].get("CANCELLED")
            h[f"{key}_shed"] = o["overload_4x"]["errors"].get("CANCELLED", 0)
            h[f"{key}_shed_p99_ms"] = shed["p99"] if shed else None
            if o.get("envoy_refusal_ms", {}).get("count"):
                h[f"{key}_envoy_refusal_p99_ms"] = o["envoy_refusal_ms"]["p99"]
    cache = s.get("cache_repeats", {})
    on, off = _rounds(cache, "cache_on"), _rounds(cache, "cache_off")
    if on and off:
        for label, runs in (("on", on), ("off", off)):
            h[f"cache_{label}_rps"] = median([r["rps"] for r in runs])
            h[f"cache_{label}_p50_ms"] = median([r["latency_ms"]["p50"] for r in runs])
            h[f"cache_{label}_p99_ms"] = median([r["latency_ms"]["p99"] for r in runs])
        h["cache_hit_ratio"] = median([r["cache_hit_ratio"] for r in on])
        h["cache_speedup"] = median(
            [ratio(a["rps"], b["rps"]) for a, b in zip(on, off, strict=False)]
        )
    return h


def _stream_max_rss(run: Json) -> float:
    samples = run.get("rss_samples") or []
    return max((float(x[1]) for x in samples), default=math.nan)


FAST_REJECTION_MS = 50.0


def targets(h: Json) -> list[Json]:
    """One row per target of issue 6: measured, threshold, pass/fail (None: not measured)."""
    rows: list[Json] = []

    def row(name: str, measured: str, threshold: str, ok: bool | None) -> None:
        rows.append({"target": name, "measured": measured, "threshold": threshold, "pass": ok})

    if "unary_vs_ceiling" in h:
        v = h["unary_vs_ceiling"]
        row(
            "Unary single text, 64 callers: share of the ceiling (tokens/s)",
            f"{v:.0%} ({h['unary_c64_tokens_per_s']:.0f} / {h['round_ceiling_tokens_per_s']:.0f})",
            ">= 85%",
            v >= 0.85,
        )
    else:
        row("Unary single text, 64 callers: share of the ceiling", "—", ">= 85%", None)
    if "unary_vs_infinity" in h:
        v = h["unary_vs_infinity"]
        row(
            "Unary single text, 64 callers: x infinity-emb (req/s)",
            f"{v:.2f}x ({h['unary_c64_rps']:.0f} / {h['infinity_c64_rps']:.0f})",
            ">= 3x",
            v >= 3.0,
        )
    else:
        row("Unary single text, 64 callers: x infinity-emb", "not measured", ">= 3x", None)
    if "coalesce_vs_ceiling" in h:
        v = h["coalesce_vs_ceiling"]
        row(
            "The same 64 single-text callers through the Python client's coalesce=True: "
            "share of the ceiling",
            f"{v:.0%} ({h['coalesce_c64_tokens_per_s']:.0f} / "
            f"{h['round_ceiling_tokens_per_s']:.0f}); {h['coalesce_vs_unary']:.2f}x the "
            "callers' own calls",
            ">= 85%",
            v >= 0.85,
        )
    if "coalesce_vs_infinity" in h:
        v = h["coalesce_vs_infinity"]
        row(
            "The same, coalescing: x infinity-emb (req/s)",
            f"{v:.2f}x ({h['coalesce_c64_rps']:.0f} / {h['infinity_c64_rps']:.0f})",
            ">= 3x",
            v >= 3.0,
        )
    if "c1_p50_minus_forward_ms" in h:
        v = h["c1_p50_minus_forward_ms"]
        row(
            "p50 at concurrency 1 minus the batch-1 forward time",
            f"{v:+.1f} ms (p50 {h['unary_c1_p50_ms']:.1f} ms, forward "
            f"{h['round_forward_batch1_ms']:.1f} ms)",
            "<= +2 ms",
            v <= 2.0,
        )
    if "bulk_vs_ceiling" in h:
        v = h["bulk_vs_ceiling"]
        row(
            "Bulk EmbedStream (20k texts): share of the ceiling (tokens/s)",
            f"{v:.0%} ({h['bulk_tokens_per_s']:.0f} / {h['bulk_ceiling_tokens_per_s']:.0f})",
            ">= 90%",
            v >= 0.90,
        )
    if "rss_200k_vs_20k" in h:
        v = h["rss_200k_vs_20k"]
        row(
            "Peak RSS, 200k-text run vs 20k-text run",
            f"{v - 1:+.1%} ({h['bulk_peak_rss_200k_mib']:.0f} vs "
            f"{h['bulk_peak_rss_20k_mib']:.0f} MiB)",
            "within 10%",
            abs(v - 1) <= 0.10,
        )
        w = h["stream_rss_200k_vs_20k"]
        row(
            "Largest VmRSS sampled during the stream, 200k vs 20k",
            f"{w - 1:+.1%} ({h['bulk_stream_max_rss_200k_mib']:.0f} vs "
            f"{h['bulk_stream_max_rss_20k_mib']:.0f} MiB)",
            "within 10%",
            abs(w - 1) <= 0.10,
        )
    else:
        row(
            "Peak RSS, 200k-text run vs 20k-text run",
            "not run (needs --full)",
            "within 10%",
            None,
        )
    if "interactive_bulk_p99_ms" in h and "forward_max_ms" in h:
        limit = h["interactive_idle_p99_ms"] + h["forward_max_ms"]
        row(
            "Interactive p99 during a saturating bulk stream",
            f"{h['interactive_bulk_p99_ms']:.0f} ms (idle p99 "
            f"{h['interactive_idle_p99_ms']:.0f} ms)",
            f"<= idle p99 + max forward ({limit:.0f} ms)",
            h["interactive_bulk_p99_ms"] <= limit,
        )
    for name, label in OVERLOAD_SERVERS.items():
        key = _overload_key(name)
        if f"{key}_admitted_p99_ms" not in h:
            continue
        admitted = h[f"{key}_admitted_p99_ms"]
        cap = h[f"{key}_capacity_p99_ms"]
        row(
            f"Overload 4x ({label}): admitted p99 vs p99 at capacity",
            f"{ratio(admitted, cap):.1f}x ({admitted:.0f} vs {cap:.0f} ms)",
            "<= 2x",
            admitted <= 2 * cap,
        )
        rej = h.get(f"{key}_reject_p99_ms")
        row(
            f"Overload 4x ({label}): RESOURCE_EXHAUSTED comes back fast",
            "no rejection"
            if rej is None
            else f"p99 {rej:.1f} ms ({h[f'{key}_rejected']} of {h[f'{key}_measured']} calls)"
            + _refusal_notes(h, key),
            f"p99 <= {FAST_REJECTION_MS:.0f} ms",
            None if rej is None else rej <= FAST_REJECTION_MS,
        )
    return rows


def _refusal_notes(h: Json, key: str) -> str:
    note = ""
    envoy_p99 = h.get(f"{key}_envoy_refusal_p99_ms")
    if envoy_p99 is not None:
        note += f"; Envoy's own time to refuse, from its access log: p99 {envoy_p99:.0f} ms"
    shed, p99 = h.get(f"{key}_shed", 0), h.get(f"{key}_shed_p99_ms")
    if shed and p99 is not None:
        note += f"; and {shed} shed by gRPC's core as CANCELLED, p99 {p99:.1f} ms"
    return note


def _pf(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "FAIL")


def _lat_row(label: str, r: Json | None, extra: str = "") -> str:
    if not r:
        return f"| {label} | — | — | — | — | — | — | {extra} |"
    lat = r["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "—"
    cpu = r.get("server_cpu_ms_per_request")
    return (
        f"| {label} | {_fmt(r['rps'])} | {_fmt(r['tokens_per_s'], 0)} | {_fmt(lat['p50'])} | "
        f"{_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {errors} | "
        f"{_fmt(cpu, 2) if cpu is not None else ''}{extra} |"
    )


LAT_HEADER = (
    "| Load | req/s | tokens/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms/req |\n"
    "|---|---:|---:|---:|---:|---:|---|---:|"
)


def markdown(results: Json) -> str:
    h = headline(results)
    s = results.get("scenarios", {})
    m = results.get("machine", {})
    # Runs before the setting existed were all float32.
    dtype = results.get("settings", {}).get("dtype", "float32")
    out: list[str] = ["# embedserve benchmark results", ""]
    out.append(
        f"{m.get('date', '')}, {m.get('cpu_model', '?')}, {m.get('cores_usable', '?')} cores, "
        f"{m.get('memory_gib', '?')} GiB, torch {m.get('torch', '?')} "
        f"({m.get('torch_threads', '?')} threads), every model in {dtype}, "
        f"transformers {m.get('transformers', '?')}, "
        f"grpcio {m.get('grpcio', '?')}. Load average at start/end: "
        f"{_fmt_load(m.get('loadavg_start'))} / {_fmt_load(m.get('loadavg_end'))}. "
        f"Wall time {results.get('wall_s', '?')} s."
    )
    out += ["", "## Targets", "", "| Target | Measured | Threshold | Result |", "|---|---|---|---|"]
    for t in targets(h):
        out.append(f"| {t['target']} | {t['measured']} | {t['threshold']} | {_pf(t['pass'])} |")
    out += ["", "## Headline", "", "| Figure | Value |", "|---|---:|"]
    for key, value in h.items():
        out.append(f"| {key} | {_fmt(value, 2)} |")

    ceiling = s.get("ceiling")
    if ceiling:
        out += [
            "",
            "## Ceiling (model alone, short sentences)",
            "",
            "| batch | length-sorted | forward | tokens/s | sentences/s | padding |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for r in ceiling["sweep"]:
            out.append(
                f"| {r['batch_size']} | {'yes' if r['sorted'] else 'no'} | {_forward(r)} | "
                f"{_fmt(r['tokens_per_s'], 0)} | {_fmt(r['sentences_per_s'])} | "
                f"{r['padding_ratio']:.0%} |"
            )
        less = ceiling.get("best_one_thread_less")
        if less:
            out.append(
                f"| {less['batch_size']} ({less['threads']} thread) | "
                f"{'yes' if less['sorted'] else 'no'} | {_forward(less)} | "
                f"{_fmt(less['tokens_per_s'], 0)} | "
                f"{_fmt(less['sentences_per_s'])} | {less['padding_ratio']:.0%} |"
            )
        f1, fm = ceiling["forward_batch1_ms"], ceiling["forward_max_ms"]
        out.append("")
        out.append(
            f"Batch-1 forward ({f1['tokens']} tokens): {f1['median_ms']:.1f} ms median. "
            f"Max-size forward ({fm['batch_size']} x {fm['width']} tokens): "
            f"{fm['median_ms']:.0f} ms."
        )

    unary = s.get("unary")
    if unary:
        out += ["", "## Unary, one short sentence a request (interleaved rounds)", "", LAT_HEADER]
        for i, row in enumerate(unary.get("rounds", [])):
            for key in (
                "embedserve_c64",
                "embedserve_c64_coalesce",
                "naive_c64",
                "infinity_c64",
                "embedserve_c1",
            ):
                if key in row:
                    out.append(_lat_row(f"round {i}: {key}", row[key]))
            if "ceiling" in row:
                c = row["ceiling"]
                out.append(
                    f"| round {i}: ceiling bs={c['batch_size']} | {_fmt(c['sentences_per_s'])} | "
                    f"{_fmt(c['tokens_per_s'], 0)} | | | | | |"
                )
        for c, r in unary.get("curve", {}).items():
            out.append(_lat_row(f"embedserve c={c}", r))
        polite = unary.get("embedserve_c256_client_retries")
        if polite:
            out.append(_lat_row("embedserve c=256, retrying as the Python client", polite))
        for key in sorted(k for k in unary if k.startswith(("naive_c", "infinity_c"))):
            out.append(_lat_row(key, unary[key]))

    bulk = s.get("bulk")
    if bulk:
        out += [
            "",
            "## Bulk EmbedStream",
            "",
            "| Run | texts/s | tokens/s | seconds | RSS before MiB | peak RSS (VmHWM) MiB "
            "| max VmRSS during the stream MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key in ("20k", "200k"):
            r = bulk.get(key)
            if r:
                out.append(
                    f"| {key} | {_fmt(r['inputs_per_s'])} | {_fmt(r['tokens_per_s'], 0)} | "
                    f"{_fmt(r['elapsed_s'])} | {_fmt(r['rss_before_mib'], 0)} | "
                    f"{_fmt(r['peak_rss_mib'], 0)} | {_fmt(_stream_max_rss(r), 0)} |"
                )
            else:
                out.append(f"| {key} | not run (--full) | | | | |")
        if "ceiling_before" in bulk:
            out.append("")
            out.append(
                f"Ceiling on the same corpus: {bulk['ceiling_before']['tokens_per_s']:.0f} tok/s "
                f"before, {bulk['ceiling_after']['tokens_per_s']:.0f} after "
                f"(batch {bulk['ceiling_before']['batch_size']}, "
                f"sorted={bulk['ceiling_before']['sorted']})."
            )

    sections = [
        ("interactive", "Interactive calls beside a saturating bulk stream (open loop)"),
        ("rerank", "Rerank, 1 query x 100 documents"),
        ("mixed", "Mixed lengths, 16-512 tokens (truncated at 256), one text a request"),
    ]
    for key, title in sections:
        scen = s.get(key)
        if not scen:
            continue
        out += ["", f"## {title}", "", LAT_HEADER]
        for name, r in scen.items():
            if isinstance(r, dict) and "latency_ms" in r:
                out.append(_lat_row(name, r))
        if key == "interactive" and "bulk" in scen:
            out.append("")
            out.append(f"Bulk beside it: {scen['bulk']['tokens_per_s']:.0f} tokens/s.")
        if key == "mixed" and "ceiling" in scen:
            out.append("")
            out.append(
                "Ceiling on the same texts: "
                + "; ".join(
                    f"bs {c['batch_size']} {'sorted' if c['sorted'] else 'unsorted'} "
                    f"{_forward(c)} {c['tokens_per_s']:.0f} tok/s"
                    for c in scen["ceiling"]
                )
                + "."
            )

    envoy = s.get("envoy")
    if envoy:
        out += [
            "",
            f"## Envoy, {envoy['replicas']} replicas x {envoy['threads_each']} thread(s), "
            "vs the same replicas called directly",
            "",
            LAT_HEADER,
        ]
        for i, row in enumerate(envoy["rounds"]):
            for name, r in row.items():
                out.append(_lat_row(f"round {i}: {name}", r))

    over = s.get("overload")
    if over:
        out += ["", "## Overload at 4x capacity (open loop, Poisson)", "", LAT_HEADER]
        for name in OVERLOAD_SERVERS:
            if name in over:
                o = over[name]
                out.append(_lat_row(f"{name}: at capacity (c=64)", o["at_capacity"]))
                out.append(_lat_row(f"{name}: 4x = {o['rate']:.0f}/s", o["overload_4x"]))
                rej = o["overload_4x"]["error_latency_ms"].get("RESOURCE_EXHAUSTED")
                if rej:
                    out.append(
                        f"| {name}: RESOURCE_EXHAUSTED latency | | | {_fmt(rej['p50'])} | "
                        f"{_fmt(rej['p95'])} | {_fmt(rej['p99'])} | | |"
                    )
                lag = o["overload_4x"].get("send_lag_ms")
                if lag and lag.get("count"):
                    out.append(
                        f"| {name}: the load generator's own send lag | | | {_fmt(lag['p50'])} | "
                        f"{_fmt(lag['p95'])} | {_fmt(lag['p99'])} | | |"
                    )
                own = o.get("envoy_refusal_ms")
                if own and own.get("count"):
                    out.append(
                        f"| {name}: Envoy's own refusal time (access log, whole ms) | | | "
                        f"{_fmt(own['p50'])} | {_fmt(own['p95'])} | {_fmt(own['p99'])} | "
                        f"{own['count']} refused | |"
                    )

    tele = s.get("telemetry")
    if tele:
        out += ["", "## Telemetry overhead (unary, 64 callers, interleaved)", "", LAT_HEADER]
        for i, row in enumerate(tele["rounds"]):
            for name, r in row.items():
                out.append(_lat_row(f"round {i}: {name}", r))
        base = _rounds(tele, "no OTEL variables")
        for variant in tele["variants"][1:]:
            runs = _rounds(tele, variant)
            if runs and base:
                rel = median([ratio(a["rps"], b["rps"]) for a, b in zip(runs, base, strict=False)])
                out.append("")
                out.append(f"{variant}: {rel:.1%} of the throughput with no OTEL variables.")

    cache = s.get("cache_repeats")
    if cache:
        out += [
            "",
            f"## Embedding cache, {cache['repeat_share']:.0%} of requests repeat an earlier text "
            f"(32 callers, --cache-bytes {cache['cache_bytes']} vs off, interleaved)",
            "",
            LAT_HEADER,
        ]
        for i, row in enumerate(cache["rounds"]):
            for name, r in row.items():
                out.append(_lat_row(f"round {i}: {name}", r, f" (hits {r['cache_hit_ratio']:.0%})"))
        on, off = _rounds(cache, "cache_on"), _rounds(cache, "cache_off")
        if on and off:
            rel = median([ratio(a["rps"], b["rps"]) for a, b in zip(on, off, strict=False)])
            p99 = median(
                [
                    ratio(a["latency_ms"]["p99"], b["latency_ms"]["p99"])
                    for a, b in zip(on, off, strict=False)
                ]
            )
            hits = median([r["cache_hit_ratio"] for r in on])
            out.append("")
            out.append(
                f"With the cache: {rel:.2f}x the throughput and {p99:.2f}x the p99 latency of "
                f"the same server without it, at a {hits:.0%} hit ratio."
            )

    levers = s.get("levers")
    if levers:
        out += [
            "",
            "## Levers measured in this run (unary, 64 callers, interleaved)",
            "",
            LAT_HEADER,
        ]
        for i, row in enumerate(levers["rounds"]):
            for name, r in row.items():
                out.append(_lat_row(f"round {i}: {name}", r))
        base = _rounds(levers, "bytes")
        for variant in (
            "float32",
            "threads_fewer",
            "omp_passive",
            "batch_32",
            "forward_nice",
            "dtype_bf16",
            "dtype_int8",
            "padded",
            "one_worker",
        ):
            runs = _rounds(levers, variant)
            if runs and base:
                rel = median([ratio(a["rps"], b["rps"]) for a, b in zip(runs, base, strict=False)])
                out.append("")
                out.append(
                    f"{variant}: {rel:.1%} of the throughput of the default server "
                    "(float32_bytes, all cores, default OpenMP wait policy)."
                )

    prof = s.get("profile")
    if prof:
        out += ["", "## Profile of the server under 64 unary callers (py-spy)"]
        for mode in ("all", "gil"):
            p = prof.get(mode, {})
            summary = p.get("summary")
            if not summary or not summary.get("samples"):
                continue
            title = "every thread" if mode == "all" else "only samples holding the GIL"
            out += ["", f"### {title} ({summary['samples']} samples)", ""]
            out.append("Threads: " + ", ".join(f"{k} {v}%" for k, v in summary["threads"].items()))
            out.append("")
            out.append(
                "Components: "
                + ", ".join(f"{k} {v}%" for k, v in summary["components_pct"].items())
            )
            out += ["", "| Top frames (self) | % |", "|---|---:|"]
            for label, pct in summary["top_self_pct"][:12]:
                out.append(f"| `{label}` | {pct} |")

    skipped = results.get("skipped", {})
    if skipped:
        out += ["", "## Skipped", ""]
        for name, why in skipped.items():
            out.append(f"- **{name}**: {why}")
    idle = results.get("idle_cpu_pct")
    if idle:
        out += ["", "Idle CPU of the waiting services (%): " + json.dumps(idle)]
    timings = results.get("timings_s")
    if timings:
        out += ["", "Scenario wall times (s): " + json.dumps(timings)]
    return "\n".join(out) + "\n"


def _fmt_load(load: Any) -> str:
    if not load:
        return "?"
    return "/".join(f"{x:.1f}" for x in load)


# -- plots ------------------------------------------------------------------------------------


def plots(results: Json, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results.get("scenarios", {})
    written: list[Path] = []
    unary = s.get("unary")
    if unary:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curve: dict[int, float] = {}
        es1 = _rounds(unary, "embedserve_c1")
        es64 = _rounds(unary, "embedserve_c64")
        if es1:
            curve[1] = median([r["rps"] for r in es1])
        if es64:
            curve[64] = median([r["rps"] for r in es64])
        for c, r in unary.get("curve", {}).items():
            curve[int(c)] = r["rps"]
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], "o-", label="embedserve")
        for peer, marker in (("naive", "s--"), ("infinity", "^--")):
            pts: dict[int, float] = {}
            rounds64 = _rounds(unary, f"{peer}_c64")
            if rounds64:
                pts[64] = median([r["rps"] for r in rounds64])
            for key, r in unary.items():
                if key.startswith(f"{peer}_c") and isinstance(r, dict) and "rps" in r:
                    pts[int(key.rsplit("_c", 1)[1])] = r["rps"]
            if pts:
                px = sorted(pts)
                label = "naive server" if peer == "naive" else "infinity-emb (REST)"
                ax.plot(px, [pts[x] for x in px], marker, label=label)
        ceiling = s.get("ceiling", {}).get("best")
        if ceiling:
            ax.axhline(
                ceiling["sentences_per_s"],
                color="grey",
                linestyle=":",
                label=f"ceiling (model alone, batch {ceiling['batch_size']})",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers (closed loop)")
        ax.set_ylabel("requests/s (one short sentence each)")
        ax.set_title("Unary throughput vs concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out / "throughput_vs_concurrency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bars: list[tuple[str, Json]] = []
    if unary:
        for c in ("1", "8", "64", "256"):
            rs = _rounds(unary, f"embedserve_c{c}")
            if rs:
                bars.append((f"c={c}", rs[len(rs) // 2]))  # the middle round
            elif c in unary.get("curve", {}):
                bars.append((f"c={c}", unary["curve"][c]))
        for key, label in (("naive_c64", "naive c=64"), ("infinity_c64", "infinity c=64")):
            rs = _rounds(unary, key)
            if rs:
                bars.append((label, rs[len(rs) // 2]))
    inter = s.get("interactive")
    if inter:
        bars += [("interactive idle", inter["idle"]), ("interactive +bulk", inter["during_bulk"])]
    over = s.get("overload", {})
    for name in OVERLOAD_SERVERS:
        if name in over:
            label = "overload 4x" if name == "embedserve" else f"overload 4x {name}"
            bars.append((label, over[name]["overload_4x"]))
    if s.get("rerank"):
        bars.append(("rerank 1x100 c=4", s["rerank"]["c4"]))
    if s.get("mixed"):
        bars.append(("mixed c=32", s["mixed"]["c32"]))
    envoy = s.get("envoy")
    if envoy and envoy["rounds"]:
        bars.append(("envoy c=64", envoy["rounds"][0]["envoy_c64"]))
        bars.append(("direct c=64", envoy["rounds"][0]["direct_c64"]))
    if bars:
        fig, ax = plt.subplots(figsize=(max(8, len(bars) * 0.8), 4.8))
        width = 0.27
        for i, (q, color) in enumerate((("p50", "C0"), ("p95", "C1"), ("p99", "C3"))):
            values = [b[1]["latency_ms"][q] for b in bars]
            ax.bar(
                [x + (i - 1) * width for x in range(len(bars))],
                values,
                width,
                label=q,
                color=color,
            )
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[0] for b in bars], rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_title("Latency percentiles by scenario (successful calls)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "latency_percentiles.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ceiling_s = s.get("ceiling")
    if ceiling_s:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sort, style in ((False, "o-"), (True, "s--")):
            sweep = [r for r in ceiling_s["sweep"] if r["sorted"] == sort or r["batch_size"] == 1]
            ax.plot(
                [r["batch_size"] for r in sweep],
                [r["tokens_per_s"] for r in sweep],
                style,
                label="length-sorted batches" if sort else "arrival-order batches",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s (model alone)")
        ax.set_title("Ceiling: forward throughput vs batch size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "ceiling_batch_sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bulk = s.get("bulk")
    if bulk and bulk.get("20k"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("20k", "200k"):
            r = bulk.get(key)
            if r and r.get("rss_samples"):
                t = [x[0] for x in r["rss_samples"]]
                ax.plot(t, [x[1] for x in r["rss_samples"]], label=f"{key}: VmRSS")
        ax.set_xlabel("seconds into the stream")
        ax.set_ylabel("server RSS (MiB)")
        ax.set_title("Server memory during bulk EmbedStream")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "bulk_rss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(results: Json, out: Path) -> None:
    results["headline"] = headline(results)
    results["targets"] = targets(results["headline"])
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    try:
        plots(results, out)
    except ImportError as exc:  # matplotlib missing: tables still get written
        results.setdefault("skipped", {})["plots"] = f"matplotlib not installed: {exc}"
    (out / "results.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    write_all(results, args.results.parent)
    print((args.results.parent / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
