"""Verifies the monitoring group end to end on two systemd containers (molecule/monitoring/molecule.yml): real
Prometheus and Alertmanager (Debian's packages) and node_exporter on the ops host; a real sovereign-runtime (CPU,
a real TorchScript model, both colors; no GPU here) behind HAProxy on the inference host. Every check talks to
the real services over their internal addresses; the only test double is the webhook receiver, a 40-line
stdlib server that records what Alertmanager POSTs (playbooks/files/lab_alert_receiver.py)."""

from __future__ import annotations

import calendar
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import testinfra

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import host_contract

PROJECT = pathlib.Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", pathlib.Path(__file__).resolve().parents[3]))
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
OPS = "molecule-monitoring-ops"
INFER = "molecule-monitoring-infer"
RECEIVED = "/var/lib/molecule-alert-receiver/alerts.jsonl"
ALERT = "MoleculeInferenceRuntimeDown"
LOADGEN = "/usr/local/lib/sovereign-loadgen.py"
# Every job the two hosts' contracts publish, and how many targets each has.
JOBS = {"node_exporter": 2, "sovereign_runtime": 2, "haproxy": 1, "prometheus": 1, "alertmanager": 1}


@pytest.fixture(scope="module")
def infer():
    return testinfra.get_host(f"podman://{INFER}")


def prom_url(host):
    return host_contract.read_contract(host)["prometheus"]["url"]


def api(host, path):
    out = host.check_output(f"curl -sS --fail-with-body --max-time 10 '{prom_url(host)}{path}'")
    body = json.loads(out)
    assert body["status"] == "success", body
    return body["data"]


def targets(host):
    return api(host, "/api/v1/targets?state=active")["activeTargets"]


def wait_until(what, check, timeout=120, every=1.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)


def all_up(host, since=0.0, jobs=None):
    """Every expected target (JOBS, or JOBS) up, each scraped after SINCE (epoch seconds)."""
    got = targets(host)
    by_job = {}
    for t in got:
        by_job.setdefault(t["labels"]["job"], []).append(t)
    if {j: len(ts) for j, ts in by_job.items()} != (jobs or JOBS):
        return False
    for t in got:
        scraped = t["lastScrape"][:19]
        if t["health"] != "up" or calendar.timegm(time.strptime(scraped, "%Y-%m-%dT%H:%M:%S")) < since:
            return False
    return got


def test_services_run_hardened_on_the_internal_address(host):
    internal = host_contract.read_contract(host)["common"]["internal_address"]
    for unit, port in (("prometheus", 9090), ("prometheus-alertmanager", 9093)):
        svc = host.service(unit)
        assert svc.is_running and svc.is_enabled, unit
        props = svc.systemd_properties
        assert props["User"] == "prometheus"
        assert props["ProtectSystem"] == "strict"
        assert props["NoNewPrivileges"] == "yes"
        assert host.socket(f"tcp://{internal}:{port}").is_listening, unit
        assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening, unit
        assert not host.socket(f"tcp://:::{port}").is_listening, unit
    # Alertmanager's gossip cluster is off.
    assert "9094" not in host.check_output("ss -Htln")


def test_every_target_is_up_with_host_and_color_labels(host, infer):
    got = wait_until("every target up", lambda: all_up(host), timeout=60)
    infer_address = host_contract.read_contract(infer)["common"]["internal_address"]
    runtimes = {t["labels"]["color"]: t for t in got if t["labels"]["job"] == "sovereign_runtime"}
    assert sorted(runtimes) == ["blue", "green"]
    for t in runtimes.values():
        assert t["labels"]["host"] == INFER
        assert t["scrapeUrl"].startswith(f"http://{infer_address}:"), t["scrapeUrl"]
    assert {t["labels"]["host"] for t in got if t["labels"]["job"] == "node_exporter"} == {OPS, INFER}
    print("targets:", sorted((t["labels"]["job"], t["scrapeUrl"]) for t in got))


def test_target_files_one_per_job(host):
    names = host.check_output("ls /etc/prometheus/file_sd").split()
    assert sorted(names) == sorted([f"{job}.json" for job in JOBS] + ["_alertmanagers.json"])
    config = host.file("/etc/prometheus/prometheus.yml")
    assert (config.user, config.group, config.mode) == ("root", "prometheus", 0o640)


def test_rules_loaded(host):
    groups = api(host, "/api/v1/rules")["groups"]
    names = {r["name"] for g in groups for r in g["rules"]}
    assert ALERT in names
    shipped = sorted(PROJECT.glob("roles/*/files/monitoring/alerts.yml"))
    installed = host.check_output("ls /etc/prometheus/rules.d").split()
    assert "MoleculeSiteRule" in names
    assert sorted(installed) == sorted(
        [f"{p.parents[2].name}.yml" for p in shipped] + ["site-alert-rules.yml", "extra-molecule_alerts.yml"]
    )


