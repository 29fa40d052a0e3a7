"""scripts/wheelhouse.py's machine-wide wheel cache: a fresh clone takes its sets from it, without the network.

The cache path runs real pip (``pip download --no-index``) on a wheel of the project's own wheelhouse. The fallback
(a pin the cache lacks) would download from PyPI: there pip is replaced by a recorder, and what is checked is that
it asks the index, and that what it got joins the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("wheelhouse_cache_under_test", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def _six_wheel() -> Path:
    found = sorted((ROOT / ".cache" / "wheelhouse").glob("six-*.whl"))
    if not found:
        pytest.fail("no six wheel in .cache/wheelhouse: run `make bootstrap` (it builds the wheelhouse)")
    return found[0]


def test_a_set_whose_pins_are_all_cached_comes_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    six = _six_wheel()
    shutil.copy2(six, cache / six.name)
    monkeypatch.setattr(wheelhouse, "WHEEL_CACHE", cache)
    # No index to fall back on: a download that did not take the cache fails instead of reaching PyPI.
    # (pip reads no config file, whose indexes and find-links may hold the wheel too.)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}.items():
        monkeypatch.setenv(name, value)
    requirements = tmp_path / "hosts-x.in"
    requirements.write_text("six\n")
    target, built = tmp_path / "x", tmp_path / "built"
    built.mkdir()
    wheelhouse.download_set(requirements, target, built)
    assert [p.name for p in target.glob("*.whl")] == [six.name]


def test_a_pin_missing_from_the_cache_is_downloaded_and_joins_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(wheelhouse, "WHEEL_CACHE", cache)
    target, built = tmp_path / "x", tmp_path / "built"
    target.mkdir()
    built.mkdir()
    calls = []

    def recorder(*args, quiet_failure=False):
        calls.append(args)
        if "--no-index" in args:
            (target / "partial-1.0-py3-none-any.whl").write_bytes(b"left by the failed try")
            raise subprocess.CalledProcessError(1, ["pip", *args])
        (target / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"downloaded")

    monkeypatch.setattr(wheelhouse, "pip", recorder)
    wheelhouse.download_set(tmp_path / "hosts-x.in", target, built)
    assert len(calls) == 2
    assert "--no-index" in calls[0]
    assert "--no-index" not in calls[1]
    assert sorted(p.name for p in target.glob("*.whl")) == ["six-1.17.0-py2.py3-none-any.whl"]
    assert (cache / "six-1.17.0-py2.py3-none-any.whl").read_bytes() == b"downloaded"


def test_without_a_cache_directory_the_index_is_asked_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(wheelhouse, "WHEEL_CACHE", tmp_path / "absent")
    calls = []
    monkeypatch.setattr(wheelhouse, "pip", lambda *args, quiet_failure=False: calls.append(args))
    (tmp_path / "x").mkdir()
    wheelhouse.download_set(tmp_path / "hosts-x.in", tmp_path / "x", tmp_path)
    assert len(calls) == 1
    assert "--no-index" not in calls[0]
    assert (tmp_path / "absent").is_dir()
