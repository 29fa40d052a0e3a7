"""Stage `train`: an MLP churn classifier on ``data/``, logged to MLflow with the data version, registered and
aliased.

The MLflow tracking server comes from ``MLFLOW_TRACKING_URI`` (required; with basic-auth also
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``). One run logs:

* params: every value of params.yaml as ``<section>.<key>``, plus ``data.rev`` and ``data.md5``;
* tags: ``data.rev`` (git commit of the repository when the stage ran, ``none`` outside git), ``data.md5`` (the
  md5 DVC recorded for the ``data`` output in ``dvc.lock``), ``data.path`` (relative to the git root),
  ``data.committed`` (whether the ``dvc.lock`` of that commit already records this md5: ``false`` right after
  ``generate`` re-ran, as the new ``dvc.lock`` is committed after the run; see docs/lineage.md), ``features``,
  ``registered_model``;
* metrics: ``train_loss`` per epoch, then ``test_accuracy``, ``test_auc``, ``test_log_loss``, ``test_churn_rate``;
* artifacts: ``lineage/dvc.lock`` and ``lineage/params.yaml`` as they were, and the model ``model``: torch.export
  (MLflow's default ``pt2`` format) with a tensor signature, an input example of several rows (so the batch
  dimension is exported as dynamic, not pinned to the example's size) and ``extra_files/golden.json``, the golden
  input/output pair the inference runtime checks before it reports ready.

The logged model is downloaded back and checked (dynamic batch dimension, golden outputs reproduced by the
exported program) before it is registered as ``model.name`` with the alias ``model.alias`` on the new version.
The version carries the tags ``data.rev``, ``data.md5`` and ``sha256`` (of ``data/model.pt2``, what the runtime
reports and the deploy ledger records).

Writes ``metrics.json`` (DVC metrics) and ``mlflow_run.json`` (run id, registered version, data version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

DATA = Path("data")
REPO = Path("feature_repo")  # the Feast repository: entity, feature view, feature service named after the model
LABEL = "churned"
ENTITY = "customer_id"


class ChurnModel(nn.Module):
    """Raw features in, churn probability out (N, 1): the standardisation is part of the model (buffers), so the
    served model takes the table's columns as they are."""

    def __init__(self, n_features: int, hidden: list[int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class FeatureReader:
    """The training features through Feast's offline store: ``feature_repo/features.py`` applied to a throwaway
    registry (nothing is written next to ``data/``, a DVC output), then ``get_historical_features`` with the
    model's feature service, point-in-time at ``data.as_of``. The runtime reads the same feature service from
    the online store, in the same order."""

    def __init__(self, service: str, tmp: str) -> None:
        import importlib.util

        from feast import FeatureStore, RepoConfig

        repo = REPO.resolve()
        project = (yaml.safe_load((repo / "feature_store.yaml").read_text()) or {}).get("project", "churn")
        config = RepoConfig(
            project=project,
            provider="local",
            registry=str(Path(tmp, "registry.db")),
            repo_path=repo,
            offline_store={"type": "dask"},
            online_store={"type": "sqlite", "path": str(Path(tmp, "online.db"))},
            entity_key_serialization_version=3,
        )
        spec = importlib.util.spec_from_file_location("churn_feature_repo", repo / "features.py")
        definitions = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(definitions)  # type: ignore[union-attr]
        self.store = FeatureStore(config=config)
        self.store.apply([v for v in vars(definitions).values() if _is_feast_object(v)])
        self.service = self.store.get_feature_service(service)
        self.features = [f.name for p in self.service.feature_view_projections for f in p.features]
        entities = {self.store.get_entity(e).join_key for p in self.service.feature_view_projections
                    for e in self.store.get_feature_view(p.name).entities}  # fmt: skip
        if entities != {ENTITY}:
            raise SystemExit(f"train: feature service {service!r} is keyed by {sorted(entities)}, not {ENTITY!r}")

    def read(self, name: str, as_of: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, customer_id) of split ``name``: the label and key from the CSV, the features from Feast. The
        CSV's own copy of the features must equal what Feast returns (a skew check, row for row)."""
        import pandas as pd

        split = pd.read_csv(DATA / f"{name}.csv")
        keys = pd.DataFrame({ENTITY: split[ENTITY].astype("int64"), "event_timestamp": pd.Timestamp(as_of)})
        found = self.store.get_historical_features(entity_df=keys, features=self.service).to_df()
        table = keys[[ENTITY]].merge(found.drop(columns=["event_timestamp"]), on=ENTITY, how="left", validate="1:1")
        if table[self.features].isna().any().any():
            missing = table.loc[table[self.features].isna().any(axis=1), ENTITY].tolist()[:5]
            raise SystemExit(f"train: Feast has no features for {ENTITY} {missing} of {name}.csv as of {as_of}")
        x = table[self.features].to_numpy(np.float32)
        if not np.array_equal(x, split[self.features].to_numpy(np.float32)):
            raise SystemExit(f"train: Feast's features for {name}.csv differ from the CSV's columns")
        y = split[[LABEL]].to_numpy(np.float32)
        ids = split[ENTITY].to_numpy(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), torch.from_numpy(ids)


def _is_feast_object(value: Any) -> bool:
    from feast import Entity, FeatureService, FeatureView, FileSource

    return isinstance(value, Entity | FeatureService | FeatureView | FileSource)


def train(cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> tuple[ChurnModel, list[float]]:
    torch.set_num_threads(int(cfg.get("threads", 1)))  # a model this small: more threads only add overhead
    torch.manual_seed(int(cfg["seed"]))
    model = ChurnModel(x.shape[1], [int(h) for h in cfg["hidden"]])
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    loss_fn = nn.BCEWithLogitsLoss()
    order = torch.Generator().manual_seed(int(cfg["seed"]))
    batch, losses = int(cfg["batch_size"]), []
    model.train()
    for _ in range(int(cfg["epochs"])):
        total = 0.0
        for idx in torch.randperm(len(x), generator=order).split(batch):
            opt.zero_grad()
            loss = loss_fn(model.logits(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return model.eval(), losses


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    score, label = score.flatten().double(), label.flatten().bool()
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(greater / (len(pos) * len(neg)))


def evaluate(model: ChurnModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model.logits(x)
    prob = torch.sigmoid(logits)
    return {
        "test_accuracy": float(((prob >= 0.5).float() == y).float().mean()),
        "test_auc": auc(prob, y),
        "test_log_loss": float(nn.functional.binary_cross_entropy_with_logits(logits, y)),
        "test_churn_rate": float(y.mean()),
    }


# --------------------------------------------------------------------------------------------------
# Lineage


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version() -> dict[str, str]:
    """The git commit and the md5 DVC recorded for ``data`` in dvc.lock (written by `generate` before `train`
    runs). Outside `dvc repro` the lock may be older than ``data/``: say so."""
    lock_path = Path("dvc.lock")
    if not lock_path.is_file():
        raise SystemExit("train: no dvc.lock here; run the pipeline with `dvc repro`, not train.py alone")
    lock = yaml.safe_load(lock_path.read_text()) or {}
    entry = next(
        (
            out
            for stage in (lock.get("stages") or {}).values()
            for out in stage.get("outs") or []
            if out.get("path") == str(DATA)
        ),
        {},
    )
    md5 = entry.get("md5")
    if not md5:
        raise SystemExit(f"train: dvc.lock records no output {DATA!s}; run `dvc repro`")
    files = [p.stat().st_size for p in DATA.rglob("*") if p.is_file()]
    if (entry.get("nfiles"), entry.get("size")) != (len(files), sum(files)):  # cheap: a stale lock, data edited
        raise SystemExit(f"train: {DATA}/ does not match what dvc.lock records for it; run `dvc repro`")
    if not os.environ.get("DVC_STAGE"):
        print("train: not run by DVC: data.md5 is what dvc.lock says, which may not be data/ now", file=sys.stderr)
    rev = git("rev-parse", "HEAD")
    prefix = git("rev-parse", "--show-prefix") or ""
    # Whether `git checkout <data.rev> && dvc checkout` gives this very data back: the commit's dvc.lock has
    # this md5. Right after `generate` re-ran it does not (the new dvc.lock gets committed after the run).
    committed = md5 in (git("show", f"HEAD:{prefix}dvc.lock") or "") if rev else False
    return {
        "data.rev": rev or "none",
        "data.md5": md5,
        "data.path": f"{prefix}{DATA}",
        "data.committed": str(committed).lower(),
    }


def golden_pair(model: ChurnModel, x: torch.Tensor, cfg: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
    """The runtime's golden format: OIP tensors named as the runtime names an unnamed tensor signature, and the
    same rows by entity key (``entity_inputs``): a runtime serving the feature service replays them through the
    online store, and so does the deploy's smoke test."""
    with torch.no_grad():
        y = model(x)

    def oip(name: str, t: torch.Tensor) -> dict[str, Any]:
        return {"name": name, "datatype": "FP32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}

    return {
        "inputs": [oip("input__0", x)],
        "entity_inputs": [{"name": ENTITY, "datatype": "INT64", "shape": [len(ids)], "data": ids.tolist()}],
        "outputs": [oip("output__0", y)],
        "rtol": float(cfg["rtol"]),
        "atol": float(cfg["atol"]),
    }


def check_logged(model_dir: Path, golden: dict[str, Any]) -> str:
    """The model as MLflow stored it: a torch.export program with a dynamic batch dimension that reproduces the
    golden outputs (also at another batch size). Returns the sha256 of data/model.pt2."""
    pt2 = model_dir / "data" / "model.pt2"
    if not pt2.is_file() or not (model_dir / "extra_files" / "golden.json").is_file():
        raise SystemExit(f"train: the logged model lacks data/model.pt2 or extra_files/golden.json: {model_dir}")
    program = torch.export.load(str(pt2))
    user = set(program.graph_signature.user_inputs)
    shapes = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    if not shapes or any(isinstance(s[0], int) for s in shapes):
        raise SystemExit(f"train: the exported program has a static batch dimension {shapes}; not registering it")
    x = torch.tensor(golden["inputs"][0]["data"]).reshape(golden["inputs"][0]["shape"])
    want = torch.tensor(golden["outputs"][0]["data"]).reshape(golden["outputs"][0]["shape"])
    module = program.module()
    with torch.no_grad():
        got, doubled = module(x), module(torch.cat([x, x]))
    for out in (got, doubled[: len(x)], doubled[len(x) :]):
        if not torch.allclose(out, want, rtol=golden["rtol"], atol=golden["atol"]):
            raise SystemExit("train: the exported program does not reproduce the golden outputs; not registering it")
    return hashlib.sha256(pt2.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------


def main() -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SystemExit("train: set MLFLOW_TRACKING_URI to the MLflow server, e.g. http://127.0.0.1:15000")
    t0 = time.perf_counter()
    lineage = data_version()
    mcfg = params["model"]
    as_of = str(params["data"]["as_of"])
    with tempfile.TemporaryDirectory(prefix="churn-feast-") as feast_tmp:
        reader = FeatureReader(str(mcfg["name"]), feast_tmp)
        x_train, y_train, _ = reader.read("train", as_of)
        x_test, y_test, ids_test = reader.read("test", as_of)
    features = reader.features
    model, losses = train(params["train"], x_train, y_train)
    metrics = {"train_loss": losses[-1], **evaluate(model, x_test, y_test)}
    rows = max(2, int(mcfg["golden_rows"]))  # >= 2: a batch of 1 would be exported as a constant batch size
    golden = golden_pair(model, x_test[:rows], mcfg, ids_test[:rows])
    print(f"train: {len(x_train)} rows, {len(losses)} epochs in {time.perf_counter() - t0:.1f}s: {metrics}")

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
    import mlflow
    import mlflow.pytorch
    from mlflow.entities import Metric
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    mlflow.set_experiment(params["mlflow"]["experiment"])
    flat = {f"{section}.{k}": v for section, values in params.items() for k, v in (values or {}).items()}
    flat = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()}
    with mlflow.start_run() as run, tempfile.TemporaryDirectory(prefix="churn-") as tmp:
        run_id = run.info.run_id
        mlflow.set_tags({**lineage, "features": ",".join(features), "feature_service": reader.service.name})
        mlflow.log_params({**flat, "data.rev": lineage["data.rev"], "data.md5": lineage["data.md5"]})
        now = int(time.time() * 1000)
        history = [Metric("train_loss", loss, now, step) for step, loss in enumerate(losses)]
        finals = [Metric(k, v, now, len(losses)) for k, v in metrics.items() if k != "train_loss"]
        client.log_batch(run_id, metrics=history + finals)
        mlflow.log_artifact("dvc.lock", "lineage")
        mlflow.log_artifact("params.yaml", "lineage")

        golden_path = Path(tmp, "golden.json")
        golden_path.write_text(json.dumps(golden))
        example = x_test[:rows].numpy()
        with torch.no_grad():
            signature = infer_signature(example, model(x_test[:rows]).numpy())  # shapes (-1, F) -> (-1, 1)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,  # several rows: torch.export keeps the batch dimension dynamic
            extra_files=[str(golden_path)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(Path(tmp, "check")))
        sha256 = check_logged(Path(local), golden)

        name, alias = str(mcfg["name"]), str(mcfg["alias"])
        version_tags = {"data.rev": lineage["data.rev"], "data.md5": lineage["data.md5"], "sha256": sha256}
        mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
        client.set_registered_model_alias(name, alias, mv.version)
        mlflow.set_tag("registered_model", f"models:/{name}/{mv.version}")

    record = {
        "run_id": run_id,
        "experiment": params["mlflow"]["experiment"],
        "model_uri": info.model_uri,
        "registered_model": f"models:/{name}/{mv.version}",
        "name": name,
        "version": str(mv.version),
        "alias": alias,
        "sha256": sha256,
        **lineage,
    }
    Path("metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    Path("mlflow_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"train: run {run_id}, registered models:/{name}/{mv.version} as @{alias} (data.md5 {lineage['data.md5']})")


if __name__ == "__main__":
    main()
