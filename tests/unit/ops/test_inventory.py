"""sovereign-ops reads inventories through the real ansible-inventory: vault (whole-file and inline), INI, a
script dynamic inventory; every failure is one line naming the problem and the fix (issue 9, ADR 0901).

Each case writes a real inventory in a tmp dir; vaulted files are encrypted by the real ansible-vault."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sovereign_ops import cli, inventory

BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple"

HOSTS_YML = textwrap.dedent(
    """
    all:
      children:
        inference:
          hosts:
            infer-01: {ansible_host: 10.0.0.1}
            infer-02: {ansible_host: 10.0.0.2}
        mlflow:
          hosts:
            ops-01:
    """
)


@pytest.fixture(autouse=True)
def _no_ambient_vault(monkeypatch):
    for name in ("ANSIBLE_VAULT_PASSWORD_FILE", "ANSIBLE_VAULT_IDENTITY_LIST", "SOVEREIGN_OPS_INVENTORY"):
        monkeypatch.delenv(name, raising=False)


def vault(*args, stdin=None):
    proc = subprocess.run(
        [str(BIN / "ansible-vault"), *args], input=stdin, capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout


def encrypt_string(base, value, name):
    return vault("encrypt_string", "--vault-password-file", str(base / "pw"), "--name", name, value)


def indent(text, spaces):
    return textwrap.indent(text, " " * spaces)


# -- inventory builders: each writes one real inventory under BASE and returns the -i argument --------------------


def yaml_with_vault_file(base):
    """The layout inventories/production recommends: group_vars/all/main.yml in clear, vault.yml encrypted."""
    (base / "inv" / "group_vars" / "all").mkdir(parents=True)
    (base / "inv" / "hosts.yml").write_text(HOSTS_YML)
    (base / "inv" / "group_vars" / "all" / "main.yml").write_text("ansible_user: deploy\n")
    secret = base / "inv" / "group_vars" / "all" / "vault.yml"
    secret.write_text("vault_mlflow_db_password: hunter2\nansible_port: 2299\n")
    vault("encrypt", "--vault-password-file", str(base / "pw"), str(secret))
    assert secret.read_text().startswith("$ANSIBLE_VAULT;")
    return base / "inv"


def yaml_inline_vault(base):
    """An inline !vault value the CLI does not need (a database password)."""
    secret = encrypt_string(base, "hunter2", "mlflow_db_password")
    (base / "hosts.yml").write_text(
        "all:\n  children:\n    inference:\n      hosts:\n        infer-01:\n"
        + indent("ansible_host: 10.0.0.1\n" + secret, 10)
        + "        infer-02: {ansible_host: 10.0.0.2}\n    mlflow:\n      hosts:\n        ops-01:\n"
    )
    return base / "hosts.yml"


def yaml_inline_vault_user(base):
    """An inline !vault value the CLI needs to connect (ansible_user)."""
    secret = encrypt_string(base, "vaulted-user", "ansible_user")
    (base / "hosts.yml").write_text(
        "all:\n  children:\n    inference:\n      hosts:\n        infer-01:\n"
        + indent("ansible_host: 10.0.0.1\n" + secret, 10)
        + "        infer-02: {ansible_host: 10.0.0.2}\n    mlflow:\n      hosts:\n        ops-01:\n"
    )
    return base / "hosts.yml"


def ini(base):
    (base / "hosts.ini").write_text(
        textwrap.dedent(
            """
            [inference]
            infer-01 ansible_host=10.0.0.1 ansible_port=2201
            infer-02 ansible_host=10.0.0.2

            [inference:vars]
            ansible_user=ml
            ansible_become=true

            [mlflow]
            ops-01
            """
        )
    )
    return base / "hosts.ini"


def script(base):
    """A dynamic inventory: an executable that prints --list JSON (with _meta, so no --host calls)."""
    data = {
        "inference": {"hosts": ["infer-01", "infer-02"], "vars": {"ansible_user": "dyn"}},
        "mlflow": {"hosts": ["ops-01"]},
        "_meta": {"hostvars": {"infer-01": {"ansible_host": "10.0.0.1", "ansible_port": 2201}}},
    }
    path = base / "dynamic.py"
    path.write_text(f"#!{sys.executable}\nimport json\nprint(json.dumps({data!r}))\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


CASES = [
    pytest.param(
        yaml_with_vault_file,
        [],
        dict(user="deploy", port=22, address="10.0.0.1"),
        "not read (vault-encrypted, no vault password given): {base}/inv/group_vars/all/vault.yml",
        id="vault-file-no-password-is-skipped-and-named",
    ),
    pytest.param(
        yaml_with_vault_file,
        ["--vault-password-file", "{base}/pw"],
        dict(user="deploy", port=2299),
        None,
        id="vault-file-with-password-is-read",
    ),
    pytest.param(
        yaml_with_vault_file, ["--vault-id", "prod@{base}/pw"], dict(port=2299), None, id="vault-file-vault-id"
    ),
    pytest.param(yaml_inline_vault, [], dict(address="10.0.0.1", port=22), None, id="inline-vault-not-needed"),
    pytest.param(
        yaml_inline_vault_user,
        ["--vault-password-file", "{base}/pw"],
        dict(user="vaulted-user"),
        None,
        id="inline-vault-connection-setting-decrypted",
    ),
    pytest.param(ini, [], dict(address="10.0.0.1", port=2201, user="ml", become=True), None, id="ini-with-group-vars"),
    pytest.param(script, [], dict(address="10.0.0.1", port=2201, user="dyn"), None, id="script-dynamic-inventory"),
]


@pytest.mark.parametrize(("build", "vault_args", "expected", "note"), CASES)
def test_inventory_kinds(tmp_path, build, vault_args, expected, note):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    path = build(tmp_path)
    argv = [a.format(base=tmp_path) for a in vault_args]
    args = cli.build_parser().parse_args(["-i", str(path), *argv, "status"])
    vault_opts = inventory.Vault(password_files=args.vault_password_file, ids=args.vault_id)
    inv = inventory.load(path, vault_opts)
    hosts = inventory.select(inv, "inference")
    assert [h.name for h in hosts] == ["infer-01", "infer-02"]
    for attr, value in expected.items():
        assert getattr(hosts[0], attr) == value, attr
    assert [h.name for h in inventory.select(inv, "all", "mlflow")] == ["ops-01"]
    if note:
        assert len(inv.notes) == 1, inv.notes
        assert inv.notes[0].startswith(note.format(base=os.path.realpath(tmp_path)))
    else:
        assert inv.notes == []


@pytest.mark.parametrize(
    ("build", "attr", "value"),
    [(yaml_with_vault_file, "port", 2299), (yaml_inline_vault_user, "user", "vaulted-user")],
    ids=["vault-file", "inline-connection-setting"],
)
def test_vault_password_from_the_environment(tmp_path, monkeypatch, build, attr, value):
    """ANSIBLE_VAULT_PASSWORD_FILE (as ansible.cfg's vault_password_file) reaches both Ansible children."""
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    path = build(tmp_path)
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(tmp_path / "pw"))
    inv = inventory.load(path)
    assert getattr(inv.hosts["infer-01"], attr) == value
    assert inv.notes == []


