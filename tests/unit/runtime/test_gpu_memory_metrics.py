"""The runtime's /metrics reports its own GPU memory when the model is on CUDA (ARCHITECTURE §5).

**With a double**: there is no GPU on the machines these tests run on, so the model here is the real CPU model
relabelled ``device=cuda`` and torch's two CUDA memory counters (torch.cuda.memory_allocated/_reserved, what
sovereign_runtime.model.cuda_memory reads) are replaced by stand-ins for the test. It checks the wiring: the
gauges exist on CUDA only, are read at scrape time from torch, carry the device. What could not run here: torch's
real counters on a GPU (scripts/gpu-proof.sh reads them from a runtime serving on cuda).
"""

from __future__ import annotations

import dataclasses

import torch
from conftest import make_engine
from prometheus_client.parser import text_string_to_metric_families
from sovereign_runtime.config import Settings
from sovereign_runtime.engine import Engine


def samples(engine):
    text = engine.metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_cuda_model_reports_allocated_and_reserved_gpu_memory(loaded, monkeypatch):
    reads = {"allocated": 0, "reserved": 0}

    def allocated(device):
        reads["allocated"] += 1
        assert device == torch.device("cuda")
        return 3 * 1024**2 * reads["allocated"]

    def reserved(device):
        reads["reserved"] += 1
        return 64 * 1024**2

    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", reserved)
    engine = Engine(Settings(model_uri="(preloaded)", device="cuda"))
    engine.attach(dataclasses.replace(loaded["torchscript"], device=torch.device("cuda")))

    first = samples(engine)
    second = samples(engine)
    assert first["sovereign_runtime_gpu_memory_allocated_bytes"] == 3 * 1024**2
    # Read from torch at each scrape, not cached at load time.
    assert (
        second["sovereign_runtime_gpu_memory_allocated_bytes"] > first["sovereign_runtime_gpu_memory_allocated_bytes"]
    )
    assert first["sovereign_runtime_gpu_memory_reserved_bytes"] == 64 * 1024**2
    text = engine.metrics.render().decode()
    assert 'device="cuda"' in text  # sovereign_runtime_model_info says where the model runs


def test_cpu_model_has_no_gpu_memory_series(loaded):
    names = samples(make_engine(loaded["torchscript"]))
    assert not [name for name in names if "gpu_memory" in name]
