"""Run one scheduled job and write its node_exporter textfile metrics (ARCHITECTURE §7).

    sovereign-job --job NAME --max-age SECONDS [--lock] [--timeout S] [--textfile-dir DIR] -- CMD ARGS...

Writes DIR/sovereign_NAME.prom atomically (temp file, fsync, rename) after every run:

    sovereign_job_last_success_timestamp_seconds{job="NAME"}  kept from the previous file when this run fails
    sovereign_job_last_run_timestamp_seconds{job="NAME"}
    sovereign_job_success{job="NAME"}                          1 or 0, for the last run
    sovereign_job_duration_seconds{job="NAME"}
    sovereign_job_max_age_seconds{job="NAME"}                  how old the last success may be

The command may append its own metrics (exposition format, one sample per line) to the file named by
the environment variable SOVEREIGN_JOB_METRICS_FILE; valid lines are copied into the .prom file, others
are dropped with a message. The exit status is the command's (124 when --timeout killed it, 75 when
--lock found another run, 2 for a usage error). Installed by roles/_common (tasks_from: job_metrics);
Python standard library only, so it runs on any host before any venv exists.
"""

import argparse
import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

EX_USAGE = 2
EX_TEMPFAIL = 75
EX_TIMEOUT = 124
JOB_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# One sample: name, optional labels, value, optional timestamp (Prometheus text format 0.0.4).
SAMPLE_RE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})?'
    r" +(-?[0-9.]+([eE][-+]?[0-9]+)?|[-+]?Inf|NaN)( +-?[0-9]+)?$"
)
COMMENT_RE = re.compile(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$")
METRICS = (
    ("last_success_timestamp_seconds", "gauge", "Unix time of the job's last successful run."),
    ("last_run_timestamp_seconds", "gauge", "Unix time the job's last run ended."),
    ("success", "gauge", "1 if the job's last run succeeded, else 0."),
    ("duration_seconds", "gauge", "Wall time of the job's last run."),
    ("max_age_seconds", "gauge", "How old the last success may be before the job counts as stale."),
)


def say(msg):
    print(f"sovereign-job: {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sovereign-job", description=__doc__.split("\n", 1)[0])
    p.add_argument("--job", required=True, help="job name, the job label and the file name")
    p.add_argument("--max-age", required=True, type=float, help="seconds the last success may be old")
    p.add_argument("--textfile-dir", default="/var/lib/prometheus/node-exporter")
    p.add_argument("--lock", action="store_true", help="refuse to run while another run holds the lock")
    p.add_argument("--lock-dir", default="/run/lock")
    p.add_argument("--timeout", type=float, default=0, help="kill the command after S seconds (0: never)")
    p.add_argument("--kill-after", type=float, default=30, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not JOB_RE.match(args.job):
        p.error(f"--job {args.job!r} is not a metric-safe name ([a-zA-Z_][a-zA-Z0-9_]*)")
    if args.max_age <= 0:
        p.error("--max-age must be a positive number of seconds (the job's schedule plus slack)")
    if not args.command:
        p.error("no command given after --")
    return args


def previous_success(path, job):
    """The last success timestamp of the previous file, so a failed run does not reset it."""
    key = f'sovereign_job_last_success_timestamp_seconds{{job="{job}"}} '
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(key):
                    return float(line[len(key) :].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


def extra_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [ln.rstrip("\n") for ln in fh]
    except OSError:
        return []
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if SAMPLE_RE.match(line) or COMMENT_RE.match(line):
            kept.append(line)
        else:
            say(f"dropped line {n} of the job's metrics (not Prometheus text format): {line[:120]!r}")
    return kept


def _num(value):
    # Full precision for timestamps; integral values without a fraction.
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def write_metrics(textfile_dir, job, values, extra):
    out = []
    for name, kind, help_text in METRICS:
        full = f"sovereign_job_{name}"
        out += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        if values.get(name) is not None:
            out.append(f'{full}{{job="{job}"}} {_num(values[name])}')
    out += extra
    final = os.path.join(textfile_dir, f"sovereign_{job}.prom")
    fd, tmp = tempfile.mkstemp(prefix=f".sovereign_{job}.", suffix=".tmp", dir=textfile_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def take_lock(lock_dir, job):
    path = os.path.join(lock_dir, f"sovereign-job-{job}.lock")
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        say(f"{job} is already running (pid {holder}, lock {path}); not starting a second run")
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def run(args, metrics_file):
    env = dict(os.environ, SOVEREIGN_JOB_METRICS_FILE=metrics_file, SOVEREIGN_JOB_NAME=args.job)
    proc = None
    stopped = []

    def forward(signum, _frame):
        # systemctl stop: pass it on to the whole job, then record the run as failed.
        stopped.append(signum)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

    # Before the command starts: a stop that comes while it is being started still reaches it.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        proc = subprocess.Popen(args.command, env=env, start_new_session=True)
    except OSError as exc:
        say(f"cannot start {args.command[0]!r}: {exc.strerror}")
        return 127
    if stopped:  # the signal came during Popen, before forward() knew the process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, stopped[0])
    try:
        rc = proc.wait(timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        say(f"{args.job} ran past --timeout {args.timeout:g} s: SIGTERM, then SIGKILL after {args.kill_after:g} s")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=args.kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return EX_TIMEOUT
    return rc if rc >= 0 else 128 - rc


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(args.textfile_dir):
        say(
            f"textfile directory {args.textfile_dir} does not exist, so {args.job} would run unmonitored: "
            "converge sovereign.mlops.common (node_exporter's textfile collector) or pass --textfile-dir"
        )
        return EX_USAGE
    lock = take_lock(args.lock_dir, args.job) if args.lock else None
    if args.lock and lock is None:
        return EX_TEMPFAIL
    prom = os.path.join(args.textfile_dir, f"sovereign_{args.job}.prom")
    last_success = previous_success(prom, args.job)
    with tempfile.TemporaryDirectory(prefix=f"sovereign-job-{args.job}.") as scratch:
        metrics_file = os.path.join(scratch, "metrics.prom")
        open(metrics_file, "w").close()
        start = time.monotonic()
        rc = run(args, metrics_file)
        duration = time.monotonic() - start
        extra = extra_lines(metrics_file)
    now = time.time()
    if rc == 0:
        last_success = now
    values = {
        "last_success_timestamp_seconds": last_success,
        "last_run_timestamp_seconds": now,
        "success": 1.0 if rc == 0 else 0.0,
        "duration_seconds": duration,
        "max_age_seconds": args.max_age,
    }
    write_metrics(args.textfile_dir, args.job, values, extra)
    say(f"{args.job} {'succeeded' if rc == 0 else f'failed (exit {rc})'} in {duration:.1f} s; metrics in {prom}")
    if lock is not None:
        lock.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
