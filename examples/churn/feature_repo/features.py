"""The churn model's features, for Feast: what training reads from the offline store (train.py,
``get_historical_features``) and what the inference runtime reads from the online store
(``--feature-service churn``). One definition, so training and serving cannot disagree on it.

``feast apply`` imports every .py file here: keep nothing else in this directory (.feastignore).
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64

customer = Entity(
    name="customer",
    join_keys=["customer_id"],
    value_type=ValueType.INT64,
    description="A customer of the synthetic churn table (generate.py)",
)

# generate.py writes it next to the CSV splits: one row per customer, stamped with params.yaml's data.as_of.
customers = FileSource(
    name="churn_customers",
    path="../data/customers.parquet",
    timestamp_field="event_timestamp",
)

# The model's 8 inputs, in the model's column order (the runtime lays fetched values out in this order).
FEATURES = [
    Field(name="tenure_months", dtype=Int64),
    Field(name="monthly_charges", dtype=Float32),
    Field(name="support_calls", dtype=Int64),
    Field(name="contract_one_year", dtype=Int64),
    Field(name="contract_two_year", dtype=Int64),
    Field(name="autopay", dtype=Int64),
    Field(name="num_products", dtype=Int64),
    Field(name="data_usage_gb", dtype=Float32),
]

churn_features = FeatureView(
    name="churn_customer_features",
    entities=[customer],
    # 0 = no expiry: the table is a snapshot as of data.as_of, valid until the next one is materialized.
    ttl=timedelta(0),
    schema=FEATURES,
    online=True,
    source=customers,
    tags={"model": "churn"},
)

# Named after the model (params.yaml model.name): the runtime serves churn with --feature-service churn.
churn = FeatureService(name="churn", features=[churn_features], tags={"model": "churn"})
