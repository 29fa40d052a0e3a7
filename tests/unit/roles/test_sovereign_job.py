"""The scheduled-job wrapper of ARCHITECTURE §7 (roles/_common/files/sovereign_job.py), run as a process."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parents[3] / "roles" / "_common" / "files" / "sovereign_job.py"


def run(tmp_path, *args, textfile_dir=None, timeout=30):
    tdir = textfile_dir if textfile_dir is not None else tmp_path / "textfile"
    tdir.mkdir(exist_ok=True)
    cmd = [sys.executable, str(WRAPPER), "--textfile-dir", str(tdir), "--lock-dir", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def samples(path):
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def prom(tmp_path, job="demo"):
    return tmp_path / "textfile" / f"sovereign_{job}.prom"


@pytest.mark.parametrize(
    ("command", "rc", "success"),
    [
        (["true"], 0, 1),
        (["false"], 1, 0),
        (["sh", "-c", "exit 3"], 3, 0),
        (["/nonexistent/command"], 127, 0),
    ],
)
def test_every_run_writes_the_five_metrics(tmp_path, command, rc, success):
    before = time.time()
    res = run(tmp_path, "--job", "demo", "--max-age", "3600", "--", *command)
    assert res.returncode == rc, res.stderr
    got = samples(prom(tmp_path))
    assert got['sovereign_job_success{job="demo"}'] == success
    assert got['sovereign_job_max_age_seconds{job="demo"}'] == 3600
    assert got['sovereign_job_last_run_timestamp_seconds{job="demo"}'] >= before - 1
    assert got['sovereign_job_duration_seconds{job="demo"}'] >= 0
    has_success = 'sovereign_job_last_success_timestamp_seconds{job="demo"}' in got
    assert has_success == bool(success)
    assert ("succeeded" if success else f"failed (exit {rc})") in res.stderr
    assert oct(prom(tmp_path).stat().st_mode & 0o777) == "0o644"
    # Nothing half-written is left for node_exporter (it reads *.prom only, but leave no litter either).
    assert [p.name for p in (tmp_path / "textfile").iterdir()] == ["sovereign_demo.prom"]


def test_a_failed_run_keeps_the_last_success(tmp_path):
    assert run(tmp_path, "--job", "demo", "--max-age", "60", "--", "true").returncode == 0
    first = samples(prom(tmp_path))['sovereign_job_last_success_timestamp_seconds{job="demo"}']
    time.sleep(0.05)
    assert run(tmp_path, "--job", "demo", "--max-age", "60", "--", "false").returncode == 1
    got = samples(prom(tmp_path))
    assert got['sovereign_job_last_success_timestamp_seconds{job="demo"}'] == first
    assert got['sovereign_job_last_run_timestamp_seconds{job="demo"}'] > first
    assert got['sovereign_job_success{job="demo"}'] == 0


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ("restic_bytes_added 12345", True),
        ('restic_files{kind="new"} 7', True),
        ('zfs_snapshot_age_seconds{dataset="tank/pg",policy="hourly"} 3.5e+02', True),
        ("check_result NaN", True),
        ("# HELP restic_bytes_added Bytes the run added.", True),
        ("# TYPE restic_bytes_added gauge", True),
        ("not a metric line", False),
        ("restic_bytes_added twelve", False),
        ("broken{label=unquoted} 1", False),
    ],
)
def test_the_jobs_own_metrics_are_validated(tmp_path, line, kept):
    script = f"printf '%s\\n' '{line}' >> \"$SOVEREIGN_JOB_METRICS_FILE\""
    res = run(tmp_path, "--job", "demo", "--max-age", "60", "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    text = prom(tmp_path).read_text()
    assert (line in text.splitlines()) == kept
    assert ("dropped line 1" in res.stderr) == (not kept)


def test_lock_refuses_an_overlapping_run_and_names_the_holder(tmp_path):
    marker = tmp_path / "started"
    first = subprocess.Popen(
        [sys.executable, str(WRAPPER), "--textfile-dir", str(tmp_path / "textfile"), "--lock-dir", str(tmp_path),
         "--job", "demo", "--max-age", "60", "--lock", "--", "sh", "-c", f"touch {marker}; sleep 3"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    (tmp_path / "textfile").mkdir(exist_ok=True)
    deadline = time.time() + 10
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run(tmp_path, "--job", "demo", "--max-age", "60", "--lock", "--", "true")
    assert second.returncode == 75
    assert re.search(rf"demo is already running \(pid {first.pid}, lock .*sovereign-job-demo\.lock\)", second.stderr)
    assert first.wait(timeout=20) == 0
    # The refused run wrote nothing: the file is the first run's, a success.
    assert samples(prom(tmp_path))['sovereign_job_success{job="demo"}'] == 1
    assert run(tmp_path, "--job", "demo", "--max-age", "60", "--lock", "--", "true").returncode == 0


def test_timeout_kills_the_whole_job_and_records_a_failure(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    res = run(tmp_path, "--job", "demo", "--max-age", "60", "--timeout", "1", "--kill-after", "1", "--",
              "sh", "-c", script)  # fmt: skip
    assert res.returncode == 124
    assert time.monotonic() - start < 10
    assert "ran past --timeout 1 s" in res.stderr
    assert samples(prom(tmp_path))['sovereign_job_success{job="demo"}'] == 0
    grandchild = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        for _attempt in range(50):
            os.kill(grandchild, 0)
            time.sleep(0.05)


def test_sigterm_to_the_wrapper_stops_the_job_and_records_it(tmp_path):
    (tmp_path / "textfile").mkdir()
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, str(WRAPPER), "--textfile-dir", str(tmp_path / "textfile"), "--lock-dir", str(tmp_path),
         "--job", "demo", "--max-age", "60", "--", "sh", "-c", f"touch {started}; exec sleep 30"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The stop comes once the job runs (a fixed delay lost the race to the interpreter's start on a loaded machine).
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stderr.read() if proc.poll() is not None else "the job never started"
        )
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(timeout=15) == 128 + 15
    assert samples(prom(tmp_path))['sovereign_job_success{job="demo"}'] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--job", "bad-name", "--max-age", "60", "--", "true"], "not a metric-safe name"),
        (["--job", "demo", "--max-age", "0", "--", "true"], "--max-age must be a positive number"),
        (["--job", "demo", "--max-age", "60"], "no command given"),
    ],
)
def test_usage_errors_name_the_problem(tmp_path, args, message):
    res = run(tmp_path, *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert not prom(tmp_path).exists()


def test_a_missing_textfile_directory_is_refused_before_the_command_runs(tmp_path):
    marker = tmp_path / "ran"
    cmd = [sys.executable, str(WRAPPER), "--textfile-dir", str(tmp_path / "absent"), "--job", "demo",
           "--max-age", "60", "--", "touch", str(marker)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "textfile directory" in res.stderr and "converge sovereign.mlops.common" in res.stderr
    assert not marker.exists()
