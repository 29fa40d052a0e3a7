"""The inventory, read by Ansible itself (`ansible-inventory --list`): YAML, INI, scripts, inventory plugins,
group_vars/host_vars and vault all behave as they do for ansible-playbook. See docs/adr/0901."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent / "ansible_plugins" / "vars"
NO_SECRETS = "Attempting to decrypt but no vault secrets found"
WRONG_SECRET = "Decryption failed"
VAULT_HELP = "give --vault-password-file FILE, --ask-vault-pass or ANSIBLE_VAULT_PASSWORD_FILE"
# What sovereign-ops itself reads of a host's vars; every other var (vaulted or not) is Ansible's business.
CONNECTION_VARS = (
    "ansible_host",
    "ansible_port",
    "ansible_ssh_port",
    "ansible_user",
    "ansible_ssh_user",
    "ansible_ssh_private_key_file",
    "ansible_private_key_file",
    "ansible_ssh_common_args",
    "ansible_ssh_extra_args",
    "ansible_become",
)


class InventoryError(Exception):
    """A one-line message naming the problem and the fix."""


@dataclasses.dataclass
class Host:
    name: str
    vars: dict
    groups: set

    @property
    def address(self):
        return str(self.vars.get("ansible_host") or self.name)

    @property
    def port(self):
        value = self.vars.get("ansible_port") or self.vars.get("ansible_ssh_port") or 22
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InventoryError(
                f"{self.name}: ansible_port {value!r} is not a port number: give a number in the inventory"
            ) from None

    @property
    def user(self):
        return self.vars.get("ansible_user") or self.vars.get("ansible_ssh_user")

    @property
    def key_file(self):
        return self.vars.get("ansible_ssh_private_key_file") or self.vars.get("ansible_private_key_file")

    @property
    def become(self):
        value = self.vars.get("ansible_become", False)
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")

    @property
    def known_hosts(self):
        """UserKnownHostsFile=... from ansible_ssh_common_args / ansible_ssh_extra_args, else None."""
        for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            words = shlex.split(str(self.vars.get(key) or ""))
            for i, word in enumerate(words):
                option = word
                if word == "-o" and i + 1 < len(words):
                    option = words[i + 1]
                elif word.startswith("-o"):
                    option = word[2:]
                if option.lower().startswith("userknownhostsfile="):
                    return option.split("=", 1)[1]
        return None

    def check_templates(self):
        """Raise when a connection setting is a Jinja template: ansible-inventory does not template vars, and
        neither does this tool."""
        for key in CONNECTION_VARS:
            value = self.vars.get(key)
            if isinstance(value, str) and "{{" in value:
                raise InventoryError(
                    f"{self.name}: {key} is a template ({value!r}); sovereign-ops does not evaluate templates: "
                    "give a literal value (the lab's generated inventory has literal values)"
                )


@dataclasses.dataclass
class Vault:
    """How to give Ansible the vault password(s): passed through to every ansible-inventory/ansible-vault call.
    ANSIBLE_VAULT_PASSWORD_FILE and ansible.cfg's vault_password_file reach them through the environment."""

    password_files: list = dataclasses.field(default_factory=list)
    ids: list = dataclasses.field(default_factory=list)
    ask: bool = False
    _asked: str | None = None

    def given(self):
        return bool(self.password_files or self.ids or self.ask)

    def args(self):
        """(argv, pass_fds). --ask-vault-pass asks once here, then hands the password to each child on a pipe
        (never on disk, never on a command line), so a run that calls Ansible twice asks once."""
        argv, fds = [], []
        for path in self.password_files:
            argv += ["--vault-password-file", str(path)]
        for vault_id in self.ids:
            argv += ["--vault-id", str(vault_id)]
        if self.ask:
            if self._asked is None:
                try:
                    self._asked = getpass.getpass("Vault password: ")
                except (EOFError, KeyboardInterrupt):
                    raise InventoryError("no vault password typed: give it, or use --vault-password-file") from None
            read, write = os.pipe()
            os.write(write, self._asked.encode() + b"\n")
            os.close(write)
            argv += ["--vault-password-file", f"/dev/fd/{read}"]
            fds.append(read)
        return argv, fds


def ansible_tool(name, explicit=None):
    """Path of an Ansible executable: EXPLICIT, else the one beside this Python (the same venv), else PATH."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise InventoryError(f"{explicit} is not an executable: give the path of {name}")
        return explicit
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise InventoryError(
        f"{name} not found (not beside {sys.executable}, not on PATH): install Ansible into this environment "
        f"({Path(sys.executable).with_name('pip')} install ansible-core), or give --{name} PATH"
    )


def _origin(stderr, marker):
    """The file Ansible names (its `Origin:` line) after the first line that holds MARKER, without :line:col."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            for follow in lines[i + 1 : i + 12]:
                match = re.match(r"\s*Origin:\s*(.+?)(?::\d+(?::\d+)?)?\s*$", follow)
                if match:
                    return match.group(1)
    return None


