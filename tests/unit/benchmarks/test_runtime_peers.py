"""benchmarks/runtime's pieces that run without a peer installed: the result table and its ratios, the
peer registry (selection, launch specs, install failures reported with their reason), answer checks and
the load generator's response framing. No server is started and nothing is installed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks" / "runtime"))

import bench
import loadgen
import peers
import report


def row(label, c, rps, p50, p99, p999, model="light", **extra):
    return {"model": model, "label": label, "concurrency": c, "rps": rps, "p50_ms": p50, "p99_ms": p99,
            "p999_ms": p999, "errors": 0, "loadavg_1m": 7.5, **extra}  # fmt: skip


# --- ratios and the table ---------------------------------------------------------------------------


def test_ratio_is_peer_over_ours_and_none_when_a_side_is_missing():
    assert report.ratio(2500.0, 10000.0) == 0.25
    assert report.ratio(None, 1.0) is None
    assert report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0.0) is None


def test_with_ratios_pairs_rows_with_ours_of_the_same_model_and_concurrency():
    rows = [
        row("sovereign", 16, 8000, 2.0, 4.0, 8.0),
        row("kserve", 16, 2000, 8.0, 20.0, 40.0),
        row("sovereign", 1, 4000, 0.25, 0.5, 1.0),
        row("kserve", 1, 1000, 1.0, 2.0, 5.0),
        row("kserve", 64, 1000, 60.0, 90.0, 99.0),  # ours did not run at c=64
        row("sovereign", 16, 500, 30.0, 60.0, 90.0, model="heavy"),
    ]
    out = {(r["model"], r["label"], r["concurrency"]): r["vs_ours"] for r in report.with_ratios(rows, "sovereign")}
    assert out["light", "kserve", 16] == {"rps": 0.25, "p50_ms": 4.0, "p99_ms": 5.0, "p999_ms": 5.0}
    assert out["light", "kserve", 1] == {"rps": 0.25, "p50_ms": 4.0, "p99_ms": 4.0, "p999_ms": 5.0}
    assert out["light", "sovereign", 16] == {"rps": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "p999_ms": 1.0}
    assert out["light", "kserve", 64] == {"rps": None, "p50_ms": None, "p99_ms": None, "p999_ms": None}


def test_table_has_every_row_sorted_by_model_concurrency_and_throughput_with_ours_marked():
    rows = [
        row("kserve", 16, 2000, 8.0, 20.0, 40.0),
        row("sovereign", 16, 8000, 2.0, 4.0, 8.0, mean_batch_rows=6.54),
        row("bare", 16, 5000, 3.0, 6.0, 12.0),
        row("sovereign", 1, 4000, 0.25, 0.5, 1.0),
    ]
    lines = report.table(rows, "sovereign").splitlines()
    assert lines[0].startswith("| model | c | server | req/s |") and "p99.9 ÷ ours" in lines[0]
    body = lines[2:]
    assert len(body) == 4
    assert "| light | 1 | **sovereign** |" in body[0]
    assert "**sovereign** (6.5 rows/forward) | 8,000 |" in body[1]
    assert "| bare | 5,000 | 3.000 | 6.00 | 12.00 | 0.62 | 1.50 | 1.50 | 1.50 | 0 | 7.5 |" in body[2]
    assert "| kserve | 2,000 |" in body[3] and "| 0.25 | 4.00 | 5.00 | 5.00 |" in body[3]


def test_table_shows_a_dash_where_ours_is_missing():
    line = report.table([row("kserve", 64, 1000, 60.0, 90.0, 99.0)], "sovereign").splitlines()[2]
    assert "| — | — | — | — |" in line


def test_failures_table_names_peer_stage_and_reason_and_escapes_pipes():
    assert "Every selected peer" in report.failures_table([])
    text = report.failures_table(
        [
            peers.Failure("torchserve", "install", "`java` not found on PATH"),
            peers.Failure("ray", "start", "exited with 1 | raylet\n died", "heavy", "ray"),
        ]
    )
    lines = text.splitlines()
    assert lines[2] == "| torchserve | — | — | install | `java` not found on PATH |"
    assert lines[3] == "| ray | heavy | ray | start | exited with 1 \\| raylet died |"


def test_close_enough():
    assert report.close_enough([1.0, 2.0], [1.0, 2.0000001]) is None
    assert "3 numbers" in report.close_enough([1.0, 2.0, 3.0], [1.0, 2.0])
    assert "output[1]" in report.close_enough([1.0, 2.5], [1.0, 2.0])


# --- registry ---------------------------------------------------------------------------------------


def test_select_keeps_registry_order_always_includes_ours_and_rejects_unknown_names():
    assert peers.select(None) == list(peers.PEERS)
    assert peers.select("mlflow,bare") == ["sovereign", "bare", "mlflow"]
    with pytest.raises(SystemExit, match="unknown nginx; known: sovereign"):
        peers.select("bare,nginx")


def test_every_peer_has_pins_with_torch_pinned_to_the_cpu_wheel():
    for name, peer in peers.PEERS.items():
        if not peer.venv:
            continue
        lines = peers.pins(name)
        assert "torch==2.13.0+cpu" in lines, name
        assert all("==" in line for line in lines), (name, lines)


@pytest.mark.parametrize("model", ["light", "heavy"])
def test_every_peer_launches_named_configured_targets_on_their_own_ports(tmp_path, model):
    counter = iter(range(20000, 20100))
    labels, ports = [], []
    for name, peer in peers.PEERS.items():
        ctx = peers.Ctx(model, tmp_path / model, 64, f"/venvs/{name}/bin/python", tmp_path, lambda: next(counter))
        launches = peer.launches(ctx)
        assert launches, name
        for launch in launches:
            assert launch.config and launch.cmd and (launch.ready == "" or launch.ready.startswith("/"))
            assert launch.targets, name
            for t in launch.targets:
                assert t.config, t.label
                json.loads(t.body)
                labels.append(t.label)
            ports += sorted({launch.ready_port, *(t.port for t in launch.targets)})
    assert len(set(labels)) == len(labels)
    assert len(set(ports)) == len(ports)  # no two launches share a port (mlflow's two formats share one)
    expected = {"sovereign", "sovereign d0", "bare (uvicorn raw ASGI)", "kserve (OIP v2)", "litserve",
                "ray serve (proxy)", "ray serve (replica)", "bentoml", "bentoml (adaptive batching)",
                "pytriton (OIP v2)", "torchserve", "mlflow (inputs)", "mlflow (dataframe_split)"}  # fmt: skip
    assert set(labels) == expected


def test_batching_peers_batch_on_the_heavy_model_only_and_say_so(tmp_path):
    def config(model, name):
        ctx = peers.Ctx(model, tmp_path, 64, "/p/bin/python", tmp_path, lambda: 1)
        return peers.PEERS[name].launches(ctx)[0].config

    for name in ("torchserve", "ray", "litserve"):
        assert "no batching" in config("light", name), name
        assert "max 16" in config("heavy", name) or "batchSize 16" in config("heavy", name), name
    assert "queue delay 0" in config("light", "pytriton")
    assert "queue delay 2 ms" in config("heavy", "pytriton")


def test_install_reports_a_missing_java_with_the_setup_hint(monkeypatch):
    monkeypatch.setattr(peers.shutil, "which", lambda exe: None)
    failure = peers.install("torchserve", log=lambda _: None)
    assert failure.stage == "install" and "`java` not found" in failure.reason
    assert "--setup" in failure.reason and peers.JAVA_PACKAGE in failure.reason


def test_install_reports_pips_error_line(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "VENVS", tmp_path / "venvs")
    monkeypatch.setattr(peers, "ROOT", tmp_path)

    def fake_run(cmd, stdout=None, stderr=None, **_):
        if "pip" in cmd:
            stdout.write(b"Collecting kserve==0.21.0\nERROR: No matching distribution found for kserve==0.21.0\n")
            stdout.flush()
            return subprocess.CompletedProcess(cmd, 1)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    failure = peers.install("kserve", log=lambda _: None)
    assert failure.peer == "kserve" and failure.stage == "install"
    assert "exited 1" in failure.reason and "No matching distribution found for kserve==0.21.0" in failure.reason
    assert not (tmp_path / "venvs" / "kserve" / ".bench-stamp").exists()


def test_install_of_ours_needs_nothing():
    assert peers.install("sovereign", log=lambda _: None) is None


def test_parse_any_reads_the_numbers_of_each_peers_envelope():
    assert peers.parse_any(b'{"output": [[1.0, 2.0]]}') == [1.0, 2.0]
    assert peers.parse_any(b'{"predictions": [[1, 2]]}') == [1.0, 2.0]
    assert peers.parse_any(b"[[0.5, 1.5]]") == [0.5, 1.5]
    oip = {"model_name": "m", "outputs": [{"name": "o", "data": [3.0]}]}
    assert peers.parse_any(json.dumps(oip).encode()) == [3.0]
    assert peers.parse_oip(json.dumps(oip).encode()) == [3.0]
    with pytest.raises(ValueError, match="cannot read"):
        peers.parse_any(b'{"a": 1, "b": 2}')


# --- load generator framing and the CLI -------------------------------------------------------------


def test_conn_frames_content_length_and_chunked_responses():
    conn = loadgen._Conn(None)
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    chunked = b"HTTP/1.1 503 No\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n"
    data = first + chunked + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    done = []
    for i in range(0, len(data), 7):  # arrives in small pieces
        if conn.feed(data[i : i + 7]):
            done.append(conn.status)
    assert done == [200, 503, 200]
    assert conn.buf == b""


def test_parse_args_defaults_and_bad_model():
    args = bench.parse_args([])
    assert args.models == ["light", "heavy"] and args.concurrency == [1, 16, 64] and args.pin
    assert bench.parse_args(["--concurrency", "1,16", "--models", "heavy"]).concurrency == [1, 16]
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "huge"])
