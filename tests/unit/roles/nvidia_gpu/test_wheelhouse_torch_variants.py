"""scripts/wheelhouse.py's CUDA torch sets (SOVEREIGN_TORCH_VARIANTS), without downloading them (several GB).

What could not run here: the download itself from the PyTorch index; the arguments it would use are checked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def test_no_variant_by_default(monkeypatch):
    monkeypatch.delenv("SOVEREIGN_TORCH_VARIANTS", raising=False)
    assert wheelhouse.torch_variants() == []


def test_variants_are_read_space_or_comma_separated(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_TORCH_VARIANTS", "cu126, cu128")
    assert wheelhouse.torch_variants() == ["cu126", "cu128"]


def test_a_variant_that_is_no_cuda12_build_is_refused(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_TORCH_VARIANTS", "rocm6.2")
    with pytest.raises(SystemExit, match="not CUDA 12 builds"):
        wheelhouse.torch_variants()


def test_the_pinned_torch_is_downloaded_as_the_cuda_build(tmp_path):
    pin = wheelhouse.torch_pin()
    assert "+" not in pin
    args = wheelhouse.torch_download_args("cu126", tmp_path / "torch-cu126", tmp_path / "c.txt")
    assert args[-1] == f"torch=={pin}+cu126"
    assert args[args.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu126"
    assert "--only-binary=:all:" in args


def test_asking_for_a_variant_rebuilds_the_wheelhouse(monkeypatch):
    monkeypatch.delenv("SOVEREIGN_TORCH_VARIANTS", raising=False)
    plain = wheelhouse.inputs_digest()
    monkeypatch.setenv("SOVEREIGN_TORCH_VARIANTS", "cu126")
    assert wheelhouse.inputs_digest() != plain
