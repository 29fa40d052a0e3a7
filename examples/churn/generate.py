"""Stage `generate`: a synthetic customer-churn table, a pure function of the `data` section of params.yaml.

Writes ``data/train.csv`` and ``data/test.csv`` (header row, comma-separated: ``customer_id``, the 8 features,
label ``churned`` last) and the same customer table as Feast's offline source, ``data/customers.parquet``
(``customer_id``, ``event_timestamp`` = ``data.as_of``, the 8 features; no label), which ``feature_repo/``
defines and the training stage reads through Feast. The same seed gives the same bytes, so the same DVC md5: the
dataset's version is its content.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

OUT = Path("data")
# name, printf format: integers as integers, money and gigabytes to the cent
COLUMNS = [
    ("customer_id", "%d"),
    ("tenure_months", "%d"),
    ("monthly_charges", "%.2f"),
    ("support_calls", "%d"),
    ("contract_one_year", "%d"),
    ("contract_two_year", "%d"),
    ("autopay", "%d"),
    ("num_products", "%d"),
    ("data_usage_gb", "%.2f"),
    ("churned", "%d"),
]


def generate(seed: int, rows: int) -> np.ndarray:
    """``rows`` customers; churn follows a noisy logistic model of the features (with one interaction)."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 73, rows)
    charges = np.clip(rng.normal(70.0, 25.0, rows), 18.0, 120.0).round(2)
    calls = rng.poisson(1.5, rows)
    contract = rng.choice(3, size=rows, p=[0.55, 0.25, 0.20])  # month-to-month, one year, two years
    autopay = rng.random(rows) < 0.4
    products = 1 + rng.poisson(0.8, rows)
    usage = rng.lognormal(2.5, 0.6, rows).round(2)
    logit = (
        0.3
        - 0.045 * tenure
        + 0.025 * (charges - 70.0)
        + 0.45 * calls
        - 1.2 * (contract == 1)
        - 2.2 * (contract == 2)
        - 0.6 * autopay
        - 0.35 * (products - 1)
        - 0.01 * (usage - 12.0)
        + 1.0 * ((calls > 3) & (charges > 90.0))
        + rng.normal(0.0, 0.5, rows)
    )
    churned = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))
    ids = np.arange(1, rows + 1)  # customer_id: the row's number, 1..rows
    return np.column_stack(
        [ids, tenure, charges, calls, contract == 1, contract == 2, autopay, products, usage, churned]
    ).astype(np.float64)


def write_offline_source(table: np.ndarray, as_of: str, path: Path) -> None:
    """The customer table as Feast's offline source: integer columns as int64, money and gigabytes as float32
    (feature_repo/features.py's schema), every row stamped ``as_of`` (the snapshot's time)."""
    import pandas as pd

    frame = pd.DataFrame({"customer_id": table[:, 0].astype(np.int64)})
    stamp = pd.Timestamp(as_of)
    frame["event_timestamp"] = stamp.tz_convert("UTC") if stamp.tz else stamp.tz_localize("UTC")
    for i, (name, fmt) in enumerate(COLUMNS[1:-1], start=1):
        frame[name] = table[:, i].astype(np.int64) if fmt == "%d" else table[:, i].astype(np.float32)
    frame.to_parquet(path, index=False, compression="zstd")


def main() -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())["data"]
    seed, rows, test_fraction = int(params["seed"]), int(params["rows"]), float(params["test_fraction"])
    as_of = str(params["as_of"])
    if rows < 10 or not 0.0 < test_fraction < 1.0:
        raise SystemExit(f"generate: need rows >= 10 and 0 < test_fraction < 1 (got {rows}, {test_fraction})")
    table = generate(seed, rows)
    order = np.random.default_rng([seed, 1]).permutation(rows)  # the split has its own stream
    n_test = max(1, round(rows * test_fraction))
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    header = ",".join(name for name, _ in COLUMNS)
    fmt = [f for _, f in COLUMNS]
    for name, idx in (("train", order[n_test:]), ("test", order[:n_test])):
        np.savetxt(OUT / f"{name}.csv", table[idx], fmt=fmt, delimiter=",", header=header, comments="")
    write_offline_source(table, as_of, OUT / "customers.parquet")
    rate = table[:, -1].mean()
    print(
        f"generate: {rows} rows (seed {seed}), {rows - n_test} train / {n_test} test, churn rate {rate:.3f}, "
        f"offline source data/customers.parquet as of {as_of}"
    )


if __name__ == "__main__":
    main()
