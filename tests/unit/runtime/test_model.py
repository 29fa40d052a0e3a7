"""Model sources and formats, golden-gated readiness, and configuration from flags and environment."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from conftest import IN, infer_body, make_engine
from sovereign_runtime import config
from sovereign_runtime.engine import Engine
from sovereign_runtime.model import ModelLoadError, load, sniff
from sovereign_runtime.registry import Schedule
from sovereign_runtime.startup import prepare


def test_formats_are_recognised_by_content(models):
    assert sniff(models.torchscript) == "torchscript"
    assert sniff(models.mlflow_pt2 / "data" / "model.pt2") == "pt2"
    assert sniff(models.mlflow_pickle / "data" / "model.pth") == "pickle"


def test_mlflow_signature_and_golden_found(loaded):
    model = loaded["mlflow_pt2"]
    assert model.format == "mlflow-pt2" and model.golden.source == "model:golden.json"
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("input__0", "FP32", (-1, IN))]
    assert len(model.sha256) == 64 and model.batch_dim and model.static_batch is None
    assert loaded["torchscript"].format == "torchscript" and loaded["torchscript"].name == "mlp"


def test_pickle_needs_opt_in(models):
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load(str(models.mlflow_pickle))


def test_golden_failure_never_ready(loaded, client_for):
    engine = make_engine(loaded["bad_golden"])
    assert engine.state == "failed" and not engine.serving
    assert "differs from golden" in engine.reason
    client = client_for(engine)

    async def go():
        return [
            await client.get("/v2/health/live"),
            await client.get("/v2/health/ready"),
            await client.get("/v2/models/mlp/ready"),
            await client.post("/v2/models/mlp/infer", infer_body(torch.zeros(1, IN))),
        ]

    live, ready, model_ready, infer = asyncio.run(go())
    assert live.status == 200
    assert ready.status == 503 and ready.json()["state"] == "failed" and "golden" in ready.json()["reason"]
    assert model_ready.status == 503 and infer.status == 503


def test_golden_required_by_default(models, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(models.mlflow_pt2, bare)
    (bare / "golden.json").unlink()
    cfg = config.Settings(model_uri=str(bare))
    with pytest.raises(ModelLoadError, match="no golden"):
        prepare(Engine(cfg))
    report = prepare(Engine(config.Settings(model_uri=str(bare), require_golden=False)))
    assert report["ok"] and report["golden"] == "absent"


def test_golden_file_flag_overrides(models, tmp_path):
    golden = tmp_path / "other.json"
    golden.write_text(json.dumps(models.golden(offset=1.0)))
    report = prepare(Engine(config.Settings(model_uri=str(models.mlflow_pt2), golden_file=str(golden))))
    assert not report["ok"] and "differs from golden" in report["error"]


def test_static_batch_export_disables_batching(models):
    """MLflow 3 traces with the input_example: a batch-1 example fixes the batch dimension to 1."""
    engine = Engine(config.Settings(model_uri=str(models.static_batch), max_batch_size=16))
    assert prepare(engine)["ok"]
    assert engine.model.static_batch == 1 and not engine.batching
    with pytest.raises(Exception, match="does not match"):
        engine.decoder.decode(infer_body(torch.zeros(2, IN)))


def test_missing_path_and_bad_registry_fail_load(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "nope"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a torch archive"):
        load(str(tmp_path / "junk.pt"))
    # nothing listens on port 9 (test_registry_unreachable.py covers the retry schedule)
    with pytest.raises(
        ModelLoadError, match=r"cannot reach the MLflow tracking server 127\.0\.0\.1:9: connection refused"
    ):
        load("models:/nothing/1", tracking_uri="http://127.0.0.1:9", registry=Schedule(attempts=1))


def test_check_command_exit_codes(models, capsys):
    from sovereign_runtime.cli import check

    for uri, code in ((models.mlflow_pt2, 0), (models.bad_golden, 1), (models.mlflow_pickle, 1)):
        command, cfg = config.parse(["check", "--model-uri", str(uri)], {})
        assert command == "check" and check(cfg) == code
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is (code == 0)
    assert "--allow-pickle" in report["error"]


ENV_CASES = [
    # (environment, argv, field, expected)
    ({"SOVEREIGN_RUNTIME_MAX_BATCH_SIZE": "4"}, [], "max_batch_size", 4),
    ({"SOVEREIGN_RUNTIME_MAX_BATCH_SIZE": "4"}, ["--max-batch-size", "0"], "max_batch_size", 0),
    ({"SOVEREIGN_RUNTIME_MAX_BATCH_DELAY_MS": "2.5"}, [], "max_batch_delay_ms", 2.5),
    ({"SOVEREIGN_RUNTIME_COLOR": "green"}, [], "color", "green"),
    ({"SOVEREIGN_RUNTIME_COLOR": "green"}, ["--color", "blue"], "color", "blue"),
    ({"SOVEREIGN_RUNTIME_GC_FREEZE": "false"}, [], "gc_freeze", False),
    ({"SOVEREIGN_RUNTIME_REQUIRE_GOLDEN": "no"}, ["--require-golden"], "require_golden", True),
    ({"SOVEREIGN_RUNTIME_CHAOS_ERROR_RATE": "0.25"}, [], "chaos_error_rate", 0.25),
    ({"SOVEREIGN_RUNTIME_CHAOS_LATENCY_MS": "7"}, [], "chaos_latency_ms", 7.0),
    ({"SOVEREIGN_RUNTIME_ZENOH_KEY_EXPR": "sovereign/infer/blue"}, [], "zenoh_key_expr", "sovereign/infer/blue"),
    ({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, [], "tracking_uri", "http://mlflow:5000"),
    ({"MLFLOW_TRACKING_URI": "http://a", "SOVEREIGN_RUNTIME_TRACKING_URI": "http://b"}, [], "tracking_uri", "http://b"),
    ({"SOVEREIGN_RUNTIME_GOLDEN_FILE": ""}, [], "golden_file", None),
    ({}, [], "max_batch_size", 16),
    ({}, [], "request_timeout_s", 30.0),
]


@pytest.mark.parametrize(("env", "argv", "field", "expected"), ENV_CASES)
def test_env_config(env, argv, field, expected):
    env = {"SOVEREIGN_RUNTIME_MODEL_URI": "/models/x", **env}
    command, cfg = config.parse(["serve", *argv], env)
    assert command == "serve" and cfg.model_uri == "/models/x"
    assert getattr(cfg, field) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SOVEREIGN_RUNTIME_MAX_BATCH_SIZE": "many"}, "MAX_BATCH_SIZE"),
        ({"SOVEREIGN_RUNTIME_CHAOS_ERROR_RATE": "1.5"}, "between 0 and 1"),
        ({"SOVEREIGN_RUNTIME_COLOR": "red"}, "not one of"),
        ({"SOVEREIGN_RUNTIME_GC_FREEZE": "maybe"}, "true/false"),
    ],
)
def test_bad_env_values_are_refused(env, message, capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse(["serve", "--model-uri", "x"], env)
    assert message in str(exc.value) + capsys.readouterr().err


def test_model_uri_required(capsys):
    with pytest.raises(SystemExit):
        config.parse(["serve"], {})
    assert "--model-uri" in capsys.readouterr().err


def test_settings_defaults_match_flags():
    """Settings (used when embedding or testing) and the CLI flags must agree on every default."""
    fields = config.Settings.__dataclass_fields__
    assert {f.dest for f in config.FLAGS} == set(fields)
    for flag in config.FLAGS:
        if flag.name != "model-uri":
            assert fields[flag.dest].default == flag.default, flag.name


def test_a_feast_repository_without_a_feature_service_is_a_vector_only_model():
    # inference_runtime writes the host's repository into every color's env; only a model's service uses it.
    _command, cfg = config.parse(["serve", "--model-uri", "x"], {"SOVEREIGN_RUNTIME_FEAST_REPO": "/etc/feast"})
    assert cfg.feast_repo == "/etc/feast" and cfg.feature_service == ""


def test_a_feature_service_without_a_repository_is_refused(capsys):
    with pytest.raises(SystemExit):
        config.parse(["serve", "--model-uri", "x", "--feature-service", "churn"], {})
    assert "--feature-service needs --feast-repo" in capsys.readouterr().err
