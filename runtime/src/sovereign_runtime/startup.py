"""Start-up, apart from the hot path: fetch and load the model, warm it up, gate readiness on the golden
check. Runs once per process: in the server's loader thread (``serve``) or inline (``check``).

The golden input goes through the engine's own decoder and forward, so what is checked is exactly
what requests will run; warm-up also runs the largest batch shape and checks the model is
row-independent (batching is switched off with a warning when it is not).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .engine import Engine
from .flags import gate_fetch
from .logs import log_event
from .model import Golden, ModelLoadError, load
from .protocol import OIP_TO_TORCH, TORCH_TO_OIP, RequestError, TensorSpec, dumps, tensor_from_json
from .registry import Schedule


def prepare(engine: Engine, on_retry: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Load the model into ``engine`` and gate it on the golden check. Raises ModelLoadError when nothing
    can be served; returns a report whose ``ok`` says whether the golden check passed. ``on_retry`` hears
    of every registry attempt that failed and will be retried (see registry.py)."""
    cfg = engine.cfg
    model = load(
        cfg.model_uri,
        name=cfg.model_name,
        version=cfg.model_version,
        device=cfg.device,
        tracking_uri=cfg.tracking_uri,
        golden_file=cfg.golden_file,
        allow_pickle=cfg.allow_pickle,
        registry=Schedule(cfg.registry_attempts, cfg.registry_timeout_s),
        on_retry=on_retry,
    )
    engine.attach(model)
    if cfg.feature_service:
        attach_features(engine)
    log_event(
        "model_loaded",
        model=model.name,
        version=model.version,
        format=model.format,
        device=str(model.device),
        source=model.source,
        sha256=model.sha256,
        load_seconds=round(model.load_seconds, 3),
    )
    if model.golden is None and cfg.require_golden:
        raise ModelLoadError(
            "no golden input/output found (golden.json in the MLflow model dir, <file>.golden.json, or "
            "--golden-file); pass --no-require-golden to serve without one"
        )
    t0 = time.perf_counter()
    report = warmup_and_check(engine, model.golden)
    if report.get("ok") and engine.features is not None:
        report.update(check_entity_golden(engine, model.golden))
    engine.metrics.warmup_seconds = time.perf_counter() - t0
    report.update(model=model.name, version=model.version, device=str(model.device), format=model.format)
    report["load_seconds"] = round(model.load_seconds, 3)
    report["warmup_seconds"] = round(engine.metrics.warmup_seconds, 3)
    engine.golden_report = report
    return report


def attach_features(engine: Engine) -> None:
    """Open the model's feature service (registry read once, here) and give the engine its keyed path."""
    from .features import FeatureSource, FeatureStoreError

    cfg = engine.cfg
    assert engine.model is not None
    source = FeatureSource(cfg.feature_service, cfg.feast_repo, cfg.feature_timeout_ms / 1000.0, cfg.feature_retry_s)
    try:
        source.open()
        _, dtype = source.check_model(engine.model.inputs)
    except FeatureStoreError as exc:
        raise ModelLoadError(str(exc)) from None
    gate_fetch(engine, source)  # runtime-feature-fetch: before attach_features binds source.fetch
    engine.attach_features(source, dtype)


def check_entity_golden(engine: Engine, golden: Golden | None) -> dict[str, Any]:
    """The golden rows by entity key, through the online store: their features must equal the golden
    input (training and serving read the same definitions) and give the golden outputs. An unreachable
    store does not stop start-up (vector requests can be served); it is reported and logged."""
    source = engine.features
    if golden is None or not golden.entity_inputs:
        return {"entity_golden": "absent"}
    item = golden.entity_inputs[0]
    try:
        keys = source.entity_values(item)
        x = source.fetch(keys, engine.decoder.decode(dumps({"inputs": golden.inputs})).tensors[0].dtype)
    except RequestError as exc:
        if exc.status == 503:
            log_event("entity_golden_skipped", logging.WARNING, reason=exc.message)
            return {"entity_golden": f"skipped: {exc.message}"}
        return {"ok": False, "entity_golden": "failed", "error": f"golden entity rows: {exc.message}"}
    want = engine.decoder.decode(dumps({"inputs": golden.inputs})).tensors[0]
    if tuple(x.shape) != tuple(want.shape) or not torch.allclose(x.double(), want.double(), rtol=1e-6, atol=1e-6):
        diff = (x.double() - want.double()).abs().max().item() if x.shape == want.shape else float("nan")
        return {
            "ok": False,
            "entity_golden": "failed",
            "error": f"the online features of {source.entity_key} {keys} differ from the golden input "
            f"(max abs difference {diff:.3g}): training and serving disagree on feature service "
            f"{source.service_name!r}, or the online store holds other values",
        }
    report = _compare(engine, engine.forward([x]), golden)
    if not report["ok"]:
        return {"ok": False, "entity_golden": "failed", "error": f"by entity key: {report['error']}"}
    return {"entity_golden": "ok"}


