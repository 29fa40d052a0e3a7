"""Request ids and A/B experiment records (runtime/src/sovereign_runtime/experiment.py, docs/adr/1420): ids echoed or
made, outcomes validated, and a real `sovereign-runtime serve` process that records an experiment to SQLite, keeps it
across a restart and stops recording when the control file goes."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import IN, http, infer_body, make_engine, runtime_command, runtime_env, stop, wait_until
from sovereign_runtime.experiment import ExperimentStore, dump, parse_outcomes
from sovereign_runtime.request_id import new_id


def test_every_answer_has_a_request_id_in_body_and_header(loaded, client_for):
    client = client_for(make_engine(loaded["torchscript"]))
    x = torch.randn(1, IN)

    async def run():
        made = await client.post("/v2/models/mlp/infer", infer_body(x))
        echoed = await client.post("/v2/models/mlp/infer", infer_body(x, id="client-42"))
        unsafe = await client.post("/v2/models/mlp/infer", infer_body(x, id="line\nbreak"))
        return made, echoed, unsafe

    made, echoed, unsafe = asyncio.run(run())
    rid = made.json()["id"]
    assert made.status == 200 and rid and made.headers[b"x-request-id"] == rid.encode()
    assert echoed.json()["id"] == "client-42" and echoed.headers[b"x-request-id"] == b"client-42"
    # Not safe in a header: echoed in the body only.
    assert unsafe.json()["id"] == "line\nbreak" and b"x-request-id" not in unsafe.headers


def test_generated_ids_are_unique():
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "must be"),
        (b'{"outcomes": []}', "non-empty list"),
        (b'{"value": 1}', "'id' must be the request id"),
        (b'{"id": "", "value": 1}', "'id' must be the request id"),
        (b'{"id": "a", "value": "yes"}', "'value' must be a finite number"),
        (b'{"id": "a", "value": NaN}', "'value' must be a finite number"),
        (b'{"id": "a"}', "'value' must be a finite number"),
        (b'{"outcomes": [{"id": "a", "value": 1}, 7]}', "outcomes[1]: each outcome must be an object"),
    ],
)
def test_bad_outcomes_are_refused_naming_the_field(body, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_outcomes(body)


def test_outcomes_accept_numbers_and_booleans():
    assert parse_outcomes(b'{"id": "a", "value": true}') == [("a", 1.0)]
    body = b'{"outcomes": [{"id": "a", "value": 0}, {"id": "b", "value": 12.5}]}'
    assert parse_outcomes(body) == [("a", 0.0), ("b", 12.5)]


def _start_experiment(store, control, doc):
    """Control file DOC, read by the store (removed and read first: the store notices a change by mtime and size)."""
    control.unlink(missing_ok=True)
    store.poll_control()
    control.write_text(json.dumps(doc))
    store.poll_control()


def test_prune_keeps_the_last_experiments_and_the_outcomes_they_can_join(tmp_path):
    """keep=2 of three experiments: the oldest one's assignments and definition go, and the outcomes older than the
    oldest kept experiment's start (no report can join them); the writer thread prunes by itself when it starts."""
    now = time.time()
    control = tmp_path / "experiment.json"
    store = ExperimentStore(tmp_path, "blue", lambda: ("mlp", "3"), keep=2)
    store._open()
    for i, name in enumerate(("e1", "e2", "e3")):
        _start_experiment(store, control, {"name": name, "started": now - 300 + 100 * i})
        store.record([(b"x-request-id", f"{name}-r".encode())], 200, 0.001)
        store.flush()
    db = store._db
    db.execute("UPDATE experiments SET seen = ? WHERE name = 'e1'", (now - 300,))  # the order they were seen in
    db.execute("UPDATE experiments SET seen = ? WHERE name = 'e2'", (now - 200,))
    db.execute("UPDATE experiments SET seen = ? WHERE name = 'e3'", (now - 100,))
    old = [("before-all", 1.0, now - 1000, "blue"), ("before-e2", 1.0, now - 250, "blue"), ("e2-r", 1.0, now, "blue")]
    db.executemany("INSERT INTO outcomes VALUES (?, ?, ?, ?)", old)
    done = store.prune()
    assert done == {"assignments": 1, "experiments": 1, "outcomes": 2}
    assert [r[0] for r in db.execute("SELECT name FROM experiments ORDER BY name")] == ["e2", "e3"]
    assert [r[0] for r in db.execute("SELECT DISTINCT experiment FROM assignments ORDER BY 1")] == ["e2", "e3"]
    assert [r[0] for r in db.execute("SELECT request_id FROM outcomes")] == ["e2-r"]
    assert dump(tmp_path, "e1")["definition"] is None and not dump(tmp_path, "e1")["assignments"]
    assert [a[0] for a in dump(tmp_path, "e2")["assignments"]] == ["e2-r"]
    assert store.prune() == {"assignments": 0, "experiments": 0, "outcomes": 0}  # nothing more to do
    control.unlink()
    store.poll_control()
    db.close()

    # A color restarted with keep=1: its writer prunes at its start (the newest experiment seen, e3, stays).
    later = ExperimentStore(tmp_path, "blue", lambda: ("mlp", "3"), keep=1)
    later.start()
    try:

        def pruned():
            with sqlite3.connect(tmp_path / "experiments.sqlite") as check:
                return [r[0] for r in check.execute("SELECT name FROM experiments")] == ["e3"]

        wait_until(pruned, 30, "the writer to prune e2 at its start")
    finally:
        later.stop()
    assert later.status()["keep"] == 1
    assert [a[0] for a in dump(tmp_path, "e3")["assignments"]] == ["e3-r"] and not dump(tmp_path, "e2")["assignments"]


