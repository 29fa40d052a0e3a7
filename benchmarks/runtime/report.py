"""The result table of benchmarks/runtime: one row per (model, concurrency, server), every ratio to ours.

Pure functions over the summaries ``loadgen.summarize`` returns (plus ``model``, ``label``, ``config``), so
they are unit-tested without a server (tests/unit/benchmarks).
"""

from __future__ import annotations

METRICS = (("rps", "req/s"), ("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def ratio(value: float | None, ours: float | None) -> float | None:
    """peer / ours; None when either side is missing or ours is 0."""
    if value is None or ours is None or ours == 0:
        return None
    return value / ours


def ratios(row: dict, ours: dict | None) -> dict[str, float | None]:
    """Every ratio of a row to ours at the same model and concurrency: peer / ours for req/s and the
    latencies (req/s 0.25 = a quarter of our throughput; p99 4.0 = four times our p99)."""
    return {key: ratio(row.get(key), (ours or {}).get(key)) for key, _ in METRICS}


def with_ratios(rows: list[dict], ours_label: str) -> list[dict]:
    """Copies of ``rows`` with ``vs_ours`` added, ours being the row labelled ``ours_label`` of the same
    model and concurrency (a row of a model/concurrency where ours did not run gets all-None ratios)."""
    ours = {(r["model"], r["concurrency"]): r for r in rows if r["label"] == ours_label}
    return [{**r, "vs_ours": ratios(r, ours.get((r["model"], r["concurrency"])))} for r in rows]


def _num(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def table(rows: list[dict], ours_label: str) -> str:
    """The markdown table: model, c, server, req/s, p50/p99/p99.9 (ms), each ÷ ours, errors, 1-min load."""
    head = (
        "| model | c | server | req/s | p50 ms | p99 ms | p99.9 ms | req/s ÷ ours | p50 ÷ ours | p99 ÷ ours "
        "| p99.9 ÷ ours | errors | load |"
    )
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(with_ratios(rows, ours_label), key=lambda r: (r["model"], r["concurrency"], -r["rps"])):
        v = r["vs_ours"]
        label = f"**{r['label']}**" if r["label"] == ours_label else r["label"]
        if r.get("mean_batch_rows"):
            label += f" ({r['mean_batch_rows']:.1f} rows/forward)"
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {label} | {_num(r['rps'], 0)} | {_num(r['p50_ms'], 3)} "
            f"| {_num(r['p99_ms'], 2)} | {_num(r['p999_ms'], 2)} | {_ratio(v['rps'])} | {_ratio(v['p50_ms'])} "
            f"| {_ratio(v['p99_ms'])} | {_ratio(v['p999_ms'])} | {r['errors']} | {r['loadavg_1m']:.1f} |"
        )
    return "\n".join(lines)


def failures_table(failures: list) -> str:
    """Every peer or target that is in no row, with the stage it failed at and why."""
    if not failures:
        return "Every selected peer was installed, started, answered correctly and was measured."
    lines = ["| peer | model | target | stage | reason |", "|---|---|---|---|---|"]
    for f in failures:
        reason = " ".join(str(f.reason).split()).replace("|", "\\|")
        lines.append(f"| {f.peer} | {f.model or '—'} | {f.target or '—'} | {f.stage} | {reason} |")
    return "\n".join(lines)


def configs_table(configs: list[tuple[str, str, str]]) -> str:
    """(model, server label, configuration) rows: the configuration each server was measured in."""
    lines = ["| model | server | configuration |", "|---|---|---|"]
    lines += [f"| {m} | {label} | {cfg} |" for m, label, cfg in configs]
    return "\n".join(lines)


def close_enough(got: list[float], want: list[float], rtol: float = 1e-3, atol: float = 1e-4) -> str | None:
    """None when ``got`` matches ``want`` (the golden output of the same row), else what differs."""
    if len(got) != len(want):
        return f"{len(got)} numbers, want {len(want)}"
    worst = max(range(len(want)), key=lambda i: abs(got[i] - want[i]) - rtol * abs(want[i]), default=None)
    if worst is not None and abs(got[worst] - want[worst]) > atol + rtol * abs(want[worst]):
        return f"output[{worst}] = {got[worst]!r}, want {want[worst]!r}"
    return None
