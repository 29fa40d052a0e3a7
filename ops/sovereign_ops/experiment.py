"""`sovereign-ops experiment report NAME`: an A/B experiment's records from every host and color, joined and judged
(docs/adr/1420 for the records, docs/adr/1421 for the statistics; how to read one: docs/runbooks/experiment-report.md).

Input: the dumps of each color's experiment database (``python -m sovereign_runtime.experiment DIR NAME`` on the
host, one JSON document per color), read over SSH or given as files (``--dump``). Pure functions from there on.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from typing import Any

from . import stats

ALPHA = 0.05
SRM_P = 0.001  # below this the split is broken, not unlucky (GrowthBook, Statsig use the same order)
BINARY = "binary"
CONTINUOUS = "continuous"
BUCKETS = 20
# Each host must give each arm at least this many requests (the definition's min_samples_per_host, else this):
# a host whose traffic never reached the experiment (its split not set, its clients elsewhere) cannot pass.
MIN_SAMPLES_PER_HOST = 100
NO_HOST = "(unnamed host)"  # a dump without a host name (a file given by hand)

# Run on a host (python3, stdlib): every color of the host contract that has an experiment_dir, dumped by the
# color's own venv (its sovereign_runtime), one JSON line: {"dumps": [{color, ...dump}], "errors": [...]}.
_REMOTE = r"""
import json, subprocess, sys
name, fact = sys.argv[1], sys.argv[2]
out = {"dumps": [], "errors": []}
try:
    colors = json.load(open(fact))["runtime"]["colors"]
except (OSError, ValueError, KeyError, TypeError) as exc:
    out["errors"].append(f"host contract {fact}: no runtime.colors ({type(exc).__name__}: {exc})")
    colors = {}
for color, spec in sorted(colors.items()):
    where = spec.get("experiment_dir")
    if not where:
        out["errors"].append(f"{color}: no experiment_dir in the host contract (converge inference_runtime)")
        continue
    py = spec.get("venv", "") + "/bin/python"
    try:
        run = subprocess.run([py, "-m", "sovereign_runtime.experiment", where, name], capture_output=True, timeout=300)
    except OSError as exc:
        out["errors"].append(f"{color}: {py}: {exc}")
        continue
    if run.returncode != 0:
        out["errors"].append(f"{color}: {(run.stderr or run.stdout).decode(errors='replace').strip()[-300:]}")
        continue
    doc = json.loads(run.stdout)
    doc["color"] = color
    out["dumps"].append(doc)