def test_prometheus_sends_to_the_alertmanager(host):
    active = api(host, "/api/v1/alertmanagers")["activeAlertmanagers"]
    am = host_contract.read_contract(host)["alertmanager"]
    assert [a["url"] for a in active] == [f"{am['url']}/api/v2/alerts"]


@pytest.mark.parametrize("path", ["/metrics", "//metrics", "/Metrics", "/%6Detrics/x"])
def test_frontend_refuses_metrics(host, infer, path):
    """The public :8000 frontend never serves /metrics, from the host itself or from another host."""
    frontend = host_contract.read_contract(infer)["traffic_switch"]["frontend"]
    infer_address = host_contract.read_contract(infer)["common"]["internal_address"]
    local = infer.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' '{frontend['url']}{path}'")
    remote = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' 'http://{infer_address}:{frontend['port']}{path}'"
    )
    assert (local, remote) == ("403", "403")
    # ... while inference through it still answers.
    assert infer.run(f"curl -sf {frontend['url']}/v2/health/ready").rc == 0


def test_prometheus_restart_under_load_loses_no_request_and_scrape_resumes(host, infer):
    infer.check_output("rm -f /tmp/mon-load.stop /tmp/mon-load.json; systemctl reset-failed sovereign-mon-load || true")
    infer.check_output(
        f"systemd-run --unit sovereign-mon-load --collect /usr/bin/python3 {LOADGEN} http://127.0.0.1:8000 demo 4 "
        "200 400000 120 /tmp/mon-load.stop /tmp/mon-load.json"
    )
    time.sleep(2)
    restarted = time.time()
    host.check_output("systemctl restart prometheus")
    ready = f"curl -sf --max-time 5 '{prom_url(host)}/-/ready'"
    wait_until("Prometheus ready after the restart", lambda: host.run(ready).rc == 0, timeout=90)
    wait_until("scrapes after the restart", lambda: all_up(host, since=restarted + 1), timeout=90)
    infer.check_output("touch /tmp/mon-load.stop")
    wait_until("the load report", lambda: infer.file("/tmp/mon-load.json").exists, timeout=150, every=2)
    report = json.loads(infer.file("/tmp/mon-load.json").content_string)
    print("load:", {k: report[k] for k in ("requests", "failures")})
    assert report["requests"] >= 200
    assert report["failures"] == 0, report


def received(host):
    f = host.file(RECEIVED)
    return [json.loads(line) for line in f.content_string.splitlines() if line.strip()] if f.exists else []


def notifications(host, status):
    return [
        a
        for n in received(host)
        for a in n["alerts"]
        if a["labels"].get("alertname") == ALERT and a["labels"].get("color") == "green" and a["status"] == status
    ]


def green_alerts(host):
    return {
        a["labels"]["alertname"]
        for a in api(host, "/api/v1/alerts")["alerts"]
        if a["labels"].get("color") == "green" and a["state"] in ("pending", "firing")
    }


def test_stopped_runtime_alerts_then_resolves(host, infer):
    """Stop the idle color (it has a model: a deployed standby): the alert reaches the webhook receiver through
    Alertmanager; start it: resolved."""
    before = len(received(host))
    infer.check_output("systemctl stop sovereign-runtime@green")
    try:
        fired = wait_until("the firing notification", lambda: notifications(host, "firing"), timeout=90)
        assert fired[0]["labels"]["host"] == INFER
        assert fired[0]["annotations"]["summary"] == f"green runtime on {INFER} is down"
        # The collection's own rules see it too (pending: their `for` is minutes). A color with a model that stops
        # is a down target like any other (docs/adr/1531): SovereignTargetDown too, which Alertmanager inhibits
        # where InferenceRuntimeDown fires for the same target.
        wanted = {"InferenceRuntimeDown", "SovereignTargetDown"}
        wait_until("the collection's alerts pending", lambda: wanted <= green_alerts(host), timeout=60)
    finally:
        infer.check_output("systemctl start sovereign-runtime@green")
    wait_until("the resolved notification", lambda: notifications(host, "resolved"), timeout=120)
    assert len(received(host)) > before
    wait_until("every target up again", lambda: all_up(host), timeout=60)


# What a deploy does for the metrics of the color it gives a model (roles/release/tasks/host.yml, playbooks/deploy.yml):
# the runtime publishes the endpoints of the colors that have a model, the monitoring host rewrites its targets.
PUBLISH = """
- name: Publish the metrics endpoints of the colors that have a model
  hosts: inference
  gather_facts: false
  tasks:
    - ansible.builtin.setup: {gather_subset: ["!all", "!min", local], filter: ansible_local}
    - ansible.builtin.include_role: {name: sovereign.mlops.inference_runtime, tasks_from: metrics}
- name: Rewrite the scrape targets
  hosts: monitoring
  gather_facts: true
  tasks:
    - ansible.builtin.include_role: {name: sovereign.mlops.prometheus, tasks_from: targets}
"""