def test_ask_vault_pass_asks_once_and_never_writes_it_down(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    path = yaml_inline_vault_user(tmp_path)  # two Ansible calls: ansible-inventory, then ansible-vault
    asked = []
    monkeypatch.setattr(inventory.getpass, "getpass", lambda prompt: asked.append(prompt) or PASSWORD)
    inv = inventory.load(path, inventory.Vault(ask=True))
    assert inv.hosts["infer-01"].user == "vaulted-user"
    assert asked == ["Vault password: "]


def broken_yaml(base):
    (base / "hosts.yml").write_text("all: [this is: not an inventory\n")
    return base / "hosts.yml"


def failing_script(base):
    path = base / "dynamic.sh"
    path.write_text("#!/bin/sh\necho 'cloud API said 403' >&2\nexit 1\n")
    path.chmod(0o755)
    return path


def no_such_path(base):
    return base / "missing.yml"


def plain(base):
    (base / "hosts.yml").write_text(HOSTS_YML)
    return base / "hosts.yml"


def empty_group(base):
    (base / "hosts.ini").write_text("[inference]\n\n[mlflow]\nops-01\n")
    return base / "hosts.ini"


ERRORS = [
    pytest.param(no_such_path, [], "no inventory at {base}/missing.yml: give -i PATH", id="no-such-path"),
    pytest.param(broken_yaml, [], "ansible-inventory cannot read the inventory {base}/hosts.yml", id="unreadable"),
    pytest.param(
        failing_script,
        [],
        "ansible-inventory cannot read the inventory {base}/dynamic.sh (rc 1): Failed to parse inventory with 'script'"
        " plugin: Inventory script returned non-zero exit code 1. (it said: cloud API said 403)",
        id="dynamic-inventory-fails",
    ),
    pytest.param(
        yaml_with_vault_file,
        ["--vault-password-file", "{base}/wrong"],
        "the vault password does not decrypt the vault-encrypted vars of {base}/inv (wrong password or vault id)",
        id="wrong-vault-password",
    ),
    pytest.param(
        yaml_inline_vault_user,
        [],
        "infer-01: ansible_user is vault-encrypted and sovereign-ops needs it to connect: give --vault-password-file",
        id="needed-inline-vault-without-password",
    ),
    pytest.param(
        yaml_inline_vault_user,
        ["--vault-password-file", "{base}/wrong"],
        "the vault password does not decrypt ansible_user of infer-01",
        id="needed-inline-vault-wrong-password",
    ),
    pytest.param(
        plain, ["-g", "gpu_hosts"], "no host in group 'gpu_hosts' (groups with hosts: inference, mlflow)", id="group"
    ),
    pytest.param(empty_group, [], "no host in group 'inference' (groups with hosts: mlflow)", id="empty-group"),
    pytest.param(plain, ["-l", "ops-01"], "--limit 'ops-01' matches no host of group 'inference'", id="limit"),
    pytest.param(
        plain,
        ["--ansible-inventory", "{base}/nowhere/ansible-inventory"],
        "{base}/nowhere/ansible-inventory is not an executable: give the path of ansible-inventory",
        id="ansible-inventory-missing",
    ),
]


@pytest.mark.parametrize(("build", "argv", "message"), ERRORS)
def test_errors_are_one_line(tmp_path, capsys, build, argv, message):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "wrong").write_text("not the password\n")
    path = build(tmp_path)
    argv = [a.format(base=tmp_path) for a in argv]
    assert cli.main(["-i", str(path), *argv, "status"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sovereign-ops: " + message.format(base=tmp_path)), lines[0]
    assert "Traceback" not in err


def test_ansible_inventory_not_installed(tmp_path, monkeypatch):
    """Neither beside this Python nor on PATH: the message says how to install it."""
    monkeypatch.setattr(inventory.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(inventory.InventoryError, match=r"ansible-inventory not found .*pip install ansible-core"):
        inventory.ansible_tool("ansible-inventory")


def test_the_secret_is_not_printed(tmp_path, capsys, monkeypatch):
    """ansible-inventory prints decrypted vars on its stdout; sovereign-ops keeps that output to itself."""
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    path = yaml_with_vault_file(tmp_path)
    monkeypatch.setattr(cli, "run_on", lambda host, command, timeout=30: (255, "", "unreachable (test)"))
    cli.main(["-i", str(path), "--vault-password-file", str(tmp_path / "pw"), "status", "--json"])
    out, err = capsys.readouterr()
    assert "hunter2" not in out + err
    assert json.loads(out)[0]["error"] == "unreachable (test)"
