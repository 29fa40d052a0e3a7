"""Writes the scenario's offline source: 200 drivers x 3 rows in the last 6 hours (parquet).

Usage: python make_data.py OUT.parquet. Run once per scenario instance (converge.yml, `creates:`): the
values are a function of the id and the row, so the verifier can recompute them without reading this file.
"""

import sys
from datetime import UTC, datetime, timedelta

import pandas as pd

DRIVERS = 200
ROWS = 3


def main(out: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    records = []
    for driver_id in range(1, DRIVERS + 1):
        for row in range(ROWS):
            at = now - timedelta(hours=6) + timedelta(hours=2 * row, seconds=driver_id)
            records.append(
                {
                    "driver_id": driver_id,
                    "event_timestamp": at,
                    "created": at,
                    "conv_rate": driver_id / 1000 + row / 10,
                    "acc_rate": 1 - driver_id / 1000,
                    "trips": driver_id * 10 + row,
                }
            )
    frame = pd.DataFrame.from_records(records)
    frame["conv_rate"] = frame["conv_rate"].astype("float32")
    frame["acc_rate"] = frame["acc_rate"].astype("float32")
    frame["trips"] = frame["trips"].astype("int64")
    frame.to_parquet(out, index=False)


if __name__ == "__main__":
    main(sys.argv[1])
