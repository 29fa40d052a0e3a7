"""One incremental materialization of every online feature view of the repository in the working directory.

Installed by roles/feast as /usr/local/libexec/sovereign/feast-materialize (with the venv's python as
its shebang). Run by feast-materialize.service through sovereign-job, which records success and duration; this adds
the rows written to Redis per feature view (counted at RedisOnlineStore.online_write_batch, the online
store interface materialization writes through) to the file named by SOVEREIGN_JOB_METRICS_FILE:

    sovereign_feast_materialized_rows{feature_view="NAME"}           rows written by this run
    sovereign_feast_materialized_until_timestamp_seconds{feature_view="NAME"}   end of the materialized window
"""

import os
import sys
import time
from collections import Counter
from datetime import UTC, datetime

# feast-materialize.service runs it in the repository (WorkingDirectory); FEAST_REPO overrides.
REPO = os.environ.get("FEAST_REPO", ".")


def main() -> int:
    from feast import FeatureStore
    from feast.infra.online_stores.redis import RedisOnlineStore

    rows = Counter()
    write_batch = RedisOnlineStore.online_write_batch

    def counting_write_batch(self, config, table, data, progress):
        rows[table.name] += len(data)
        return write_batch(self, config, table, data, progress)

    RedisOnlineStore.online_write_batch = counting_write_batch
    store = FeatureStore(repo_path=REPO)
    views = sorted(fv.name for fv in store.list_feature_views() if fv.online)
    end = datetime.now(UTC).replace(microsecond=0)
    started = time.monotonic()
    store.materialize_incremental(end_date=end)
    took = time.monotonic() - started
    lines = []
    for name in views:
        # Concatenated, not f-string braces: the role copies this file through a template expression.
        labels = '{feature_view="' + name + '"}'
        lines.append("sovereign_feast_materialized_rows" + labels + " " + str(rows.get(name, 0)))
        lines.append("sovereign_feast_materialized_until_timestamp_seconds" + labels + " " + str(int(end.timestamp())))
    metrics_file = os.environ.get("SOVEREIGN_JOB_METRICS_FILE")
    if metrics_file:
        with open(metrics_file, "a", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
    summary = ", ".join(f"{name}={rows.get(name, 0)}" for name in views) or "no online feature views"
    print(f"feast-materialize: up to {end.isoformat()} in {took:.1f} s, rows written: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
