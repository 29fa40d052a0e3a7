"""roles/release/tasks/resolve_registry.yml against a REAL `mlflow server` (sqlite, loopback): the data version
the deploy records (the version's data.rev / data.md5 tags, else its run's, else "") and the run id.

The registry is seeded over MLflow's REST API (no `import mlflow` in this process: ansible's module_utils and
mlflow's import side effects stay apart, see the Makefile's UNIT_GROUPS). The tasks run in one real
`ansible-playbook` on localhost, once per model URI, exactly as the release role's resolve.yml includes them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow_testserver import MlflowServer

ROOT = Path(__file__).resolve().parents[3]
TASKS = ROOT / "roles" / "release" / "tasks" / "resolve_registry.yml"
REV_V = "a" * 40  # on the model version
MD5_V = "aaaa0000aaaa0000aaaa0000aaaa0000.dir"
REV_R = "b" * 40  # on the run
MD5_R = "bbbb1111bbbb1111bbbb1111bbbb1111.dir"

# name -> (version tags, run tags, with a run)
VERSIONS = {
    "1": ({"data.rev": REV_V, "data.md5": MD5_V, "sha256": "ab" * 32}, {"data.rev": REV_R, "data.md5": MD5_R}, True),
    "2": ({}, {"data.rev": REV_R, "data.md5": MD5_R}, True),
    "3": ({"data.md5": MD5_V}, {"data.rev": REV_R, "data.md5": MD5_R}, True),
    # Empty tag values: MLflow's JSON leaves the "value" out of such a tag.
    "4": ({"data.rev": ""}, {"mlflow.user": "ci", "data.md5": ""}, True),
    "5": ({}, {}, False),
}

CASES = {
    # model URI: (version, data_rev, data_md5, has run_id)
    "models:/demo@tagged": ("1", REV_V, MD5_V, True),
    "models:/demo/2": ("2", REV_R, MD5_R, True),
    "models:/demo/3": ("3", REV_R, MD5_V, True),
    "models:/demo@no_dvc": ("4", "", "", True),
    "models:/demo/latest": ("5", "", "", False),
}


def _api(url, path, body):
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{path} {body}: HTTP {exc.code} {exc.read()[:500]!r}") from None


@pytest.fixture
def registry(tmp_path_factory):
    if (
        shutil.which("ansible-playbook", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
        is None
    ):
        pytest.skip("ansible-playbook is not installed")
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed")
    server = MlflowServer.launch(tmp_path_factory.mktemp("mlflow"))
    url = server.url
    try:
        server.wait_ready()
        experiment = _api(url, "experiments/create", {"name": "lineage"})["experiment_id"]
        _api(url, "registered-models/create", {"name": "demo"})
        runs = {}
        for version, (version_tags, run_tags, with_run) in VERSIONS.items():
            body = {"name": "demo", "source": f"s3://models/demo/{version}"}  # no run: a source outside any run
            if with_run:
                run = _api(url, "runs/create", {"experiment_id": experiment})["run"]["info"]
                runs[version] = run["run_id"]
                body.update(run_id=run["run_id"], source=f"{run['artifact_uri']}/model")
                for key, value in run_tags.items():
                    _api(url, "runs/set-tag", {"run_id": run["run_id"], "key": key, "value": value})
            made = _api(url, "model-versions/create", body)["model_version"]["version"]
            assert made == version
            for key, value in version_tags.items():
                _api(url, "model-versions/set-tag", {"name": "demo", "version": version, "key": key, "value": value})
        _api(url, "registered-models/alias", {"name": "demo", "alias": "tagged", "version": "1"})
        _api(url, "registered-models/alias", {"name": "demo", "alias": "no_dvc", "version": "4"})
        yield url, runs
    finally:
        server.kill()


@pytest.fixture
def resolved(registry, tmp_path_factory):
    """{model URI: _release_resolved} from one ansible-playbook run including the task file once per URI."""
    url, runs = registry
    work = tmp_path_factory.mktemp("play")
    out = work / "resolved"
    out.mkdir()
    # After each include, the facts it set are written out: the write is appended to a copy of the task file
    # (a task after the looped include would run only once, after all of them).
    tasks_copy = work / "resolve_and_write.yml"
    tasks_copy.write_text(
        TASKS.read_text()
        + "\n- name: Write the result\n  ansible.builtin.copy:\n"
        + f"    dest: \"{out}/{{{{ _release_model_req | replace('/', '_') }}}}.json\"\n"
        + '    content: "{{ _release_resolved | to_json }}"\n    mode: "0644"\n'
    )
    play = [
        {
            "name": "Resolve registry models as the release role does",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {
                "deploy_tracking_uri": url + "/",
                "deploy_tracking_headers": {},
                "deploy_tracking_timeout_s": 10,
                "deploy_model_name": "",
                "_release_live_model": {},
            },
            "tasks": [
                {
                    "name": "Resolve",
                    "ansible.builtin.include_tasks": {"file": str(tasks_copy)},
                    "vars": {"_release_model_req": "{{ _uri }}"},
                    "loop": list(CASES),
                    "loop_control": {"loop_var": "_uri"},
                }
            ],
        }
    ]
    (work / "play.yml").write_text(json.dumps(play))
    # The controller's own Python runs the modules (delegate_to: localhost), without this pytest's PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    env.update(ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_LOCALHOST_WARNING="false")
    env["ANSIBLE_PYTHON_INTERPRETER"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["ANSIBLE_LOCAL_TEMP"] = str(work / "tmp")
    proc = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", str(work / "play.yml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return {uri: json.loads((out / (uri.replace("/", "_") + ".json")).read_text()) for uri in CASES}, runs


def test_data_version_of_registry_models(resolved):
    """One test over the whole table: one server and one ansible-playbook, on whichever xdist worker runs it."""
    results, runs = resolved
    wrong = {}
    for uri, (version, data_rev, data_md5, has_run) in CASES.items():
        got = results[uri]
        want = dict(
            uri=f"models:/demo/{version}",
            version=version,
            data_rev=data_rev,
            data_md5=data_md5,
            run_id=runs[version] if has_run else "",
        )
        if {k: got.get(k) for k in want} != want:
            wrong[uri] = dict(got={k: got.get(k) for k in want}, want=want)
    assert not wrong, json.dumps(wrong, indent=1)
