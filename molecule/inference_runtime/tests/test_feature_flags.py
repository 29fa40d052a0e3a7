"""Verifies roles/feature_flags with the runtime: the flag file the role wrote, a flag changed through the
sovereign.mlops.feature_flag module (run by ansible on the container, as an operator would) reaching both running
runtimes without a restart (same PID, batching off then on), and a flag file that fails the schema refused before
anything changes. Real runtimes, real flagd file provider; nothing is a double."""

import json
import os
import subprocess
import sys
import time

import pytest
from test_inference_runtime import COLORS, internal

HOST = "molecule-inference_runtime"
FLAGS = "/etc/sovereign/flags/flags.json"


def feature_flag(**params):
    """Run sovereign.mlops.feature_flag on the container; its result (``failed`` set on failure)."""
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible"), HOST, "-i", os.environ["MOLECULE_INVENTORY_FILE"],
            "-m", "sovereign.mlops.feature_flag", "-a", json.dumps({"path": FLAGS, **params})]  # fmt: skip
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    try:
        document, _end = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{") :])
        return document["plays"][0]["tasks"][0]["hosts"][HOST]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"ansible rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")


def main_pid(host, color):
    return host.check_output(f"systemctl show -p MainPID --value sovereign-runtime@{color}")


def max_batch(host, port):
    out = host.check_output(f"curl -sS --fail-with-body --max-time 5 http://{internal(host)}:{port}/v2/models/demo")
    return json.loads(out)["parameters"]["max_batch_size"]


def wait_for(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_the_flag_file_is_readable_by_the_runtime_only(host):
    f = host.file(FLAGS)
    assert (f.user, f.group, f.mode) == ("root", "sovereign", 0o640)
    d = host.file("/etc/sovereign/flags")
    assert (d.user, d.group, d.mode) == ("root", "sovereign", 0o750)
    doc = json.loads(f.content_string)
    assert doc["$schema"] == "https://flagd.dev/schema/v0/flags.json"
    assert set(doc["flags"]) == {"runtime-batching", "runtime-feature-fetch"}


def test_a_flag_change_reaches_the_running_runtimes_without_a_restart(host):
    pids = {color: main_pid(host, color) for color in COLORS}
    assert all(max_batch(host, port) == 16 for port in COLORS.values())
    result = feature_flag(flag="runtime-batching", default_variant="off")
    assert result["changed"] is True and result["flag"]["defaultVariant"] == "off", result
    for port in COLORS.values():
        wait_for(lambda port=port: max_batch(host, port) == 1, f"batching off on :{port}")
    assert feature_flag(flag="runtime-batching", default_variant="on")["changed"] is True
    for port in COLORS.values():
        wait_for(lambda port=port: max_batch(host, port) == 16, f"batching back on on :{port}")
    assert {color: main_pid(host, color) for color in COLORS} == pids  # the same processes throughout


def test_bad_input_fails_naming_the_problem_and_changes_nothing(host):
    before = host.file(FLAGS).sha256sum
    bad_state = feature_flag(definitions={"runtime-batching": {"state": "ON", "variants": {"on": True}}})
    assert bad_state.get("failed") is True
    assert "fails the flagd flag-definition schema" in bad_state["msg"], bad_state["msg"]
    assert "/flags/runtime-batching/state" in bad_state["msg"], bad_state["msg"]
    unknown = feature_flag(flag="no-such-flag", enabled=False)
    assert unknown.get("failed") is True and "'no-such-flag' is not in" in unknown["msg"]
    too_much = feature_flag(flag="runtime-batching", percentage=150, rollout_variant="off")
    assert too_much.get("failed") is True and "outside 0-100" in too_much["msg"]
    assert host.file(FLAGS).sha256sum == before
