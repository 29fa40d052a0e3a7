"""dvc_sync on molecule-dvc-data against the DVC remote served over SSH by molecule-dvc-storage.

The converge synced ``data/ds`` and ``model/weights.bin`` at ``v1``. These tests run the module again with
``ansible`` (ad hoc, the scenario's inventory, the dvc_client venv as interpreter) and read the host with
testinfra. Expected md5s and commit shas come from the repository the converge made
(``$MOLECULE_EPHEMERAL_DIRECTORY/dvc-sync/expected.json``, written by files/make_repo.py), not from the module.
Each test uses its own dest or leaves the converge's dest as it found it, so ``molecule verify`` can be re-run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

DATA = "molecule-dvc-data"
REPO = "/srv/checkouts/datasets"
URL = "ssh://dvcstore@molecule-dvc-storage/srv/dvc-remote"
KEY = "/root/.ssh/dvc-storage"
WORK = os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "dvc-sync")
# Same arguments as the converge's sync of data/ds, so a re-run at v1 is a no-op.
CONVERGED = dict(dest="/srv/datasets/ds", rev="v1", owner="root", group="root", mode="0644")

SNAPSHOT = r"""
import hashlib, json, os, sys
dest = sys.argv[1]
out = {"real": None, "files": {}, "beside": [], "link": os.path.islink(dest)}
parent, name = os.path.split(dest)
if os.path.isdir(parent):
    out["beside"] = sorted(n for n in os.listdir(parent) if n.startswith("." + name + "."))
if os.path.exists(dest):
    real = out["real"] = os.path.realpath(dest)
    paths = [real] if os.path.isfile(real) else [
        os.path.join(d, f) for d, _, fs in os.walk(real) for f in fs]
    for path in paths:
        with open(path, "rb") as fobj:
            st = os.stat(path)
            out["files"][os.path.relpath(path, real) if path != real else ""] = [
                hashlib.md5(fobj.read()).hexdigest(), st.st_ino, oct(st.st_mode & 0o7777)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(WORK, "expected.json")) as fobj:
        return json.load(fobj)


def snapshot(host, dest):
    """What a reader of dest sees, resolved once: real path, {relpath: [md5, inode, mode]}, our names beside it."""
    result = host.run("python3 -c %s %s", SNAPSHOT, dest)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def md5s(snap):
    return {rel: item[0] for rel, item in snap["files"].items()}


def dvc_sync(check=False, remote_config=None, **args):
    """Run sovereign.mlops.dvc_sync on the data host; return its result (``failed`` set on failure)."""
    params = dict(repo=REPO, path="data/ds", remote="storage", jobs=4)
    params["remote_config"] = dict(dict(url=URL, keyfile=KEY, timeout=30), **(remote_config or {}))
    params.update(args)
    argv = [
        os.path.join(os.path.dirname(sys.executable), "ansible"),
        DATA,
        "-i",
        os.environ["MOLECULE_INVENTORY_FILE"],
        "-m",
        "sovereign.mlops.dvc_sync",
        "-a",
        json.dumps(params),
        "-e",
        "ansible_python_interpreter=/opt/sovereign/dvc/bin/python",
    ]
    if check:
        argv.append("--check")
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    try:  # the JSON document, then whatever other callbacks (profile_tasks) print after it
        document, _end = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{") :])
        return document["plays"][0]["tasks"][0]["hosts"][DATA]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"ansible rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")


def fresh_dest(host, dest):
    parent, name = os.path.split(dest)
    host.run("rm -rf %s %s/.%s.*", dest, parent, name)


def test_converge_synced_v1_from_the_ssh_remote(host, expected):
    ds = snapshot(host, "/srv/datasets/ds")
    assert ds["link"], "dest is the symlink to the live version"
    assert md5s(ds) == expected["v1"]["files"]
    assert {item[2] for item in ds["files"].values()} == {"0o644"}
    weights = snapshot(host, "/srv/models/weights.bin")
    assert md5s(weights) == {"": expected["v1"]["weights_md5"]}
    assert weights["files"][""][2] == "0o444"
    # No DVC cache on the data host: the checkout has none, so every byte came over SSH.
    assert not host.file(f"{REPO}/.dvc/cache/files").exists or not host.run("find %s/.dvc/cache -type f", REPO).stdout