print(json.dumps(out, separators=(",", ":")))
"""


def remote_command(name: str, fact: str | None = None) -> str:
    return shlex.join(["python3", "-c", _REMOTE, name, fact or "/etc/ansible/facts.d/sovereign.fact"])


def parse_remote(host: str, rc: int, stdout: str, stderr: str = "") -> tuple[list[dict], list[str]]:
    if rc != 0:
        text = (stderr or stdout or "").strip()
        return [], [f"{host}: {text.splitlines()[-1][:200] if text else f'exit {rc}'}"]
    try:
        data = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [], [f"{host}: unreadable answer {stdout.strip()[:120]!r}"]
    dumps = []
    for doc in data.get("dumps", []):
        doc["host"] = host
        dumps.append(doc)
    return dumps, [f"{host}: {e}" for e in data.get("errors", [])]


# ----------------------------------------------------------------------------------------------------- the report


def _definition(dumps: list[dict]) -> dict | None:
    found = [d["definition"] for d in dumps if d.get("definition")]
    # The newest experiment of that name; of its colors' copies one that knows the end (a color that never read the
    # end file keeps the definition without it).
    return max(found, key=lambda d: (_number(d.get("started"), 0.0), "ends" in d)) if found else None


def _number(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) and out > 0 else default


def _kind(values: list[float], declared: str | None) -> str:
    if declared in (BINARY, CONTINUOUS):
        return declared
    return BINARY if values and all(v in (0.0, 1.0) for v in values) else CONTINUOUS


def _metric(values: list[float], kind: str, alpha: float) -> dict:
    n = len(values)
    if kind == BINARY:
        x = int(sum(values))
        return {"kind": kind, "n": n, "mean": x / n if n else None, "ci": list(stats.wilson(x, n, alpha)), "sum": x}
    mean, var = stats.mean_var(values)
    ci = stats.mean_ci(mean, var, n, alpha) if n > 1 else (None, None)
    return {"kind": kind, "n": n, "mean": mean if n else None, "sd": math.sqrt(var), "ci": [ci[0], ci[1]]}


def _compare(a: list[float], b: list[float], kind: str, alpha: float) -> stats.Comparison | None:
    if kind == BINARY:
        return stats.two_proportions(int(sum(a)), len(a), int(sum(b)), len(b), alpha)
    ma, va = stats.mean_var(a)
    mb, vb = stats.mean_var(b)
    return stats.welch(ma, va, len(a), mb, vb, len(b), alpha)


def build(
    name: str,
    dumps: list[dict],
    alpha: float = ALPHA,
    metric_kind: str | None = None,
    higher_is_better: bool | None = None,
    min_samples: int | None = None,
    min_samples_per_host: int | None = None,
) -> dict[str, Any]:
    """The report of experiment NAME from its dumps: per-arm numbers, the comparison, the SRM check, the verdict."""
    notes: list[str] = []
    definition = _definition(dumps) or {}
    if not definition:
        notes.append("no experiment definition in any database: arms are the colors in name order, split 50/50")
    arms_def = definition.get("arms") or {}
    colors = sorted({row[1] for d in dumps for row in d.get("assignments", [])})
    arm_color = {
        "A": (arms_def.get("A") or {}).get("color") or (colors[0] if colors else "blue"),
        "B": (arms_def.get("B") or {}).get("color") or (colors[1] if len(colors) > 1 else "green"),
    }
    share_b = float(definition.get("split", 50)) / 100.0
    higher = definition.get("higher_is_better", True) if higher_is_better is None else higher_is_better
    min_n = int(min_samples if min_samples is not None else definition.get("min_samples") or 0)
    per_host = definition.get("min_samples_per_host", MIN_SAMPLES_PER_HOST)
    min_host = int(min_samples_per_host if min_samples_per_host is not None else per_host or 0)
    declared = metric_kind or definition.get("metric_kind")

    # Outcomes: the latest per request id, wherever it was received.
    outcome: dict[str, tuple[float, float]] = {}
    for d in dumps:
        for rid, value, t in d.get("outcomes", []):
            if rid not in outcome or t >= outcome[rid][1]:
                outcome[rid] = (float(value), float(t))
    rows_by_arm: dict[str, list] = {"A": [], "B": []}
    seen: dict[str, int] = {}
    other = 0
    # The experiment's window, [started, ends): a color that read the end of the experiment late recorded past it
    # (each color applies the end when it reads its experiment.json); those rows are left out for both arms alike.
    w_start = _number(definition.get("started"), -math.inf)
    w_end = min(_number(definition.get("ends"), math.inf), _number(definition.get("expires"), math.inf))
    outside = 0
    # Requests per host and arm: every host of the definition (the playbook names them) and of the dumps.
    by_host: dict[str, dict[str, int]] = {h: {"A": 0, "B": 0} for h in definition.get("hosts") or []}
    for d in dumps:
        counts = by_host.setdefault(d.get("host") or NO_HOST, {"A": 0, "B": 0})
        for row in d.get("assignments", []):
            rid, color, _model, version = row[0], row[1], row[2], row[3]
            if not w_start <= float(row[4]) < w_end:
                outside += 1
                continue
            arm = "A" if color == arm_color["A"] else "B" if color == arm_color["B"] else None
            want = (arms_def.get(arm) or {}).get("version") if arm else None
            if arm is None or (want is not None and str(want) != str(version)):
                other += 1
                continue
            rows_by_arm[arm].append(row)
            counts[arm] += 1
            if rid is not None:
                seen[rid] = seen.get(rid, 0) + 1
    if other:
        notes.append(f"{other} request(s) left out: answered by a color or model version that is not an arm")
    if outside:
        notes.append(f"{outside} request(s) left out: recorded outside the experiment's window (started .. ends)")
    dup = sum(1 for n in seen.values() if n > 1)
    if dup:
        notes.append(f"{dup} request id(s) answered more than once (client ids reused): each answer takes the outcome")
    orphans = sum(1 for rid in outcome if rid not in seen)
    if orphans:
        notes.append(f"{orphans} outcome(s) for request ids this experiment did not record (other traffic, or typos)")

    t_all = [row[4] for rows in rows_by_arm.values() for row in rows]
    first, last = (min(t_all), max(t_all)) if t_all else (None, None)
    values: dict[str, list[float]] = {}
    arms = []
    for arm in ("A", "B"):
        rows = rows_by_arm[arm]
        n = len(rows)
        errors = sum(1 for r in rows if r[5] >= 500)
        client_errors = sum(1 for r in rows if 400 <= r[5] < 500)
        lat = sorted(r[6] for r in rows)
        vals = [outcome[r[0]][0] for r in rows if r[5] == 200 and r[0] is not None and r[0] in outcome]
        values[arm] = vals
        spec = arms_def.get(arm) or {}
        versions = sorted({str(r[3]) for r in rows})
        arms.append(
            {
                "arm": arm,
                "color": arm_color[arm],
                "model": spec.get("model") or (rows[0][2] if rows else None),
                "version": spec.get("version") or (versions[0] if len(versions) == 1 else versions),
                "hosts": sorted({d.get("host") or "" for d in dumps if d.get("color") == arm_color[arm]}),
                "requests": n,
                "errors": errors,
                "client_errors": client_errors,
                "error_rate": errors / n if n else None,
                "error_rate_ci": list(stats.wilson(errors, n, alpha)),
                "p50_ms": stats.percentile(lat, 0.50),
                "p99_ms": stats.percentile(lat, 0.99),
                "outcomes": len(vals),
                "outcome_coverage": len(vals) / n if n else None,
            }
        )
    kind = _kind(values["A"] + values["B"], declared)
    for arm in arms:
        arm["metric"] = _metric(values[arm["arm"]], kind, alpha)
    comparison = _compare(values["A"], values["B"], kind, alpha)
    errs = stats.two_proportions(arms[0]["errors"], arms[0]["requests"], arms[1]["errors"], arms[1]["requests"], alpha)
    chi2, p_srm = stats.srm(arms[0]["requests"], arms[1]["requests"], share_b)
    srm_doc = {
        "method": "chi-square goodness of fit (1 df)",
        "expected_share_b": share_b,
        "observed_share_b": arms[1]["requests"] / max(1, arms[0]["requests"] + arms[1]["requests"]),
        "chi2": chi2,
        "p_value": p_srm,
        "threshold": SRM_P,
        "mismatch": p_srm < SRM_P,
    }
    hosts = [{"host": h, "requests": c} for h, c in sorted(by_host.items())]
    verdict, reason = _verdict(comparison, srm_doc, arms, higher, alpha, min_n, hosts, min_host)
    report = {
        "experiment": name,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "definition": definition or None,
        "window": {"first": first, "last": last, "duration_s": (last - first) if t_all else 0.0},
        "alpha": alpha,
        "metric": {
            "name": definition.get("metric") or "outcome",
            "kind": kind,
            "higher_is_better": higher,
            "min_samples_per_arm": min_n,
            "min_samples_per_host": min_host,
        },
        "arms": arms,
        "hosts": hosts,
        "comparison": comparison.as_dict() if comparison else None,
        "relative_difference": (
            comparison.difference / arms[0]["metric"]["mean"] if comparison and arms[0]["metric"]["mean"] else None
        ),
        "error_rate_comparison": errs.as_dict() if errs else None,
        "srm": srm_doc,
        "verdict": verdict,
        "verdict_reason": reason,
        "notes": notes,
        "timeline": timeline(rows_by_arm, outcome, kind, alpha, first, last),
        "sources": [{"host": d.get("host"), "color": d.get("color"), "database": d.get("database")} for d in dumps],
    }
    return clean(report)


def _verdict(comp, srm_doc, arms, higher, alpha, min_n, hosts, min_host) -> tuple[str, str]:
    if srm_doc["mismatch"]:
        return "no verdict: sample ratio mismatch", (
            f"arm B got {srm_doc['observed_share_b']:.1%} of the requests, the split says "
            f"{srm_doc['expected_share_b']:.0%} (chi-square p = {srm_doc['p_value']:.2g} < {SRM_P}): the assignment "
            "is broken, the comparison cannot be trusted"
        )
    short = [a["arm"] for a in arms if a["requests"] < min_n]
    if short:
        return "not enough data", (
            f"arm(s) {', '.join(short)} got fewer than the minimum sample of {min_n} requests "
            "(" + ", ".join(f"{a['arm']}: {a['requests']}" for a in arms) + "): run the experiment longer"
        )
    least = max(min_host, 1)  # a host with no request in an arm never passes, whatever the minimum
    thin = [h for h in hosts if min(h["requests"].values()) < least]
    if thin:
        return "not enough data", (
            "host(s) "
            + "; ".join(f"{h['host']} (A: {h['requests']['A']}, B: {h['requests']['B']})" for h in thin)
            + f" gave an arm fewer than the minimum of {least} requests per host: that host's traffic did not "
            "reach the experiment (its split, its clients) or the experiment was too short for it; check the host, "
            "run longer, or leave it out of the experiment's hosts"
        )
    small = [a["arm"] for a in arms if a["metric"]["n"] < 2]
    if comp is None or small:
        return "not enough data", (
            f"arm(s) {', '.join(small) or 'A/B'} have fewer than 2 outcomes "
            "(" + ", ".join(f"{a['arm']}: {a['metric']['n']}" for a in arms) + ")"
        )
    if comp.p_value < alpha:
        b_wins = (comp.difference > 0) == bool(higher)
        winner = "B" if b_wins else "A"
        return f"{winner} better", (
            f"{comp.method}: B - A = {comp.difference:+.4g} ({1 - alpha:.0%} CI {comp.ci[0]:+.4g} .. "
            f"{comp.ci[1]:+.4g}), p = {comp.p_value:.3g} < {alpha}; {'higher' if higher else 'lower'} is better"
        )
    return "no detectable difference at this sample size", (
        f"{comp.method}: B - A = {comp.difference:+.4g} ({1 - alpha:.0%} CI {comp.ci[0]:+.4g} .. {comp.ci[1]:+.4g}), "
        f"p = {comp.p_value:.3g} >= {alpha}; this sample detects differences of about {comp.mde:.3g} or more "
        f"(80% power)"
    )


def timeline(rows_by_arm, outcome, kind, alpha, first, last) -> list[dict]:
    """Per arm and time bucket: requests, error rate, p99, and the cumulative outcome metric with its interval."""
    if first is None:
        return []
    width = max((last - first) / BUCKETS, 1e-9)
    out = []
    for arm, rows in rows_by_arm.items():
        cum: list[float] = []
        buckets: list[list] = [[] for _ in range(BUCKETS)]
        for row in rows:
            buckets[min(BUCKETS - 1, int((row[4] - first) / width))].append(row)
        for i, bucket in enumerate(buckets):
            cum.extend(outcome[r[0]][0] for r in bucket if r[5] == 200 and r[0] is not None and r[0] in outcome)
            m = _metric(cum, kind, alpha)
            lat = sorted(r[6] for r in bucket)
            out.append(
                {
                    "arm": arm,
                    "t": first + (i + 1) * width,
                    "requests": len(bucket),
                    "error_rate": (sum(1 for r in bucket if r[5] >= 500) / len(bucket)) if bucket else None,
                    "p99_ms": stats.percentile(lat, 0.99),
                    "metric": m["mean"],
                    "metric_ci": m["ci"],
                }
            )
    return out


def clean(obj: Any) -> Any:
    """JSON-safe: infinities and NaN (a degenerate test) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------- showing it


