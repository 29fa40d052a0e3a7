#!/usr/bin/env python3
"""Ask a real Prometheus whether the dashboards' panels return data (ARCHITECTURE §7: "on the lab, return data
from the real Prometheus").

    scripts/check-dashboards.py --prometheus http://127.0.0.1:19090 [--host inf-01] [--all]

Every dashboard the grafana role provisions (roles/grafana/files/dashboards/*.json and roles/*/files/monitoring/
dashboard.json): each panel's queries, with Grafana's variables replaced ($__rate_interval by 1m, $host by --host
or the first value Prometheus has), run as instant queries. A panel returns data when one of its queries returns
at least one series. Exit 1 when a core panel returns none; panels that may honestly be empty (firing alerts,
errors on a healthy platform) are listed in MAY_BE_EMPTY and only reported. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (dashboard uid, panel title): empty on a healthy platform, or before the first deploy/traffic.
MAY_BE_EMPTY = {
    ("sovereign-overview", "Firing alerts"),
    ("sovereign-overview", "Data version live per host"),  # a model trained without DVC lineage has none
}
VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "__range_s": "3600"}


def dashboard_files(root: Path = ROOT) -> list[Path]:
    return sorted(root.glob("roles/grafana/files/dashboards/*.json")) + sorted(
        root.glob("roles/*/files/monitoring/dashboard.json")
    )


def panels(dashboard: dict):
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def expressions(dashboard: dict):
    """(panel title, expr) of every Prometheus query of the dashboard: panel targets, annotations, variables."""
    for panel in panels(dashboard):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                yield panel.get("title", ""), target["expr"]
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        if annotation.get("expr"):
            yield f"annotation {annotation.get('name')}", annotation["expr"]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's $var, ${var} and ${var:format} replaced by values (unknown variables: an error)."""

    def one(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def query(base: str, expr: str, timeout: float = 10.0) -> list:
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=timeout) as response:
        doc = json.load(response)
    if doc.get("status") != "success":
        raise ValueError(f"{doc.get('errorType')}: {doc.get('error')}")
    return doc["data"]["result"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:19090")
    parser.add_argument(
        "--host", help="value of the dashboards' $host variable (default: the first one Prometheus has)"
    )
    parser.add_argument("--all", action="store_true", help="require data from every panel, MAY_BE_EMPTY included")
    args = parser.parse_args(argv)
    values = dict(VARIABLES)
    try:
        hosts = sorted(
            {
                s["metric"].get("host", "")
                for s in query(args.prometheus, 'sovereign_runtime_ready{job="sovereign_runtime"}')
            }
        )
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"check-dashboards: cannot query {args.prometheus}: {exc}", file=sys.stderr)
        return 2
    values["host"] = args.host or (hosts[0] if hosts else "")
    print(f"Prometheus {args.prometheus}; $host={values['host'] or '(none: no runtime scraped)'}")
    missing = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        uid = dashboard.get("uid")
        by_panel: dict[str, list[tuple[str, int | str]]] = {}
        for title, expr in expressions(dashboard):
            promql = substitute(expr, values)
            try:
                result: int | str = len(query(args.prometheus, promql))
            except (OSError, urllib.error.URLError, ValueError) as exc:
                result = f"error: {exc}"
            by_panel.setdefault(title, []).append((promql, result))
        print(f"\n{path.relative_to(ROOT)} ({uid})")
        for title, results in by_panel.items():
            ok = any(isinstance(r, int) and r > 0 for _q, r in results)
            optional = (uid, title) in MAY_BE_EMPTY or title.startswith("annotation ")
            mark = "ok  " if ok else ("--  " if optional and not args.all else "FAIL")
            counts = ", ".join(str(r) if isinstance(r, int) else r for _q, r in results)
            print(f"  {mark} {title}: series {counts}")
            if not ok and (args.all or not optional):
                missing.append(f"{uid}: {title}")
                for promql, result in results:
                    print(f"         {promql}  ->  {result}")
    if missing:
        print(f"\n{len(missing)} core panel(s) without data: {missing}")
        return 1
    print("\nevery core panel returns data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