def test_an_expired_experiment_is_not_recorded_though_its_file_stays(tmp_path):
    """A killed playbooks/experiment.yml leaves experiment.json behind: past its "expires" the color records nothing
    more, says so in GET /v2/experiment ("expired"), and a new experiment clears that."""
    now = time.time()
    control = tmp_path / "experiment.json"
    store = ExperimentStore(tmp_path, "blue", lambda: ("mlp", "3"))
    store._open()
    _start_experiment(store, control, {"name": "k1", "started": now - 20, "expires": now - 10})
    store.record([(b"x-request-id", b"late")], 200, 0.001)  # past the expiry: not recorded, even before the check
    assert not store.rows
    store.check_expiry()
    assert store.active is None and store.status()["experiment"] is None and store.status()["expired"] == "k1"
    store.poll_control()  # the same file: it stays expired
    assert store.active is None and control.exists()
    _start_experiment(store, control, {"name": "k2", "started": now - 1, "expires": now + 3600})
    store.record([(b"x-request-id", b"r1")], 200, 0.001)
    store.check_expiry()
    assert store.active == "k2" and len(store.rows) == 1 and "expired" not in store.status()
    store.flush()
    store._db.close()


def test_store_records_only_while_the_control_file_names_an_experiment(tmp_path):
    store = ExperimentStore(tmp_path, "blue", lambda: ("mlp", "3"))
    store._open()
    store.poll_control()
    store.record([(b"x-request-id", b"r1")], 200, 0.001)
    assert store.active is None and not store.rows
    (tmp_path / "experiment.json").write_text(json.dumps({"name": "e1", "started": time.time() - 1}))
    store.poll_control()
    store.record([(b"x-request-id", b"r2")], 200, 0.002)
    store.record(None, 503, 0.0001)  # an error without an id still counts for the arm's error rate
    store.add_outcomes([("r2", 1.0)])
    assert store.status()["pending_rows"] == 2 and store.status()["pending"] == 3
    store.flush()
    assert store.status()["requests"] == 2 and store.status()["outcomes"] == 1
    store.add_outcomes([("r2-late-label", 0.0)])  # labels keep coming: pending, while no assignment row is
    assert store.status()["pending"] == 1 and store.status()["pending_rows"] == 0
    store.flush()
    db = sqlite3.connect(tmp_path / "experiments.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute("SELECT experiment, request_id, color, model_version, status FROM assignments").fetchall()
    assert rows == [("e1", "r2", "blue", "3", 200), ("e1", None, "blue", "3", 503)]
    (tmp_path / "experiment.json").unlink()
    store.poll_control()
    assert store.active is None
    # A window: nothing before "started", nothing after "ends" (both colors switch at the same instant).
    (tmp_path / "experiment.json").write_text(json.dumps({"name": "e2", "started": time.time() + 60}))
    store.poll_control()
    store.record([(b"x-request-id", b"early")], 200, 0.001)
    assert store.active == "e2" and not store.rows
    (tmp_path / "experiment.json").write_text(json.dumps({"name": "e2", "started": 1.0, "ends": time.time() - 1}))
    store.poll_control()  # the same experiment rewritten with its end: the window moves, the name stays
    store.record([(b"x-request-id", b"late")], 200, 0.001)
    assert store.active == "e2" and store.window[1] < time.time() and not store.rows
    (tmp_path / "experiment.json").unlink()
    store.poll_control()
    doc = dump(tmp_path, "e1")
    assert (
        doc["definition"]["name"] == "e1"
        and len(doc["assignments"]) == 2
        and tuple(doc["outcomes"][0][:2]) == ("r2", 1.0)
    )
    assert dump(tmp_path, "other")["assignments"] == []


def _serve(models, port: int, state) -> subprocess.Popen:
    cmd = [*runtime_command(), "serve", "--model-uri", str(models.torchscript), "--model-name", "mlp"]
    cmd += ["--port", str(port), "--color", "green", "--experiment-dir", str(state), "--model-version", "7"]
    return subprocess.Popen(cmd, env=runtime_env(), stderr=subprocess.DEVNULL)


def test_server_records_an_experiment_durably_across_a_restart(models, tmp_path):
    from mlflow_testserver import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmp_path / "green"
    proc = _serve(models, port, state)
    try:
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=2).status == 200, 60, "ready")
        x = torch.randn(1, IN)
        before = http("POST", f"{base}/v2/models/mlp/infer", infer_body(x))
        assert before.status == 200 and before.json()["id"]
        (state / "experiment.json").write_text(json.dumps({"name": "ab-1", "started": time.time()}))
        wait_until(lambda: http("GET", f"{base}/v2/experiment").json()["experiment"] == "ab-1", 10, "experiment on")
        ids = [http("POST", f"{base}/v2/models/mlp/infer", infer_body(x)).json()["id"] for _ in range(20)]
        posted = http(
            "POST", f"{base}/v2/outcomes", json.dumps({"outcomes": [{"id": i, "value": 1} for i in ids[:5]]}).encode()
        )
        assert posted.status == 202 and posted.json() == {"accepted": 5, "received": 5}
        bad = http("POST", f"{base}/v2/outcomes", b'{"id": "x", "value": "high"}')
        assert bad.status == 400 and "'value'" in bad.json()["error"]
        assert http("GET", f"{base}/v2/outcomes").status == 405
        wait_until(lambda: written(base, 20), 10, "20 rows and 5 outcomes written")
        metrics = http("GET", f"{base}/metrics").body.decode()
        assert "sovereign_runtime_experiment_active 1.0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc = _serve(models, port, state)  # the same state directory: the counts go on from the database
        wait_until(lambda: http("GET", f"{base}/v2/health/ready", timeout=2).status == 200, 60, "ready again")
        status = http("GET", f"{base}/v2/experiment").json()
        assert status["experiment"] == "ab-1" and status["requests"] == 20 and status["outcomes"] == 5
        http("POST", f"{base}/v2/models/mlp/infer", infer_body(x))
        (state / "experiment.json").unlink()
        wait_until(lambda: http("GET", f"{base}/v2/experiment").json()["experiment"] is None, 10, "experiment off")
        http("POST", f"{base}/v2/models/mlp/infer", infer_body(x))  # not recorded
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        db = sqlite3.connect(state / "experiments.sqlite")
        rows = db.execute("SELECT request_id, color, model_name, model_version, status FROM assignments").fetchall()
        assert len(rows) == 21 and {r[1:] for r in rows} == {("green", "mlp", "7", 200)}
        assert set(ids) <= {r[0] for r in rows} and before.json()["id"] not in {r[0] for r in rows}
        assert {r[0] for r in db.execute("SELECT request_id FROM outcomes")} == set(ids[:5])
        # What the report reads from a host: the dump, without importing torch.
        code = "import runpy, sys; runpy.run_module('sovereign_runtime.experiment', run_name='__main__'); "
        code += "assert 'torch' not in sys.modules"
        out = subprocess.run(
            [sys.executable, "-c", code, str(state), "ab-1"], env=runtime_env(), capture_output=True, check=True
        )
        doc = json.loads(out.stdout)
        assert doc["definition"]["name"] == "ab-1" and len(doc["assignments"]) == 21 and len(doc["outcomes"]) == 5
    finally:
        stop(proc)


