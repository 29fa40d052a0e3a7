"""The experiment report's statistics (ops/sovereign_ops/stats.py, docs/adr/1421) and verdicts
(ops/sovereign_ops/experiment.py): table-driven, with planted differences (the right winner) and none (no winner),
the tests cross-checked against scipy when it is installed, else against textbook values."""

from __future__ import annotations

import json
import math
import random

import pytest
from sovereign_ops import cli, experiment, stats

try:
    from scipy import stats as sp
except ImportError:  # pragma: no cover - the repository's venv has scipy (mlflow brings it)
    sp = None


# --------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(("t", "df"), [(2.1, 5), (0.3, 1000), (3.5, 12.7), (-1.2, 3), (8.0, 2.5)])
def test_t_two_sided_p(t, df):
    want = 2 * sp.t.sf(abs(t), df) if sp else None
    got = stats.t_sf2(t, df)
    if want is not None:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-14)
    assert 0 <= got <= 1


@pytest.mark.parametrize(("q", "df", "textbook"), [(0.975, 5, 2.5706), (0.975, 30, 2.0423), (0.95, 10, 1.8125)])
def test_t_quantile(q, df, textbook):
    assert stats.t_ppf(q, df) == pytest.approx(textbook, abs=5e-5)
    if sp:
        assert stats.t_ppf(q, df) == pytest.approx(sp.t.ppf(q, df), rel=1e-9)


def test_chi_square_one_df():
    assert stats.chi2_sf_df1(3.841459) == pytest.approx(0.05, abs=1e-6)  # the textbook critical value
    if sp:
        for x in (0.1, 2.0, 10.8, 30.0):
            assert stats.chi2_sf_df1(x) == pytest.approx(sp.chi2.sf(x, 1), rel=1e-9)


@pytest.mark.parametrize(("x", "n"), [(0, 10), (1, 10), (81, 263), (500, 1000), (10, 10)])
def test_wilson_interval(x, n):
    lo, hi = stats.wilson(x, n)
    assert 0 <= lo <= x / n <= hi <= 1
    if sp:
        ci = sp.binomtest(x, n).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


@pytest.mark.parametrize(("xa", "na", "xb", "nb"), [(120, 1000, 150, 1000), (30, 400, 31, 420), (5, 60, 15, 55)])
def test_two_proportion_z_is_the_uncorrected_chi_square(xa, na, xb, nb):
    comp = stats.two_proportions(xa, na, xb, nb)
    assert comp.method == "two-proportion z-test" and comp.difference == pytest.approx(xb / nb - xa / na)
    assert comp.ci[0] < comp.difference < comp.ci[1]
    if sp:
        chi2, p, _, _ = sp.chi2_contingency([[xa, na - xa], [xb, nb - xb]], correction=False)
        assert comp.statistic**2 == pytest.approx(chi2, rel=1e-9) and comp.p_value == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_welch_matches_scipy(seed):
    rng = random.Random(seed)
    a = [rng.gauss(10, 2) for _ in range(40)]
    b = [rng.gauss(11, 5) for _ in range(25)]
    ma, va = stats.mean_var(a)
    mb, vb = stats.mean_var(b)
    comp = stats.welch(ma, va, len(a), mb, vb, len(b))
    assert comp.method == "Welch's t-test"
    if sp:
        res = sp.ttest_ind(b, a, equal_var=False)
        assert comp.statistic == pytest.approx(res.statistic, rel=1e-9)
        assert comp.p_value == pytest.approx(res.pvalue, rel=1e-8)
        assert comp.ci == pytest.approx(tuple(res.confidence_interval(0.95)), rel=1e-8)


def test_srm_check():
    chi2, p = stats.srm(1000, 1000, 0.5)
    assert chi2 == 0 and p == 1
    chi2, p = stats.srm(1000, 1200, 0.5)
    assert p < 0.001
    if sp:
        want = sp.chisquare([1000, 1200], [1100, 1100])
        assert chi2 == pytest.approx(want.statistic) and p == pytest.approx(want.pvalue, rel=1e-9)
    assert stats.srm(900, 100, 0.1)[1] == 1.0  # 10 % to B, as configured


# --------------------------------------------------------------------------------------------------- the verdicts


def _dumps(n_a, n_b, draw_a, draw_b, split=50, seed=7, higher=True, kind=None, errors_b=0.0):
    """Two colors' dumps as the runtime writes them: blue = arm A (v1), green = arm B (v2), an outcome for every
    answered request drawn from draw_a / draw_b."""
    rng = random.Random(seed)
    definition = {
        "name": "t",
        "started": 1000.0,
        "split": split,
        "higher_is_better": higher,
        "arms": {
            "A": {"color": "blue", "model": "m", "version": "1"},
            "B": {"color": "green", "model": "m", "version": "2"},
        },
    }
    if kind:
        definition["metric_kind"] = kind
    out = []
    for color, version, n, draw, err in (("blue", "1", n_a, draw_a, 0.0), ("green", "2", n_b, draw_b, errors_b)):
        rows, outcomes = [], []
        for i in range(n):
            rid = f"{color}-{i}"
            t = 1000.0 + i * 600.0 / n
            status = 500 if rng.random() < err else 200
            rows.append([rid, color, "m", version, t, status, rng.uniform(1, 3)])
            if status == 200:
                outcomes.append([rid, draw(rng), t + 1])
        out.append({"host": "h1", "color": color, "definition": definition, "assignments": rows, "outcomes": outcomes})
    # An outcome may reach the other color: move some of A's outcomes into B's database.
    out[1]["outcomes"] += out[0]["outcomes"][:50]
    out[0]["outcomes"] = out[0]["outcomes"][50:]
    return out