def publish(tmp_path):
    playbook = tmp_path / "publish.yml"
    playbook.write_text(PUBLISH)
    proc = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", INVENTORY, str(playbook)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def runtime_series(host):
    got = api(host, "/api/v1/query?query=up%7Bjob%3D%22sovereign_runtime%22%7D")["result"]
    return sorted(r["metric"]["color"] for r in got)


def test_a_color_is_a_target_once_it_has_a_model(host, infer, tmp_path):
    """docs/adr/1531: green without a model (a fresh host whose green was never deployed) is no target, so its
    stopped runtime is no alert; green given its model back (a deploy) is a target again, and up."""
    assert INVENTORY, "MOLECULE_INVENTORY_FILE is not set (run through molecule verify)"
    model_env = host_contract.read_contract(infer)["runtime"]["colors"]["green"]["model_env"]
    aside = "/root/molecule-green.model.env"
    infer.check_output(f"mv {model_env} {aside}")
    try:
        publish(tmp_path)
        assert "sovereign_runtime_green" not in host_contract.read_contract(infer)["metrics"]
        only_blue = {**JOBS, "sovereign_runtime": 1}
        wait_until("green gone from the targets, the rest up", lambda: all_up(host, jobs=only_blue), timeout=60)
        # Not scraped, so no series for any rule to alert on, stopped or not.
        infer.check_output("systemctl stop sovereign-runtime@green")
        wait_until("no up series of green", lambda: runtime_series(host) == ["blue"], timeout=60)
        assert not green_alerts(host)
    finally:
        infer.check_output(f"mv {aside} {model_env}; systemctl start sovereign-runtime@green")
    publish(tmp_path)
    assert host_contract.read_contract(infer)["metrics"]["sovereign_runtime_green"]["labels"] == {"color": "green"}
    wait_until("green a target again, every target up", lambda: all_up(host), timeout=90)


BAD_INPUT = """
- name: Bad input changes nothing
  hosts: monitoring
  gather_facts: true
  tasks:
    - name: What the configuration is before
      ansible.builtin.command: sha256sum /etc/prometheus/prometheus.yml /etc/prometheus/alertmanager.yml
      register: before
      changed_when: false
    - name: Unknown scrape group
      block:
        - ansible.builtin.include_role: {name: sovereign.mlops.prometheus}
          vars: {prometheus_scrape_groups: [all, no_such_group]}
      rescue:
        - ansible.builtin.set_fact: {r_group: "{{ ansible_failed_result.msg }}"}
    - name: A rule that does not parse
      block:
        - ansible.builtin.include_role: {name: sovereign.mlops.prometheus}
          vars:
            prometheus_alert_rules:
              - {alert: BrokenRuleOfTheSite, expr: "up{job= == 0", for: 1m}
      rescue:
        - ansible.builtin.set_fact: {r_rule: "{{ ansible_failed_result | to_json }}"}
    - name: A bad receiver URL
      block:
        - ansible.builtin.include_role: {name: sovereign.mlops.alertmanager}
          vars:
            alertmanager_receivers:
              - {name: broken-hook, webhook_configs: [{url: "htp:/nowhere secret-token"}]}
            alertmanager_route: {receiver: broken-hook}
      rescue:
        - ansible.builtin.set_fact: {r_url: "{{ ansible_failed_result | to_json }}"}
    - name: What the configuration is after
      ansible.builtin.command: sha256sum /etc/prometheus/prometheus.yml /etc/prometheus/alertmanager.yml
      register: after
      changed_when: false
    - name: Report
      ansible.builtin.copy:
        content: "{{ {'group': r_group | default(''), 'rule': r_rule | default(''), 'url': r_url | default(''),
                      'unchanged': before.stdout == after.stdout} | to_json }}"
        dest: "{{ report }}"
        mode: "0644"
      delegate_to: localhost
"""


def test_bad_input_fails_naming_it_and_changes_nothing(host, tmp_path):
    assert INVENTORY, "MOLECULE_INVENTORY_FILE is not set (run through molecule verify)"
    rules_before = api(host, "/api/v1/rules")["groups"]
    playbook = tmp_path / "bad_input.yml"
    playbook.write_text(BAD_INPUT)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", INVENTORY, str(playbook), "-e", f"report={report}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    got = json.loads(report.read_text())
    assert "no_such_group" in got["group"], got
    assert "BrokenRuleOfTheSite" in got["rule"], got
    assert "broken-hook" in got["url"] and "webhook_configs[0].url" in got["url"], got
    assert "secret-token" not in got["url"] and "secret-token" not in proc.stdout
    assert got["unchanged"], got
    # The running Prometheus kept its configuration: same rules, still healthy.
    rules_after = api(host, "/api/v1/rules")["groups"]
    assert [g["name"] for g in rules_after] == [g["name"] for g in rules_before]
    assert all(r["name"] != "BrokenRuleOfTheSite" for g in rules_after for r in g["rules"])
    assert api(host, "/api/v1/status/runtimeinfo")["reloadConfigSuccess"] is True