def written(base: str, requests: int) -> bool:
    """All rows AND outcomes on disk: outcomes posted to a color may be written after its rows (a CI run read B: 0)."""
    status = http("GET", f"{base}/v2/experiment").json()
    return status["requests"] == requests and status["pending"] == 0


def test_two_colors_records_make_the_report(models, tmp_path):
    """Both colors as real processes (version 1 = arm A on blue, version 2 = arm B on green), an experiment.json in
    each one's directory, answers sent to each color directly (the split itself is HAProxy's: molecule/release),
    outcomes planted by version and posted to the OTHER color (an outcome need not reach the color that answered),
    then each color's dump and `sovereign-ops experiment report --dump`: the planted winner, with both colors'
    rows and outcomes joined."""
    from mlflow_testserver import free_port

    procs, bases, dirs = [], {}, {}
    try:
        for color, version in (("blue", "1"), ("green", "2")):
            port = free_port()
            dirs[color] = tmp_path / color
            cmd = [*runtime_command(), "serve", "--model-uri", str(models.torchscript), "--model-name", "mlp"]
            cmd += ["--port", str(port), "--color", color, "--experiment-dir", str(dirs[color])]
            procs.append(
                subprocess.Popen([*cmd, "--model-version", version], env=runtime_env(), stderr=subprocess.DEVNULL)
            )
            bases[color] = f"http://127.0.0.1:{port}"
        for base in bases.values():
            wait_until(lambda b=base: http("GET", f"{b}/v2/health/ready", timeout=2).status == 200, 60, "ready")
        arms = {
            "A": {"color": "blue", "model": "mlp", "version": "1"},
            "B": {"color": "green", "model": "mlp", "version": "2"},
        }
        definition = {"name": "two", "started": time.time() + 0.5, "split": 50, "arms": arms}
        for d in dirs.values():
            (d / "experiment.json").write_text(json.dumps(definition))
        time.sleep(1)
        x = torch.randn(1, IN)
        rates = {"blue": 0.2, "green": 0.6}
        other = {"blue": "green", "green": "blue"}
        for color, base in bases.items():
            ids = [http("POST", f"{base}/v2/models/mlp/infer", infer_body(x)).json()["id"] for _ in range(150)]
            ones = int(rates[color] * len(ids))
            labels = [{"id": rid, "value": int(i < ones)} for i, rid in enumerate(ids)]
            posted = http("POST", f"{bases[other[color]]}/v2/outcomes", json.dumps({"outcomes": labels}).encode())
            assert posted.status == 202
        for base in bases.values():
            wait_until(lambda b=base: written(b, 150), 10, "rows and outcomes written")
        files = []
        for color, d in dirs.items():
            out = subprocess.run([sys.executable, "-m", "sovereign_runtime.experiment", str(d), "two"],
                                 env=runtime_env(), capture_output=True, check=True)  # fmt: skip
            path = tmp_path / f"{color}.json"
            path.write_text(json.dumps({**json.loads(out.stdout), "host": "h1", "color": color}))
            files += ["--dump", str(path)]
        from sovereign_ops import experiment as report_mod
        from sovereign_ops.cli import main as ops_main

        dumps = [json.loads((tmp_path / f"{c}.json").read_text()) for c in ("blue", "green")]
        report = report_mod.build("two", dumps)
        assert report["verdict"] == "B better", report["verdict_reason"]
        a, b = report["arms"]
        assert (a["requests"], a["outcomes"], b["requests"], b["outcomes"]) == (150, 150, 150, 150)
        assert a["metric"]["mean"] == pytest.approx(0.2) and b["metric"]["mean"] == pytest.approx(0.6)
        assert ops_main(["experiment", "report", "two", *files]) == 0
    finally:
        for proc in procs:
            stop(proc)