def _first_reason(stderr):
    """The most telling line of ansible-inventory's stderr: the first 'Failed to parse ...' cause, else the
    first error or warning, on one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else "no message"
    for prefix in ("[WARNING]: Failed to parse", "[ERROR]:", "[WARNING]:", "ERROR!"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            reason = found[0].split(":", 1)[1].strip() if found[0].startswith("[") else found[0]
            break
    if "Standard error from inventory script:" in lines[:-1]:  # what a failing dynamic inventory said
        reason += f" (it said: {lines[lines.index('Standard error from inventory script:') + 1]})"
    return reason


def _classify(path, rc, stderr, vault):
    """An InventoryError for a failed ansible-inventory run."""
    if WRONG_SECRET in stderr:
        where = _origin(stderr, WRONG_SECRET) or f"the vault-encrypted vars of {path}"
        return InventoryError(
            f"the vault password does not decrypt {where} (wrong password or vault id): {VAULT_HELP} that opens it"
        )
    if NO_SECRETS in stderr:
        where = _origin(stderr, NO_SECRETS) or "the inventory"
        return InventoryError(f"{where} is vault-encrypted and sovereign-ops needs it to read {path}: {VAULT_HELP}")
    return InventoryError(
        f"ansible-inventory cannot read the inventory {path} (rc {rc}): {_first_reason(stderr)[:300]}; "
        "give -i an Ansible inventory (YAML, INI, an executable script or a plugin config)"
    )


def _run(path, vault, tool, tolerant=False):
    """(rc, stdout, stderr, skipped vault files) of `ansible-inventory -i PATH --list`."""
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_INVENTORY_UNPARSED_FAILED="True")
    env.pop("ANSIBLE_FORCE_COLOR", None)
    argv, fds = vault.args()
    skipped_file = None
    if tolerant:
        handle, skipped_file = tempfile.mkstemp(prefix="sovereign-ops-vault-")
        os.close(handle)
        env["SOVEREIGN_OPS_VAULT_SKIPPED"] = skipped_file
        env["ANSIBLE_VARS_PLUGINS"] = os.pathsep.join(filter(None, [str(PLUGINS), env.get("ANSIBLE_VARS_PLUGINS")]))
        env["ANSIBLE_VARS_ENABLED"] = ",".join(
            "sovereign_ops_vars" if name in ("host_group_vars", "ansible.builtin.host_group_vars") else name
            for name in _vars_enabled(tool, env)
        )
    try:
        proc = subprocess.run(
            [tool, "-i", str(path), "--list", *argv],
            capture_output=True,
            text=True,
            env=env,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InventoryError(f"ansible-inventory -i {path} ran for 300 s: is a dynamic inventory hanging?") from None
    finally:
        for fd in fds:
            os.close(fd)
    skipped = []
    if skipped_file:
        with open(skipped_file, encoding="utf-8") as handle:
            skipped = sorted(set(handle.read().split()))
        os.unlink(skipped_file)
    return proc.returncode, proc.stdout, proc.stderr, skipped


def _config(tool, env):
    """{setting: value} of this Ansible configuration (ansible.cfg, environment); {} when unreadable."""
    try:
        proc = subprocess.run(
            [str(Path(tool).with_name("ansible-config")), "dump", "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        return {item.get("name"): item.get("value") for item in json.loads(proc.stdout)}
    except (OSError, ValueError, subprocess.TimeoutExpired, AttributeError):
        return {}


def _vars_enabled(tool, env):
    """The vars plugins this configuration enables, so the tolerant run swaps only host_group_vars."""
    return list(_config(tool, env).get("VARS_PLUGINS_ENABLED") or ["host_group_vars"])


def _decrypt(value, vault, tool, host, key):
    """The plain text of an inline `!vault` connection setting (ansible-inventory leaves those encrypted)."""
    config = {} if vault.given() else _config(tool, os.environ)
    # Without any password source ansible-vault would prompt for one: say what to give instead.
    if not (vault.given() or config.get("DEFAULT_VAULT_PASSWORD_FILE") or config.get("DEFAULT_VAULT_IDENTITY_LIST")):
        raise InventoryError(f"{host}: {key} is vault-encrypted and sovereign-ops needs it to connect: {VAULT_HELP}")
    argv, fds = vault.args()
    try:
        proc = subprocess.run(
            [
                ansible_tool("ansible-vault", str(Path(tool).with_name("ansible-vault"))),
                "decrypt",
                "--output",
                "-",
                *argv,
            ],
            start_new_session=True,  # never the terminal: a password comes from the options or the config
            input=value,
            capture_output=True,
            text=True,
            pass_fds=fds,
            timeout=60,
            check=False,
        )
    finally:
        for fd in fds:
            os.close(fd)
    if proc.returncode:
        if WRONG_SECRET in proc.stderr or "no vault secrets" in proc.stderr:
            raise InventoryError(f"the vault password does not decrypt {key} of {host}: {VAULT_HELP}")
        raise InventoryError(f"ansible-vault cannot decrypt {key} of {host}: {_first_reason(proc.stderr)[:200]}")
    return proc.stdout


def _groups_of(data):
    """{host: {groups it is in, directly or through children}} from the --list JSON."""
    groups = {name: body for name, body in data.items() if name != "_meta" and isinstance(body, dict)}
    members = {}

    def hosts_of(name, seen):
        if name in seen or name not in groups:
            return set()
        seen.add(name)
        out = set(groups[name].get("hosts") or [])
        for child in groups[name].get("children") or []:
            out |= hosts_of(child, seen)
        return out

    for name in groups:
        for host in hosts_of(name, set()):
            members.setdefault(host, set()).add(name)
    return members, set(groups)


@dataclasses.dataclass
class Inventory:
    hosts: dict
    groups: set
    notes: list


def load(path, vault=None, tool=None):
    """Every host of the inventory at PATH with its merged vars, as Ansible sees them (INVENTORY's notes: the
    vault files that were not read, because no password was given)."""
    vault = vault or Vault()
    if "," not in str(path) and not os.path.exists(path):  # "a,b," is Ansible's host-list inventory
        raise InventoryError(
            f"no inventory at {path}: give -i PATH of an Ansible inventory (inventories/lab exists after `make lab`)"
        )
    tool = ansible_tool("ansible-inventory", tool)
    rc, out, err, skipped = _run(path, vault, tool)
    notes = []
    if rc and NO_SECRETS in err and not vault.given():
        # Nothing gave a vault password and some vars file is encrypted: read the inventory once more without
        # those files. Nothing the CLI needs to connect should live in a secrets file; if it does, say which.
        rc, out, err, skipped = _run(path, vault, tool, tolerant=True)
        notes += [
            f"not read (vault-encrypted, no vault password given): {file}; if it sets connection settings, {VAULT_HELP}"
            for file in skipped
        ]
    if rc:
        raise _classify(path, rc, err, vault)
    try:
        data = json.loads(out)
    except ValueError:
        raise InventoryError(f"ansible-inventory -i {path} answered what is not JSON: {out[:120]!r}") from None
    members, groups = _groups_of(data)
    hostvars = (data.get("_meta") or {}).get("hostvars") or {}
    hosts = {}
    for name in sorted(set(members) | set(hostvars)):
        values = dict(hostvars.get(name) or {})
        for key in CONNECTION_VARS:
            value = values.get(key)
            if isinstance(value, dict) and "__ansible_vault" in value:
                values[key] = _decrypt(value["__ansible_vault"], vault, tool, name, key)
        hosts[name] = Host(name=name, vars=values, groups=(members.get(name) or set()) | {"all"})
    return Inventory(hosts=hosts, groups=groups | {"all"}, notes=notes)


def select(inv, group="inference", limit=None):
    """Hosts of GROUP (by name), narrowed by LIMIT (comma-separated host names or groups, as --limit takes)."""
    chosen = [h for h in inv.hosts.values() if group in h.groups]
    if not chosen:  # ansible-inventory --list leaves out groups without hosts: one message for both
        with_hosts = {g for h in inv.hosts.values() for g in h.groups} - {"all", "ungrouped"}
        known = ", ".join(sorted(with_hosts)) or "none"
        raise InventoryError(f"no host in group {group!r} (groups with hosts: {known}): add hosts, or give -g GROUP")
    if limit:
        wanted = {w.strip() for w in limit.split(",") if w.strip()}
        chosen = [h for h in chosen if h.name in wanted or h.groups & wanted]
        if not chosen:
            raise InventoryError(f"--limit {limit!r} matches no host of group {group!r}: name hosts or groups in it")
    return sorted(chosen, key=lambda h: h.name)


def default_inventory():
    """No built-in default: acting on the wrong fleet is worse than asking for -i (issue 9)."""
    return os.environ.get("SOVEREIGN_OPS_INVENTORY") or os.environ.get("ANSIBLE_INVENTORY")