def bern(p):
    return lambda rng: 1 if rng.random() < p else 0


def gauss(mu, sd):
    return lambda rng: rng.gauss(mu, sd)


CASES = [
    # id, dumps, expected verdict, method
    ("binary B planted", _dumps(3000, 3000, bern(0.10), bern(0.14)), "B better", "two-proportion z-test"),
    ("binary A planted", _dumps(3000, 3000, bern(0.30), bern(0.25)), "A better", "two-proportion z-test"),
    (
        "binary none",
        _dumps(3000, 3000, bern(0.20), bern(0.20)),
        "no detectable difference at this sample size",
        "two-proportion z-test",
    ),
    ("continuous B planted", _dumps(800, 800, gauss(50, 10), gauss(53, 14)), "B better", "Welch's t-test"),
    (
        "continuous none",
        _dumps(800, 800, gauss(50, 10), gauss(50, 14)),
        "no detectable difference at this sample size",
        "Welch's t-test",
    ),
    (
        "lower is better, B lower",
        _dumps(800, 800, gauss(20, 4), gauss(19, 4), higher=False),
        "B better",
        "Welch's t-test",
    ),
    (
        "90/10 split, B planted",
        _dumps(5400, 600, bern(0.10), bern(0.20), split=10),
        "B better",
        "two-proportion z-test",
    ),
    (
        "sample ratio mismatch",
        _dumps(3000, 3400, bern(0.10), bern(0.14)),
        "no verdict: sample ratio mismatch",
        "two-proportion z-test",
    ),
    ("too few outcomes", _dumps(1, 1, bern(0.5), bern(0.5)), "not enough data", "two-proportion z-test"),
]


