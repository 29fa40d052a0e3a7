"""The scenario's own feature repository (until the churn example ships its own): one entity, one view.

The offline source, data/drivers.parquet, is written by make_data.py (outside this repository) when the
converge starts: 200 drivers, 3 rows each, the latest row of each a known function of its id.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Float32, Int64
from feast.value_type import ValueType

driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)

driver_source = FileSource(
    name="driver_stats_source",
    path="data/drivers.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
)

driver_stats = FeatureView(
    name="driver_stats",
    entities=[driver],
    ttl=timedelta(days=30),
    schema=[
        Field(name="conv_rate", dtype=Float32),
        Field(name="acc_rate", dtype=Float32),
        Field(name="trips", dtype=Int64),
    ],
    online=True,
    source=driver_source,
)

driver_service = FeatureService(name="driver_svc", features=[driver_stats])