def _num(x: Any, fmt: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def format_table(report: dict) -> str:
    m = report["metric"]
    lines = [
        f"experiment {report['experiment']}  ({report['window']['duration_s']:.0f} s of records, "
        f"alpha {report['alpha']})",
        f"metric {m['name']} ({m['kind']}, {'higher' if m['higher_is_better'] else 'lower'} is better)",
        "",
    ]
    head = ["arm", "color", "model@version", "requests", "errors", "p50 ms", "p99 ms", "outcomes", "metric", "CI"]
    rows = [head]
    for a in report["arms"]:
        met = a["metric"]
        ci = f"{_num(met['ci'][0])} .. {_num(met['ci'][1])}" if met["n"] else "-"
        rows.append(
            [
                a["arm"],
                a["color"],
                f"{a['model']}@{a['version']}",
                str(a["requests"]),
                f"{a['errors']} ({_num(a['error_rate'], '.2%') if a['error_rate'] is not None else '-'})",
                _num(a["p50_ms"], ".2f"),
                _num(a["p99_ms"], ".2f"),
                str(a["outcomes"]),
                _num(met["mean"]),
                ci,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    c = report["comparison"]
    if c:
        lines.append(
            f"B - A: {_num(c['difference'], '+.4g')}  CI {_num(c['ci'][0], '+.4g')} .. {_num(c['ci'][1], '+.4g')}  "
            f"p = {_num(c['p_value'], '.3g')}  ({c['method']}"
            + (f", df {c['df']:.1f}" if c["df"] else "")
            + f"; detectable at 80% power: {_num(c['mde'], '.3g')})"
        )
    e = report["error_rate_comparison"]
    if e:
        diff, p = _num(e["difference"], "+.3%"), _num(e["p_value"], ".3g")
        lines.append(f"error rate B - A: {diff}  p = {p} ({e['method']})")
    s = report["srm"]
    lines.append(
        f"sample ratio: B {s['observed_share_b']:.2%} of requests, split {s['expected_share_b']:.0%}, "
        f"chi2 {s['chi2']:.3g}, p = {s['p_value']:.3g} -> {'MISMATCH' if s['mismatch'] else 'ok'}"
    )
    if report.get("hosts"):
        lines.append(
            f"per host (minimum {m.get('min_samples_per_host', 0)} per arm): "
            + ", ".join(f"{h['host']} A {h['requests']['A']} B {h['requests']['B']}" for h in report["hosts"])
        )
    lines += ["", f"verdict: {report['verdict']}", f"  {report['verdict_reason']}"]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def chart(report: dict, path: str) -> str | None:
    """A PNG of the per-arm metrics over time (cumulative outcome metric with its interval, p99, error rate,
    requests per bucket). Returns None, or why there is no chart (matplotlib missing: sovereign-ops[chart])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'sovereign-ops[chart]'): no chart"
    series = report["timeline"]
    if not series:
        return "no records: no chart"
    t0 = report["window"]["first"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0][0], "metric", f"{report['metric']['name']} (cumulative, {1 - report['alpha']:.0%} CI)"),
        (axes[0][1], "p99_ms", "p99 latency (ms) per interval"),
        (axes[1][0], "error_rate", "error rate (5xx) per interval"),
        (axes[1][1], "requests", "requests per interval"),
    ]
    for arm, colour in (("A", "tab:blue"), ("B", "tab:green")):
        pts = [p for p in series if p["arm"] == arm]
        spec = next(a for a in report["arms"] if a["arm"] == arm)
        label = f"{arm}: {spec['model']}@{spec['version']} ({spec['color']})"
        xs = [(p["t"] - t0) / 60.0 for p in pts]
        for ax, key, title in panels:
            ys = [p[key] if p[key] is not None else float("nan") for p in pts]
            ax.plot(xs, ys, marker=".", color=colour, label=label)
            if key == "metric":
                lo = [p["metric_ci"][0] if p["metric"] is not None else float("nan") for p in pts]
                hi = [p["metric_ci"][1] if p["metric"] is not None else float("nan") for p in pts]
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.15)
            ax.set_title(title, fontsize=10)
    for ax in axes[1]:
        ax.set_xlabel("minutes since the first request")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"experiment {report['experiment']}: {report['verdict']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