def test_storage_serves_the_remote_as_an_unprivileged_key_only_user(expected):
    import testinfra

    storage = testinfra.get_host("podman://molecule-dvc-storage")
    remote = storage.file("/srv/dvc-remote")
    assert remote.user == "dvcstore" and remote.mode == 0o750
    assert storage.user("dvcstore").uid != 0
    effective = storage.run("sshd -T -C user=dvcstore,host=x,addr=127.0.0.1").stdout
    assert "authenticationmethods publickey" in effective
    assert "passwordauthentication no" in effective
    assert "forcecommand internal-sftp" in effective
    # The data pushed by the controller is there, v1's a.bin under DVC 3's layout (files/md5/xx/yyyy).
    md5 = expected["v1"]["files"]["a.bin"]
    assert storage.file(f"/srv/dvc-remote/files/md5/{md5[:2]}/{md5[2:]}").exists


def test_rerun_at_the_same_rev_changes_nothing_and_reports_the_data_version(host, expected):
    before = snapshot(host, CONVERGED["dest"])
    result = dvc_sync(**CONVERGED)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is False and result["bytes_transferred"] == 0
    version = result["data_version"]
    assert version["rev"] == expected["v1"]["sha"]
    assert version["md5"] == expected["v1"]["dir_md5"]
    assert version["nfiles"] == len(expected["v1"]["files"]) and version["type"] == "directory"
    assert snapshot(host, CONVERGED["dest"]) == before


def test_a_new_rev_moves_only_the_changed_and_added_files(host, expected):
    dest = "/srv/datasets/incremental"
    fresh_dest(host, dest)
    first = dvc_sync(dest=dest, rev="v1")
    assert not first.get("failed"), first.get("msg")
    assert first["bytes_transferred"] == sum(expected["v1"]["sizes"].values())
    v1 = snapshot(host, dest)

    # Check mode first: the plan and the byte count, and nothing written.
    plan = dvc_sync(dest=dest, rev="v2", check=True)
    assert not plan.get("failed"), plan.get("msg")
    assert plan["changed"] is True
    assert (plan["added"], plan["updated"], plan["removed"]) == (["sub/d.bin"], ["a.bin"], ["b.bin"])
    delta = expected["v2"]["sizes"]["a.bin"] + expected["v2"]["sizes"]["sub/d.bin"]
    assert plan["bytes_transferred"] == delta
    assert plan["data_version"]["rev"] == expected["v2"]["sha"]
    assert snapshot(host, dest) == v1, "check mode changed dest"

    result = dvc_sync(dest=dest, rev="v2")
    assert not result.get("failed"), result.get("msg")
    assert (result["added"], result["updated"], result["removed"]) == (["sub/d.bin"], ["a.bin"], ["b.bin"])
    assert result["bytes_transferred"] == delta  # 360448 of v2's 425992: the unchanged files did not move
    assert result["data_version"]["rev"] == expected["v2"]["sha"]
    assert result["data_version"]["md5"] == expected["v2"]["dir_md5"]
    v2 = snapshot(host, dest)
    assert md5s(v2) == expected["v2"]["files"]
    assert v2["real"] != v1["real"]
    for rel in ("keep.bin", "sub/c.txt"):  # hardlinked from the previous version, not downloaded again
        assert v2["files"][rel][1] == v1["files"][rel][1]

    again = dvc_sync(dest=dest, rev="v2")
    assert again["changed"] is False and again["bytes_transferred"] == 0