@pytest.mark.parametrize(("dumps", "verdict", "method"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdicts(dumps, verdict, method):
    report = experiment.build("t", dumps)
    assert report["verdict"] == verdict, report["verdict_reason"]
    json.dumps(report, allow_nan=False)  # valid JSON, always
    if report["comparison"]:
        assert report["comparison"]["method"] == method
    a, b = report["arms"]
    assert (a["color"], a["version"], b["color"], b["version"]) == ("blue", "1", "green", "2")
    assert a["outcomes"] == a["requests"]  # outcomes joined wherever they were received
    if verdict in ("A better", "B better"):
        lo, hi = report["comparison"]["ci"]
        assert lo > 0 or hi < 0  # the interval excludes 0 exactly when p < alpha
        assert report["comparison"]["p_value"] < 0.05
    if verdict.startswith("no detectable"):
        lo, hi = report["comparison"]["ci"]
        assert lo < 0 < hi and "detects differences of about" in report["verdict_reason"]


def test_minimum_sample_not_reached():
    dumps = _dumps(300, 300, bern(0.1), bern(0.5))
    for d in dumps:
        d["definition"]["min_samples"] = 500
    report = experiment.build("t", dumps)
    assert report["verdict"] == "not enough data" and "minimum sample of 500 requests" in report["verdict_reason"]
    assert experiment.build("t", dumps, min_samples=0)["verdict"] == "B better"


def test_error_rates_latency_and_the_arms():
    report = experiment.build("t", _dumps(2000, 2000, bern(0.1), bern(0.1), errors_b=0.05))
    a, b = report["arms"]
    assert a["errors"] == 0 and 60 < b["errors"] < 140 and b["error_rate"] == pytest.approx(b["errors"] / 2000)
    assert b["outcomes"] == 2000 - b["errors"]  # failed requests have no outcome
    assert report["error_rate_comparison"]["p_value"] < 0.001
    assert 1 <= a["p50_ms"] <= a["p99_ms"] <= 3
    assert not report["srm"]["mismatch"] and report["srm"]["method"].startswith("chi-square")


def test_left_out_rows_and_orphan_outcomes_are_noted():
    dumps = _dumps(100, 100, bern(0.5), bern(0.5))
    dumps[1]["assignments"].append(["x", "green", "m", "9", 1001.0, 200, 1.0])  # another version on green
    dumps[0]["outcomes"].append(["never-seen", 1, 1002.0])
    notes = " | ".join(experiment.build("t", dumps)["notes"])
    assert "1 request(s) left out" in notes and "1 outcome(s) for request ids" in notes


def test_table_chart_and_cli(tmp_path, capsys):
    dumps = _dumps(1000, 1000, bern(0.1), bern(0.2))
    report = experiment.build("t", dumps)
    table = experiment.format_table(report)
    assert "verdict: B better" in table and "two-proportion z-test" in table and "sample ratio" in table
    assert experiment.chart(report, str(tmp_path / "t.png")) is None
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = []
    for i, d in enumerate(dumps):
        path = tmp_path / f"dump{i}.json"
        path.write_text(json.dumps(d))
        files += ["--dump", str(path)]
    rc = cli.main(["experiment", "report", "t", *files, "--json", "--chart", str(tmp_path / "c.png")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["verdict"] == "B better" and (tmp_path / "c.png").exists()
    assert math.isclose(out["arms"][1]["metric"]["mean"], report["arms"][1]["metric"]["mean"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert cli.main(["experiment", "report", "t", "--dump", str(empty)]) == 1


def test_rows_outside_the_window_are_left_out_for_both_arms():
    """A color that read the end late recorded past it: the report keeps [started, ends) for every arm, from the
    definition of the color that knows the end, and says how many rows it left out."""
    dumps = _dumps(600, 600, bern(0.2), bern(0.2))  # t from 1000 to 1600 on both colors
    for d in dumps:
        d["definition"] = dict(d["definition"])
    dumps[0]["definition"]["ends"] = 1300.0  # blue read the end; green never did
    dumps[1]["assignments"].append(["early", "green", "m", "2", 999.0, 200, 1.0])  # before the start
    report = experiment.build("t", dumps)
    a, b = report["arms"]
    assert a["requests"] == b["requests"] == 300
    assert not report["srm"]["mismatch"]
    assert "601 request(s) left out: recorded outside the experiment's window" in " | ".join(report["notes"])


def _host_dumps(host, n_a, n_b, seed):
    """Another host's two dumps (blue = A, green = B), n_a and n_b requests with outcomes."""
    out = _dumps(max(n_a, 1), max(n_b, 1), bern(0.1), bern(0.3), seed=seed)
    for d, n in zip(out, (n_a, n_b), strict=True):
        d["host"] = host
        for row in d["assignments"]:
            row[0] = f"{host}-{row[0]}"
        d["assignments"] = d["assignments"][:n]
        d["outcomes"] = [[f"{host}-{rid}", v, t] for rid, v, t in d["outcomes"]]
    return out


def test_a_host_without_traffic_cannot_pass_the_report():
    """Per host, not only per arm: h1 alone would show "B better", but h2's split never sent B a request (and h3,
    named by the definition, sent nothing at all): not enough data, naming each host and its counts. Within the
    minimum per host (the definition's, or --min-samples-per-host) the verdict is the data's again."""
    h1 = _dumps(1000, 1000, bern(0.1), bern(0.3))
    assert experiment.build("t", h1)["verdict"] == "B better"
    h2 = _host_dumps("h2", 30, 0, seed=8)
    report = experiment.build("t", h1 + h2)
    assert not report["srm"]["mismatch"], report["srm"]  # 1030 vs 1000: the overall split looks fine
    assert report["verdict"] == "not enough data"
    assert "h2 (A: 30, B: 0)" in report["verdict_reason"] and "h1" not in report["verdict_reason"]
    assert "minimum of 100 requests per host" in report["verdict_reason"]
    assert report["hosts"] == [
        {"host": "h1", "requests": {"A": 1000, "B": 1000}},
        {"host": "h2", "requests": {"A": 30, "B": 0}},
    ]
    # No request at all in an arm never passes, even with no minimum.
    assert experiment.build("t", h1 + h2, min_samples_per_host=0)["verdict"] == "not enough data"
    h2 = _host_dumps("h2", 30, 25, seed=8)
    assert experiment.build("t", h1 + h2)["verdict"] == "not enough data"
    assert experiment.build("t", h1 + h2, min_samples_per_host=20)["verdict"] == "B better"
    for d in h1 + h2:
        d["definition"] = dict(d["definition"], min_samples_per_host=20, hosts=["h1", "h2", "h3"])
    report = experiment.build("t", h1 + h2)
    assert report["verdict"] == "not enough data" and "h3 (A: 0, B: 0)" in report["verdict_reason"]
    assert "h2" not in report["verdict_reason"] and report["metric"]["min_samples_per_host"] == 20
    assert "per host (minimum 20 per arm): h1 A 1000 B 1000, h2 A 30 B 25, h3 A 0 B 0" in experiment.format_table(
        report
    )


def test_the_cli_takes_a_minimum_per_host(tmp_path, capsys):
    files = []
    for i, d in enumerate(_dumps(1000, 1000, bern(0.1), bern(0.3)) + _host_dumps("h2", 30, 25, seed=8)):
        path = tmp_path / f"dump{i}.json"
        path.write_text(json.dumps(d))
        files += ["--dump", str(path)]
    assert cli.main(["experiment", "report", "t", *files, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "not enough data"
    assert cli.main(["experiment", "report", "t", *files, "--json", "--min-samples-per-host", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "B better"
