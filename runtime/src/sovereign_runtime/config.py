"""Command-line flags, each also read from ``SOVEREIGN_RUNTIME_<FLAG>`` (a systemd EnvironmentFile drives
the service); a flag on the command line overrides the environment, which overrides the default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "SOVEREIGN_RUNTIME_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Flag:
    name: str  # the long option without dashes, e.g. "model-uri"
    type: Callable[[str], Any] | None
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    serve_only: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value

    parse.__name__ = kind.__name__
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


_float = _non_negative(float)
_int = _non_negative(int)

# type None = boolean switch (--x / --no-x; env true/false).
FLAGS: tuple[Flag, ...] = (
    Flag("model-uri", str, None, "MLflow model dir, TorchScript/torch.export file, or models:/NAME/VERSION|@ALIAS"),
    Flag("model-name", str, None, "name served under /v2/models/NAME (default: registry name, else file/dir name)"),
    Flag("model-version", str, None, "version reported (default: the resolved registry version, else 1)"),
    Flag("tracking-uri", str, None, "MLflow tracking/registry URI for models:/ (default: MLFLOW_TRACKING_URI)"),
    Flag("registry-attempts", _positive_int, 6, "tries to reach MLflow for a remote URI (1, 2, 4, 8, 15 s apart)"),
    Flag("registry-timeout-s", _positive_float, 10.0, "one MLflow HTTP request gives up after this long unanswered"),
    Flag("device", str, "auto", "where the model runs; auto = CUDA when available", ("auto", "cpu", "cuda")),
    Flag("golden-file", str, None, "golden input/output JSON (default: golden.json in the MLflow model dir)"),
    Flag("require-golden", None, True, "refuse to become ready without a golden input/output"),
    Flag("allow-pickle", None, False, "allow loading pickled nn.Modules (runs code from the model file)"),
    Flag("warmup-iterations", _int, 5, "forward passes before the golden check (per batch shape)"),
    Flag("max-batch-size", _int, 16, "rows per forward with dynamic batching; 0 or 1 = off (inline)"),
    Flag("torch-threads", _positive_int, 1, "torch intra-op threads (1 is best for small models on few cores)"),
    Flag("host", str, "127.0.0.1", "address to listen on", serve_only=True),
    Flag("port", _int, 8000, "TCP port", serve_only=True),
    Flag(
        "workers",
        _int,
        1,
        "processes sharing the port (SO_REUSEPORT), a model copy each; 0 = one per GPU on CUDA, else one per CPU",
        None,
        True,
    ),
    Flag("grpc-port", _int, 0, "OIP v2 over gRPC on this TCP port (same host); 0 = off", None, True),
    Flag("color", str, "", "deployment color, reported in metrics and metadata", ("", "blue", "green"), True),
    Flag("max-batch-delay-ms", _float, 1.0, "wait up to this long to fill a batch, only under concurrency", None, True),
    Flag("max-queue-size", _positive_int, 256, "admitted requests waiting for compute; beyond: 503", None, True),
    Flag("request-timeout-s", _float, 30.0, "a request still waiting for compute after this gets 504", None, True),
    Flag("drain-timeout-s", _float, 30.0, "on SIGTERM, wait this long for in-flight requests", None, True),
    Flag("shutdown-delay-s", _float, 0.0, "on SIGTERM, keep accepting (ready=503) this long first", None, True),
    Flag(
        "failed-exit-delay-s",
        _float,
        10.0,
        "after a load failure, say why on /v2/health/ready this long, then exit 1",
        None,
        True,
    ),
    Flag("max-body-bytes", _positive_int, 8 * 1024 * 1024, "larger request bodies get 413", None, True),
    Flag("gc-freeze", None, True, "gc.freeze() after loading (cuts GC pauses on the hot path)", serve_only=True),
    Flag("zenoh-key-expr", str, "", "answer inference queries on this Zenoh key expression (off if empty)", None, True),
    Flag("zenoh-mode", str, "peer", "Zenoh session mode", ("peer", "client", "router"), True),
    Flag("zenoh-connect", str, "", "comma-separated Zenoh endpoints to connect to, e.g. tcp/10.0.0.5:7447", None, True),
    Flag("zenoh-listen", str, "", "comma-separated Zenoh endpoints to listen on", None, True),
    Flag("feature-service", str, "", "Feast feature service: requests may carry only its entity key"),
    Flag("feast-repo", str, "", "Feast repository (feature_store.yaml) of --feature-service"),
    Flag("feature-timeout-ms", _positive_float, 100.0, "socket timeout of one online-store read"),
    Flag("feature-retry-s", _float, 1.0, "online store down: entity requests fail fast this long"),
    Flag("zenoh-config", str, "", "Zenoh client configuration file (JSON5: endpoints, credentials, TLS)", None, True),
    Flag("zenoh-host-key-expr", str, "", "also answer here, live or not ({model}, {color} filled in)", None, True),
    Flag("zenoh-live-map", str, "", "HAProxy live-color map file: answer --zenoh-key-expr only while live", None, True),
    Flag("zenoh-live-map-key", str, "live", "the map file's live-color key", None, True),
    Flag("flags-file", str, "", "flagd flag file of operator switches, re-read on change (off if empty)", None, True),
    Flag("flags-poll-ms", _positive_int, 1000, "how often the flag file's mtime is checked", None, True),
    Flag("chaos-latency-ms", _float, 0.0, "TESTS ONLY: extra delay per infer request", None, True),
    Flag("chaos-error-rate", _fraction, 0.0, "TESTS ONLY: fraction of infer requests answered 500", None, True),
    Flag("experiment-dir", str, "", "A/B records to DIR/experiments.sqlite while DIR/experiment.json says", None, True),
    Flag("experiment-keep", _positive_int, 20, "keep the records of the last N experiments, prune older", None, True),
    Flag("log-level", str, "info", "log level", ("debug", "info", "warning", "error"), True),
)


def _bool_env(flag: Flag, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{flag.env}={raw!r}: expected true/false")


def env_defaults(flags: Sequence[Flag], environ: dict[str, str]) -> dict[str, Any]:
    """Defaults taken from the environment, parsed and checked like the flags themselves."""
    out = {}
    for flag in flags:
        raw = environ.get(flag.env)
        if raw is None or (raw == "" and flag.default is None):  # FOO= in an EnvironmentFile: unset
            continue
        try:
            if flag.type is None:
                value = _bool_env(flag, raw)
            else:
                value = flag.type(raw)
                if flag.choices and value not in flag.choices:
                    raise ValueError(f"not one of {', '.join(c or repr(c) for c in flag.choices)}")
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"sovereign-runtime: error: {flag.env}={raw!r}: {exc}") from None
        out[flag.dest] = value
    return out


def add_flags(parser: argparse.ArgumentParser, serve: bool, environ: dict[str, str]) -> None:
    flags = [f for f in FLAGS if serve or not f.serve_only]
    defaults = {f.dest: f.default for f in flags}
    defaults.update(env_defaults(flags, environ))
    for flag in flags:
        shown = defaults[flag.dest]
        help_text = f"{flag.help} [env {flag.env}; default {shown!r}]"
        if flag.type is None:
            parser.add_argument(f"--{flag.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{flag.name}", type=flag.type, choices=flag.choices, help=help_text)
    parser.set_defaults(**defaults)


@dataclass
class Settings:
    model_uri: str
    model_name: str | None = None
    model_version: str | None = None
    tracking_uri: str | None = None
    registry_attempts: int = 6
    registry_timeout_s: float = 10.0
    device: str = "auto"
    golden_file: str | None = None
    require_golden: bool = True
    allow_pickle: bool = False
    warmup_iterations: int = 5
    max_batch_size: int = 16
    torch_threads: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    grpc_port: int = 0
    color: str = ""
    max_batch_delay_ms: float = 1.0
    max_queue_size: int = 256
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    shutdown_delay_s: float = 0.0
    failed_exit_delay_s: float = 10.0
    max_body_bytes: int = 8 * 1024 * 1024
    gc_freeze: bool = True
    zenoh_key_expr: str = ""
    zenoh_mode: str = "peer"
    zenoh_connect: str = ""
    zenoh_listen: str = ""
    feature_service: str = ""
    feast_repo: str = ""
    feature_timeout_ms: float = 100.0
    feature_retry_s: float = 1.0
    zenoh_config: str = ""
    zenoh_host_key_expr: str = ""
    zenoh_live_map: str = ""
    zenoh_live_map_key: str = "live"
    flags_file: str = ""
    flags_poll_ms: int = 1000
    chaos_latency_ms: float = 0.0
    chaos_error_rate: float = 0.0
    experiment_dir: str = ""
    experiment_keep: int = 20
    log_level: str = "info"

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Settings:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(ns).items() if k in fields})


def parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = dict(os.environ if environ is None else environ)
    top = argparse.ArgumentParser(
        prog="sovereign-runtime",
        description="PyTorch inference server speaking the Open Inference Protocol v2.",
    )
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the model over HTTP (and Zenoh)")
    add_flags(serve, True, environ)
    check = sub.add_parser("check", help="load, warm up and golden-check the model; print JSON; exit 1 on failure")
    add_flags(check, False, environ)
    features = sub.add_parser(
        "features", help="look a feature service up in the Feast registry (no model); print JSON; exit 1 if absent"
    )
    add_flags(features, False, environ)
    return top


def parse(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> tuple[str, Settings]:
    p = parser(environ)
    ns = p.parse_args(argv)
    if ns.command == "features":
        if not (ns.feature_service and ns.feast_repo):
            p.error("features: --feature-service and --feast-repo are required")
        ns.model_uri = ns.model_uri or ""
    elif not ns.model_uri:
        p.error("--model-uri (or SOVEREIGN_RUNTIME_MODEL_URI) is required")
    # A host's runtimes get the repository (inference_runtime writes it wherever an online store exists); only a
    # model that names a feature service uses it, so a repository without a service is a vector-only model.
    if getattr(ns, "feature_service", "") and not getattr(ns, "feast_repo", ""):
        p.error("--feature-service needs --feast-repo (SOVEREIGN_RUNTIME_FEATURE_SERVICE / _FEAST_REPO)")
    if ns.tracking_uri is None:
        ns.tracking_uri = (environ if environ is not None else os.environ).get("MLFLOW_TRACKING_URI")
    return ns.command, Settings.from_namespace(ns)
