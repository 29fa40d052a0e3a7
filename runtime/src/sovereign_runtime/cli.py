"""``sovereign-runtime serve`` and ``sovereign-runtime check``."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Sequence

from . import config, logs

# torch warns at import when numpy is not installed. The runtime's wheelhouse leaves numpy out on
# purpose (nothing on the serving path uses it: requests become tensors through array/frombuffer and
# go back through tolist), so that warning is noise on every start. Only exactly that one is silenced.
NO_NUMPY_WARNING = r"Failed to initialize NumPy: No module named 'numpy'"


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set (embedded use)
        torch.set_num_interop_threads(1)  # the server never uses inter-op parallelism


def check(cfg: config.Settings) -> int:
    """Load, warm up and golden-check, print one JSON document on stdout; exit 0 only if it passed."""
    from .engine import Engine
    from .model import ModelLoadError
    from .startup import prepare

    def retrying(reason: str, fields: dict) -> None:
        logs.log_event("registry_unreachable", logging.WARNING, reason=reason, **fields)

    try:
        report = prepare(Engine(cfg), on_retry=retrying)
    except ModelLoadError as exc:
        report = {"ok": False, "error": str(exc), **exc.fields}
    print(json.dumps(report, default=str))
    return 0 if report.get("ok") else 1


def features(cfg: config.Settings) -> int:
    """The feature service as the runtime would open it (registry only: no model, no online-store read): one JSON
    document; exit 1, naming the service and those that exist, when the registry does not hold it. Deploys ask
    this before restarting anything (roles/release)."""
    from .features import FeatureSource, FeatureStoreError

    source = FeatureSource(cfg.feature_service, cfg.feast_repo)
    try:
        source.open()
    except FeatureStoreError as exc:
        print(json.dumps({"ok": False, "feature_service": cfg.feature_service, "error": str(exc)}))
        return 1
    doc = {"ok": True, "project": source.store.project, **source.details(), "features": source.features}
    doc.pop("up", None)
    print(json.dumps(doc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=NO_NUMPY_WARNING, category=UserWarning)
    command, cfg = config.parse(argv)
    logs.setup(cfg.log_level)
    if command == "serve" and cfg.workers != 1:  # --workers N: a supervisor and N processes (workers.py)
        from . import workers

        if not workers.is_worker():
            code = workers.supervise(cfg, list(sys.argv[1:] if argv is None else argv))
            if code is not None:
                return code
        else:
            _torch_threads(cfg.torch_threads)
            return workers.serve_worker(cfg)
    _torch_threads(cfg.torch_threads)
    if command == "check":
        return check(cfg)
    if command == "features":
        return features(cfg)
    from .server import serve

    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