def test_a_single_file_moves_only_when_it_changed(host, expected):
    dest = "/srv/models/verify-weights.bin"
    fresh_dest(host, dest)
    for rev, size in (("v1", expected["v1"]["weights_size"]), ("v2", expected["v2"]["weights_size"]), ("v2", 0)):
        result = dvc_sync(path="model/weights.bin", dest=dest, rev=rev)
        assert not result.get("failed"), result.get("msg")
        assert result["bytes_transferred"] == size
        assert result["data_version"]["md5"] == expected[rev]["weights_md5"]
    assert md5s(snapshot(host, dest)) == {"": expected["v2"]["weights_md5"]}


def _storage_subnet_unused_address(host):
    """An address on the scenario network that no container has: nothing answers ARP there."""
    ip = host.run("getent hosts molecule-dvc-storage").stdout.split()[0]
    return ".".join([*ip.split(".")[:3], "250"])


FAILURES = [
    pytest.param(
        dict(remote_config=dict(url="ssh://dvcstore@molecule-dvc-storage:2222/srv/dvc-remote")),
        r"^cannot connect to remote 'storage' \(ssh://dvcstore@molecule-dvc-storage:2222/srv/dvc-remote\): "
        r"ConnectionRefusedError: .*nothing accepts connections on that host and port",
        id="wrong-port",
    ),
    pytest.param(
        dict(remote_config=dict(url="ssh://dvcstore@molecule-dvc-nowhere/srv/dvc-remote")),
        r"^cannot connect to remote 'storage' \(ssh://dvcstore@molecule-dvc-nowhere/srv/dvc-remote\): "
        r"gaierror: .*the host name does not resolve",
        id="unknown-host",
    ),
    pytest.param(
        dict(remote_config=dict(url="ssh://dvcstore@{unused}/srv/dvc-remote", timeout=10)),
        r"^cannot connect to remote 'storage' \(ssh://dvcstore@[0-9.]+/srv/dvc-remote\): "
        r"(OSError|TimeoutError|ConnectionError).*(no route to the host|did not answer in time)",
        id="unreachable-host",
    ),
    pytest.param(
        dict(remote_config=dict(keyfile="/root/.ssh/dvc-refused")),
        r"^cannot connect to remote 'storage' \(ssh://dvcstore@molecule-dvc-storage/srv/dvc-remote\): "
        r"PermissionDenied: .*the server refused the login",
        id="refused-key",
    ),
    pytest.param(
        dict(remote_config=dict(keyfile="/root/.ssh/dvc-refused"), check=True),
        r"^cannot connect to remote 'storage' .*PermissionDenied: .*the server refused the login",
        id="refused-key-check-mode",
    ),
    pytest.param(
        dict(rev="v3-unpushed"),
        r"^the listing of directory 'data/ds' \(DVC object [0-9a-f]{32}\.dir\) is neither in the DVC cache nor "
        r"on remote 'storage' \(ssh://dvcstore@molecule-dvc-storage/srv/dvc-remote\): push it with dvc push",
        id="listing-missing-on-remote",
    ),
    pytest.param(
        dict(rev="v3-unpushed", path="model/weights.bin", dest="/srv/models/weights.bin", mode="0444"),
        r"^remote 'storage' \(ssh://dvcstore@molecule-dvc-storage/srv/dvc-remote\) has no data for "
        r"'model/weights.bin' \(md5 [0-9a-f]{32}\); push it with dvc push",
        id="file-missing-on-remote",
    ),
]


@pytest.mark.parametrize(("args", "fails"), FAILURES)
def test_ssh_failures_are_clear_and_change_nothing(host, args, fails):
    args = {**CONVERGED, "rev": "v2", **args}
    config = args.get("remote_config") or {}
    if "{unused}" in config.get("url", ""):
        config["url"] = config["url"].format(unused=_storage_subnet_unused_address(host))
    before = snapshot(host, args["dest"])
    result = dvc_sync(**args)
    assert result.get("failed"), result
    assert re.search(fails, result["msg"]), result["msg"]
    assert "Traceback" not in result["msg"]
    assert snapshot(host, args["dest"]) == before