def warmup_and_check(engine: Engine, golden: Golden | None) -> dict[str, Any]:
    assert engine.decoder is not None
    iterations = max(1, engine.cfg.warmup_iterations)
    if golden is None:
        sample = _zeros_sample(engine)
        if sample is None:
            return {"ok": True, "golden": "absent", "warmup": "skipped: input shape unknown"}
        for _ in range(iterations):
            outs = engine.forward(sample)
        _describe_outputs(engine, outs)
        return {"ok": True, "golden": "absent", "warmup": f"{iterations} x zeros"}
    try:
        req = engine.decoder.decode(dumps({"inputs": golden.inputs}))
    except RequestError as exc:
        return {"ok": False, "golden": golden.source, "error": f"golden inputs do not fit the model: {exc.message}"}
    try:
        for _ in range(iterations):
            outs = engine.forward(req.tensors)
        _describe_outputs(engine, outs)
        if engine.batching:
            _check_batching(engine, req.tensors, req.rows, outs, golden, iterations)
    except Exception as exc:  # a model that cannot run its own golden input is not ready
        return {"ok": False, "golden": golden.source, "error": f"forward failed: {type(exc).__name__}: {exc}"}
    return _compare(engine, outs, golden)


def _zeros_sample(engine: Engine) -> list[torch.Tensor] | None:
    assert engine.model is not None
    sample = []
    for spec in engine.model.inputs:
        if spec.shape is None or not spec.datatype:
            return None
        shape = [1 if d == -1 else d for d in spec.shape]
        sample.append(torch.zeros(shape, dtype=OIP_TO_TORCH[spec.datatype]))
    return sample


def _describe_outputs(engine: Engine, outs: list[torch.Tensor]) -> None:
    """Without a signature, outputs are named output__N with the datatypes the model produced."""
    if not engine.out_specs or len(engine.out_specs) != len(outs):
        engine.out_specs = [
            TensorSpec(f"output__{i}", TORCH_TO_OIP.get(t.dtype, "FP32"), (-1, *t.shape[1:]))
            for i, t in enumerate(outs)
        ]
        assert engine.model is not None and engine.decoder is not None
        engine.model.outputs = engine.out_specs
        engine.decoder.output_names = {s.name for s in engine.out_specs}


def _check_batching(engine: Engine, tensors, rows, single, golden: Golden, iterations: int) -> None:
    """Warm the largest batch shape and make sure the model is row-independent: the golden rows
    repeated up to max_batch_size must give the golden outputs back, row for row."""
    reps = max(2, engine.max_batch // max(rows, 1))
    big = [t.repeat(reps, *([1] * (t.dim() - 1))) for t in tensors]
    for _ in range(iterations):
        outs = engine.forward(big)
    ok = all(o.shape[0] == rows * reps for o in outs) and all(
        torch.allclose(o[:rows].double(), s.double(), rtol=golden.rtol, atol=golden.atol)
        for o, s in zip(outs, single, strict=True)
    )
    if not ok:
        engine.batching = False
        log_event("batching_off", logging.WARNING, reason="batched outputs differ from unbatched ones")


def _compare(engine: Engine, outs: list[torch.Tensor], golden: Golden) -> dict[str, Any]:
    names = [s.name for s in engine.out_specs]
    worst = 0.0
    report: dict[str, Any] = {"ok": True, "golden": golden.source, "rtol": golden.rtol, "atol": golden.atol}
    for item in golden.outputs:
        name, expected = tensor_from_json(item)
        if name not in names:
            return {**report, "ok": False, "error": f"golden output {name!r} is not a model output {names}"}
        got = outs[names.index(name)]
        if tuple(got.shape) != tuple(expected.shape):
            return {
                **report,
                "ok": False,
                "error": f"output {name!r}: shape {list(got.shape)}, golden {list(expected.shape)}",
            }
        diff = (got.double() - expected.double()).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        worst = max(worst, err)
        if not torch.allclose(got.double(), expected.double(), rtol=golden.rtol, atol=golden.atol):
            report.update(ok=False, error=f"output {name!r} differs from golden: max abs error {err:.3g}")
    report["max_abs_error"] = worst
    return report


def freeze_heap() -> None:
    """Move everything allocated so far (torch, the model, uvicorn) out of the GC's reach: a full
    collection over ~500k objects stalls every in-flight request for 200+ ms (ARCHITECTURE §10)."""
    gc.collect()
    gc.freeze()
