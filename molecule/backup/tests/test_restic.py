"""restic part of the backup scenario: real zfs-fuse, PostgreSQL 15, restic 0.14, the real MLflow server
(roles/mlflow) and an SFTP repository host.

molecule-backup-data backs up over SFTP into molecule-backup-repo. The jobs run as their timers run them (the
sovereign-job argv the role publishes in the host contract); the playbooks run as real ansible-playbook processes
against molecule's inventory. Faults are real: restic is SIGKILLed, a pack file on the repository host is
overwritten, sshd on the repository host is stopped, a wrong password is given, MLflow's artifacts are deleted and
its database dropped. The model versions are registered, listed and downloaded with MLflow's own Python client
(the controller's .venv pins the server's version) against the server at the URL of its host contract.
TEST ADAPTATION: zfs-fuse stands in for OpenZFS's kernel module (ARCHITECTURE §10).
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import uuid

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import pytest
import requests
import testinfra
from mlflow import MlflowClient

PROJECT = pathlib.Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", pathlib.Path(__file__).resolve().parents[3]))
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
FACT = "/etc/ansible/facts.d/sovereign.fact"
TEXTFILE = "/var/lib/prometheus/node-exporter"
# The containers of molecule.yml: the verifier's host (the data host) and the repository host beside it.
DATA = os.environ.get("TESTINFRA_DATA_HOST", "molecule-backup-data")
REPO = DATA.removesuffix("-data") + "-repo"
CLIENT = f"restic-{DATA}"
REPO_DIR = f"/srv/restic/{CLIENT}/repo"
ARTIFACTS = "/var/lib/sovereign/mlflow/artifacts"
TOOL = "/usr/local/libexec/sovereign/sovereign-restic"
ARTIFACTS_DATASET = "tank/sovereign/mlflow_artifacts"


class AddOffset(mlflow.pyfunc.PythonModel):
    """A tiny real model: adds the first byte of its `weights` artifact to every input value."""

    def load_context(self, context):
        self.offset = pathlib.Path(context.artifacts["weights"]).read_bytes()[0]

    def predict(self, context, model_input, params=None):
        return [float(x) + self.offset for x in model_input["x"]]


@pytest.fixture(scope="module")
def repo():
    return testinfra.get_host(f"podman://{REPO}")


def model_files(name, version, dst):
    """sha256 of every file of model version `version` as MLflow serves it (models:/ URI, through the server)."""
    uri = f"models:/{name}/{version}"
    local = pathlib.Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    files = sorted(p for p in local.rglob("*") if p.is_file())
    return {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def registry(host, tmp_path_factory):
    """Two versions of a model `churn-TAG` registered in the real MLflow server through MLflow's own client, each
    with its own random weights: the data every backup below holds and the disaster must bring back.

    Returns the client, the server's URL, the model's name, and per version: the sha256 of every file it downloads
    as, its weights (the file's path in the download, its sha256 as written here, its first byte: the model's
    offset) and where the server stored that file on the data host.
    """
    # Where the host contract says MLflow is: its internal address on the scenario's network, reachable from here.
    url = json.loads(host.file(FACT).content_string)["mlflow"]["url"]
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    src = tmp_path_factory.mktemp("weights")
    tag = uuid.uuid4().hex[:8]
    name = f"churn-{tag}"
    experiment_id = client.create_experiment(f"backup-disaster-{tag}")
    weights = {}
    for size in (1_500_000, 700_000):
        path = src / f"weights-{tag}-{size}.bin"
        path.write_bytes(os.urandom(size))
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AddOffset(),
                artifacts={"weights": str(path)},
                # No requirement inference (it spawns a subprocess); the model needs nothing else.
                pip_requirements=[f"mlflow=={mlflow.__version__}"],
                registered_model_name=name,
            )
        weights[str(info.registered_model_version)] = path
    versions = {}
    for version, path in weights.items():
        # Proxied artifacts (--serve-artifacts): clients see mlflow-artifacts:/ URIs only.
        uri = client.get_model_version_download_uri(name, version)
        assert uri.startswith("mlflow-artifacts:/"), uri
        files = model_files(name, version, tmp_path_factory.mktemp(f"v{version}"))
        data = path.read_bytes()
        versions[version] = {
            "files": files,
            "weights": next(k for k in files if pathlib.PurePath(k).name == path.name),
            "sha256": hashlib.sha256(data).hexdigest(),
            "offset": data[0],
            "disk": host.check_output(f"find {ARTIFACTS} -type f -name {path.name}"),
        }
    return {"client": client, "url": url, "name": name, "versions": versions}


def listed_versions(registry):
    found = registry["client"].search_model_versions(f"name='{registry['name']}'")
    return sorted((str(mv.version) for mv in found), key=int)


def play(name, extra=None, timeout=600):
    """Run a playbook of the collection against molecule's inventory; returns (rc, output collapsed)."""
    assert INVENTORY, "MOLECULE_INVENTORY_FILE is not set (run through molecule verify)"
    cmd = [ANSIBLE_PLAYBOOK, "-i", INVENTORY, str(PROJECT / "playbooks" / name), "-l", DATA]
    if extra:
        cmd += ["-e", json.dumps(extra)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    print(f"--- {name} {extra or ''} -> rc {proc.returncode} in {time.monotonic() - start:.1f}s\n{out[-5000:]}")
    return proc.returncode, " ".join(out.replace("\\n", " ").split())


def job(host, name):
    """Run a job exactly as its timer does (sovereign-job argv from the host contract)."""
    argv = json.loads(host.file(FACT).content_string)["restic_backup"]["jobs"][name]["argv"]
    start = time.monotonic()
    res = host.run(" ".join(argv))
    print(f"--- {name} rc {res.rc} in {time.monotonic() - start:.1f}s\n{res.stdout}\n{res.stderr}")
    return res, time.monotonic() - start


def unit_run(host, name):
    """Run a job through its systemd unit, as the timer starts it (the unit's own namespaces and hardening)."""
    unit = json.loads(host.file(FACT).content_string)["restic_backup"]["jobs"][name]["unit"]
    start = time.monotonic()
    res = host.run(f"systemctl start {unit}")
    journal = host.run(f"journalctl -u {unit} -n 40 --no-pager -o cat").stdout
    print(f"--- {unit} rc {res.rc} in {time.monotonic() - start:.1f}s\n{res.stderr}\n{journal}")
    return res, journal


def metrics(host, name):
    """The samples of textfile sovereign_<name>.prom as {'metric{labels}': value}."""
    out = {}
    for line in host.file(f"{TEXTFILE}/sovereign_{name}.prom").content_string.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def sample(found, prefix):
    return [v for k, v in found.items() if k.startswith(prefix)]


def tree_digest(host, path):
    return host.check_output(
        f"cd {path} && find . -type f -print0 | sort -z | xargs -0 sha256sum; "
        "find . -type l -printf '%p -> %l\\n' | sort"
    )


def row_counts(host, db):
    return host.check_output(
        f"runuser -u postgres -- psql -X -A -t -d {db} -c "
        "\"SELECT 'models', count(*) FROM registered_models UNION ALL SELECT 'versions', count(*) FROM model_versions\""
    )


def test_repository_user_is_sftp_only_in_its_chroot(repo):
    user = repo.user(CLIENT)
    assert user.shell == "/usr/sbin/nologin"
    assert "sovereign-restic" in user.groups
    cfg = repo.check_output(f"sshd -T -C user={CLIENT},host=x,addr=127.0.0.1").lower()
    assert "chrootdirectory /srv/restic/%u" in cfg
    assert "forcecommand internal-sftp -d /repo" in cfg
    assert "authenticationmethods publickey" in cfg
    assert "passwordauthentication no" in cfg
    assert "allowtcpforwarding no" in cfg and "permittty no" in cfg
    chroot = repo.file(f"/srv/restic/{CLIENT}")
    assert (chroot.user, chroot.mode) == ("root", 0o755)
    assert repo.file(REPO_DIR).user == CLIENT
    assert repo.file(f"{REPO_DIR}/config").exists, "restic init ran through the SFTP user"
    assert repo.file(f"/etc/ssh/sovereign-restic/{CLIENT}").content_string.startswith("restrict ssh-ed25519 ")


def test_secrets_are_root_only(host):
    for path in (
        "/etc/sovereign/restic/password",
        "/etc/sovereign/restic/config.json",
        "/etc/sovereign/restic/id_ed25519",
    ):
        f = host.file(path)
        assert (f.user, f.mode) == ("root", 0o600), path


def test_timers_are_persistent_with_a_randomized_delay(host):
    for name in ("backup", "check", "drill"):
        unit = f"sovereign-restic-{name}.timer"
        assert host.service(unit).is_enabled
        show = host.check_output(f"systemctl show {unit} -p Persistent -p RandomizedDelayUSec")
        assert "Persistent=yes" in show and "RandomizedDelayUSec=30min" in show, show


def test_mlflow_stores_the_registered_versions_on_its_datasets(host, registry):
    """The real server wrote every version's files into the mlflow_artifacts dataset (the host's view of its
    mountpoint, not a directory hidden under it) and its rows into the database on the postgresql dataset."""
    assert host.check_output(f"findmnt -n -o SOURCE --mountpoint {ARTIFACTS}") == ARTIFACTS_DATASET
    for version in registry["versions"].values():
        assert version["files"][version["weights"]] == version["sha256"], "the weights download as they were logged"
        assert version["disk"].startswith(f"{ARTIFACTS}/") and "\n" not in version["disk"], version["disk"]
        f = host.file(version["disk"])
        assert f.user == "mlflow" and f.sha256sum == version["sha256"]
    assert listed_versions(registry) == sorted(registry["versions"], key=int)


def test_backup_playbook_stores_from_a_zfs_snapshot_and_reports(host, registry):
    rc, out = play("backup.yml")
    assert rc == 0, out
    assert "took ZFS snapshot @restic-" in out and "stored snapshot" in out and "dumped database mlflow" in out
    found = metrics(host, "restic_backup")
    assert found['sovereign_job_success{job="restic_backup"}'] == 1
    assert sample(found, "sovereign_restic_backup_files{")[0] > 0
    assert sample(found, "sovereign_restic_snapshots{")[0] >= 1
    assert sample(found, "sovereign_restic_backup_bytes_added{")
    # The clone is gone (and counted as gone), the ZFS snapshot it came from is kept for the drill.
    assert "sovereign-restic-backup-" not in host.check_output("zfs list -H -o name")
    assert sample(found, "sovereign_restic_clone_left{") and set(sample(found, "sovereign_restic_clone_left{")) == {0}
    assert "@restic-" in host.check_output("zfs list -H -o name -t snapshot")


def test_drill_playbook_passes_and_writes_metrics(host):
    rc, out = play("restore_drill.yml")
    assert rc == 0, out
    assert "PASSED, every byte and every row count matches" in out
    found = metrics(host, "restic_drill")
    assert found['sovereign_job_success{job="restic_drill"}'] == 1
    assert sample(found, "sovereign_restic_drill_files_compared{")[0] > 0
    assert sample(found, "sovereign_restic_drill_tables_compared{")[0] >= 3
    assert not host.file("/var/lib/sovereign/restic/drill").exists, "the scratch restore is removed"
    assert "sovereign_drill_" not in host.check_output("runuser -u postgres -- psql -X -A -t -l")


def test_wrong_password_is_a_clear_error_and_initialises_nothing(host, repo):
    before = repo.check_output(f"ls -l --time-style=+%s {REPO_DIR}/keys {REPO_DIR}/config")
    host.run_expect(
        [0],
        "sed 's#/etc/sovereign/restic/password#/root/wrong-password#' /etc/sovereign/restic/config.json"
        " > /root/wrong.json",
    )
    host.run_expect([0], "printf 'not-the-password-at-all' > /root/wrong-password")
    res = host.run(f"{TOOL} --config /root/wrong.json init")
    assert res.rc == 1
    assert "exists but the password does not open it" in res.stderr and "Nothing was initialised" in res.stderr
    assert repo.check_output(f"ls -l --time-style=+%s {REPO_DIR}/keys {REPO_DIR}/config") == before
    host.run("rm -f /root/wrong.json /root/wrong-password")


def test_repository_host_unreachable_fails_bounded_naming_host_and_port(host, repo):
    snaps_before = host.check_output("zfs list -H -o name -t snapshot")
    repo.run_expect([0], "systemctl stop ssh.service ssh.socket")
    try:
        res, seconds = job(host, "restic_backup")
    finally:
        repo.run_expect([0], "systemctl start ssh.service")
    assert res.rc == 1
    assert f"cannot reach the repository offsite at {REPO}:22" in res.stderr
    assert seconds < 30
    found = metrics(host, "restic_backup")
    assert found['sovereign_job_success{job="restic_backup"}'] == 0
    assert found[f'sovereign_restic_repository_reachable{{address="{REPO}:22",repository="offsite"}}'] == 0
    assert host.check_output("zfs list -H -o name -t snapshot") == snaps_before, "nothing local was touched"


def test_sigkill_mid_backup_then_next_run_names_the_stale_lock(host, repo):
    host.run_expect([0], "head -c 20000000 /dev/urandom > /var/lib/sovereign/dvc/cache/big.bin")
    host.run_expect([0], "systemctl start --no-block sovereign-restic-backup.service")
    # restic backup is frozen (SIGSTOP) as soon as it starts and let run in 0.2 s steps until its lock is in the
    # repository, then SIGKILLed: mid-backup with its lock held, however loaded the machine is.
    pid = host.check_output(
        'timeout 300 bash -c \'until p=$(pgrep -f "^restic -r .* backup"); do sleep 0.05; done;'
        " kill -STOP ${p%%[[:space:]]*}; echo ${p%%[[:space:]]*}'"
    )
    assert pid.isdigit(), "restic backup never started"
    for _attempt in range(300):
        if repo.run(f"ls {REPO_DIR}/locks | grep -q .").rc == 0:
            break
        host.run_expect([0], f"kill -CONT {pid}; sleep 0.2; kill -STOP {pid}")
    host.run_expect([0], f"kill -KILL {pid}")
    # A oneshot unit is "activating" while it runs (is_running would be False at once): wait for the killed run's
    # clean-up (clones dropped, ZFS snapshots pruned) to end, so the next run does not meet its sovereign-job lock.
    for _attempt in range(240):
        state = host.check_output("systemctl show -p ActiveState --value sovereign-restic-backup.service")
        if state in ("failed", "inactive"):
            break
        time.sleep(0.5)
    assert state == "failed", f"the killed run's unit is {state}"
    assert repo.run(f"ls {REPO_DIR}/locks | grep -q .").rc == 0, "the killed restic left its lock behind"
    host.run_expect([0], "rm -f /var/lib/sovereign/dvc/cache/big.bin")
    res = job(host, "restic_backup")[0]
    assert res.rc == 0, res.stderr
    assert "removing stale restic lock" in res.stdout
    assert f"by pid {pid} on backup-data): pid {pid} on backup-data is gone" in res.stdout
    found = metrics(host, "restic_backup")
    assert found['sovereign_job_success{job="restic_backup"}'] == 1
    assert sample(found, "sovereign_restic_stale_locks_removed{")[0] == 1


def test_corrupted_pack_fails_the_check_and_the_drill(host, repo):
    before = set(repo.check_output(f"find {REPO_DIR}/data -type f").split())
    host.run_expect([0], f"head -c 6000000 /dev/urandom > {ARTIFACTS}/marker.bin")
    res = job(host, "restic_backup")[0]
    assert res.rc == 0, res.stderr
    new = set(repo.check_output(f"find {REPO_DIR}/data -type f").split()) - before
    # The pack that holds marker.bin's data (restic find --pack names the files a pack's blobs belong to), so the
    # drill of the newest snapshot must read it.
    listings = (
        (p, host.check_output(f"{TOOL} restic offsite find --pack {os.path.basename(p)}"))
        for p in sorted(new, key=lambda p: -int(repo.check_output(f"stat -c %s {p}")))
    )
    pack, listing = next((p, text) for p, text in listings if "marker.bin" in text)
    pack_id = os.path.basename(pack)
    # The files with blobs in that pack (marker.bin, and any other whose blob restic stored there): the drill must
    # name the one the damaged bytes belong to.
    # The dumps and manifest.json from the staging directory share packs with small files too (a run found the
    # damaged bytes in manifest.json's blob, and the drill named it).
    in_pack = set(re.findall(r"/var/lib/sovereign/restic/mnt/[^/\s]+/(\S+)", listing)) or {"marker.bin"}
    in_pack |= set(re.findall(r"(/var/backups/sovereign/restic/[\w./-]+)", listing))
    repo.run_expect(
        [0],
        f"cp -p {pack} /root/pack.orig && chmod u+w {pack} && "
        f"printf 'CORRUPT' | dd of={pack} bs=1 seek=200 conv=notrunc status=none",
    )
    try:
        results = [job(host, "restic_check")[0], job(host, "restic_check")[0]]
        failed = [r for r in results if r.rc != 0]
        assert len(failed) == 1, "exactly one of the two subsets holds the damaged pack"
        assert "check of data subset" in failed[0].stderr and "FAILED" in failed[0].stderr
        assert pack_id[:8] in failed[0].stderr, failed[0].stderr
        assert "sovereign_restic_check_success" in host.file(f"{TEXTFILE}/sovereign_restic_check.prom").content_string
        rc, out = play("restore_drill.yml")
        assert rc != 0
        assert "FAILED" in out and any(rel in out for rel in in_pack), (in_pack, out)
        assert sample(metrics(host, "restic_drill"), "sovereign_restic_drill_success{")[0] == 0
    finally:
        repo.run_expect([0], f"cp -p /root/pack.orig {pack} && rm -f /root/pack.orig")
        host.run(f"rm -f {ARTIFACTS}/marker.bin")
    assert job(host, "restic_check")[0].rc == 0


def test_mlflow_disaster_offsite_restore_brings_it_back_bit_identical(host, registry, tmp_path):
    name, versions = registry["name"], registry["versions"]
    # The backup restored below runs through its unit, as the timer runs it: the bit-identical restore proves the
    # unit read the clones' data (a unit whose mount namespace hid zfs-fuse's clone would back up empty
    # directories; ADR 1130).
    res, journal = unit_run(host, "restic_backup")
    assert res.rc == 0, journal
    assert "stored snapshot" in journal
    assert "sovereign-restic-backup-" not in host.check_output("zfs list -H -o name")
    artifacts, rows = tree_digest(host, ARTIFACTS), row_counts(host, "mlflow")
    assert listed_versions(registry) == sorted(versions, key=int)
    # The disaster: every artifact deleted (the dataset's mountpoint stays, emptied) and the database dropped while
    # MLflow runs.
    host.run_expect([0], f"find {ARTIFACTS} -mindepth 1 -delete")
    host.run_expect([0], "runuser -u postgres -- dropdb --force mlflow")
    assert host.check_output(f"find {ARTIFACTS} -mindepth 1 | wc -l") == "0"
    lost = requests.get(f"{registry['url']}/api/2.0/mlflow/registered-models/get", params={"name": name}, timeout=60)
    assert lost.status_code != 200, "MLflow still knows the model after its database was dropped"
    # restore.yml's own definition of the mlflow service (units, artifacts path, databases, health URL).
    rc, out = play("restore.yml", {"service": "mlflow", "source": "offsite"})
    assert rc != 0 and "restore.yml changed nothing" in out
    assert "stop mlflow.service" in out
    assert f"replace everything in {ARTIFACTS}" in out and "drop database mlflow" in out and "confirm=mlflow" in out
    rc, out = play("restore.yml", {"service": "mlflow", "source": "offsite", "confirm": "mlflow"})
    assert rc == 0, out
    assert tree_digest(host, ARTIFACTS) == artifacts
    assert row_counts(host, "mlflow") == rows
    # Through MLflow's API: the versions are listed again, each downloads bit-identical, and the model runs.
    assert listed_versions(registry) == sorted(versions, key=int)
    for version, expected in versions.items():
        assert model_files(name, version, tmp_path / version) == expected["files"], version
    first = min(versions, key=int)
    offset = versions[first]["offset"]
    model = mlflow.pyfunc.load_model(f"models:/{name}/{first}")
    assert model.predict({"x": [1.0, 2.0]}) == [1.0 + offset, 2.0 + offset]


def test_snapshot_restore_rolls_a_deleted_file_back(host, registry, tmp_path):
    version = min(registry["versions"], key=int)
    expected = registry["versions"][version]
    weights = expected["disk"]
    # The ZFS snapshot of the newest backup, named: a sanoid snapshot taken while the file is gone must not be the
    # one rolled back to (its timer runs every 15 minutes).
    snap = host.check_output(
        f"zfs list -H -o name -t snapshot -s creation -r {ARTIFACTS_DATASET} | grep '@restic-' | tail -n 1"
    ).split("@", 1)[1]
    host.run_expect([0], f"rm -f {weights}")
    rc, out = play("restore.yml", {"service": "mlflow", "source": "snapshot", "snapshot": snap, "confirm": "mlflow"})
    assert rc == 0, out
    assert f"{ARTIFACTS_DATASET}@{snap}" in out
    assert host.file(weights).sha256sum == expected["sha256"]
    assert model_files(registry["name"], version, tmp_path) == expected["files"]
