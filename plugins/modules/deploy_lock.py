#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: deploy_lock
short_description: Take or release the fleet-wide deploy lock
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
description:
  - The fleet deploy lock of the release role (C(roles/release), C(playbooks/deploy.yml), C(playbooks/rollback.yml))
    is one directory on one host (by convention the first inference host), created with C(mkdir), which is atomic,
    as kamal does. It holds
    C(info.json) with the holder (C(user@controller)), when it was taken, its TTL, an optional note, a
    random token and, when given, the controller host and the PID (and start time) of the holder's
    C(ansible-playbook) process (O(controller), O(controller_pid), O(controller_pid_started)).
  - O(state=present) takes the lock. When it is already held by someone else it fails, naming the holder and
    since when, unless the lock is older than its own TTL (a run that was killed before releasing it); then it
    breaks it with a warning naming the old holder and takes it. Giving the O(token) of a lock we already hold
    renews it (C(changed=false)).
  - A lock whose C(ansible-playbook) is dead is broken at once, without waiting for its TTL. That decision needs
    the controller's processes, which the lock host cannot see, so it is made by this module's action plugin,
    which runs on the controller (docs/adr/0502-deploy-lock-liveness.md). With O(state=present) the action
    plugin fills O(controller) (the controller's host name), O(controller_pid) and O(controller_pid_started)
    (the C(ansible-playbook) process it runs under) when they are not given. When the lock is held by a run of
    this controller whose C(ansible-playbook) is gone (no such PID, or a PID started at another time), it calls
    the module again with that holder as O(dead_holder); the module breaks the lock, with a warning naming the
    dead holder, only while its C(info.json) still names that controller, PID and C(since). A live holder, or a
    holder on another controller, still refuses.
  - O(force=true) with O(state=present) breaks any lock, with a warning naming its holder (the release
    playbooks' C(-e deploy_break_lock=true), for a holder on another controller known to be dead).
  - O(state=absent) releases the lock only when O(token) matches (a lock broken and retaken by someone else
    while we ran is left alone, with a warning), or unconditionally with O(force=true) (a person breaking a
    lock they know is dead; see docs/runbooks/deployment-failed.md).
options:
  path:
    description:
      - The lock directory. Its parent is created when missing.
    type: path
    default: /var/lib/sovereign/deploy.lock
  state:
    description:
      - V(present) takes (or renews) the lock, V(absent) releases it.
    type: str
    choices: [present, absent]
    default: present
  holder:
    description:
      - Who takes the lock, for example C(alice@laptop). Required with O(state=present).
    type: str
  ttl:
    description:
      - Seconds after which the lock counts as stale and the next taker breaks it. Choose it longer than the
        longest deploy of the fleet.
    type: int
    default: 3600
  note:
    description:
      - A free text stored with the lock and shown to whoever is refused (for example the color and model).
    type: str
    default: ""
  token:
    description:
      - The token RV(token) returned when the lock was taken. With O(state=present), renews our own lock; with
        O(state=absent), proves the lock is ours.
    type: str
  force:
    description:
      - With O(state=absent), remove the lock whoever holds it.
      - With O(state=present), break a lock held by someone else (with a warning naming the holder) and take it.
        Only for a holder known to be dead that the liveness check cannot see (another controller).
    type: bool
    default: false
  controller:
    description:
      - The host name of the controller running the holder's C(ansible-playbook); stored in C(info.json) for the
        liveness check of a later run. The action plugin sets it to the controller's host name when empty.
    type: str
    default: ""
  controller_pid:
    description:
      - The PID of the holder's C(ansible-playbook) process on O(controller); stored in C(info.json).
    type: int
  controller_pid_started:
    description:
      - The start time of O(controller_pid) as C(ps -o lstart=) prints it; stored in C(info.json), so that a
        reused PID is not taken for the holder.
    type: str
    default: ""
  dead_holder:
    description:
      - A holder found dead on its controller, as read from C(info.json) (keys C(controller), C(controller_pid),
        C(since)). With O(state=present), a lock that still names exactly this holder is broken with a warning and
        taken, whatever its age. A lock that names anything else is handled as usual.
      - Set by the action plugin; give it only when calling the module without it.
    type: dict
attributes:
  action:
    description:
      Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
    details:
      - The holder-liveness check runs on the controller (see the description).
  check_mode:
    support: full
    details:
      - In check mode the module reads the lock and reports whether it would take, break, refuse or release it,
        failing exactly like a real run would when the lock is held by someone else. It changes nothing.
  diff_mode:
    support: none
notes:
  - The action plugin needs C(ps) (procps) on the controller; without it a holder on this controller counts as
    alive (the TTL still frees its lock).
  - The lock is advisory; it keeps two runs of the release playbooks apart. It does not stop a person running
    C(blue_green_switch) by hand (that module has its own per-host flock).
seealso:
  - module: sovereign.mlops.deploy_ledger
  - module: sovereign.mlops.blue_green_switch
"""

EXAMPLES = r"""
- name: Take the fleet deploy lock on the first inference host
  sovereign.mlops.deploy_lock:
    holder: "{{ lookup('env', 'USER') }}@{{ lookup('pipe', 'hostname') }}"
    ttl: 1800
    note: "deploy green models:/fraud/7"
  delegate_to: "{{ groups['inference'][0] }}"
  run_once: true
  register: lock

- name: Release it
  sovereign.mlops.deploy_lock:
    state: absent
    token: "{{ lock.token }}"
  delegate_to: "{{ groups['inference'][0] }}"
  run_once: true

- name: Break a lock by hand (its holder is known to be dead)
  sovereign.mlops.deploy_lock:
    state: absent
    force: true
"""

RETURN = r"""
token:
  description: The token of the lock we hold (state=present); V(null) in check mode when the lock would be taken.
  returned: success
  type: str
  sample: 3f0c2d6a9b8e4f0f8a1c2b3d4e5f6a7b
holder:
  description: Who holds the lock now (after the module ran), V(null) when nobody does.
  returned: always
  type: str
  sample: alice@laptop
since:
  description: When the current holder took the lock (ISO 8601, UTC).
  returned: always
  type: str
  sample: "2026-03-01T12:00:00Z"
broken:
  description: The lock that was broken (its info.json fields but the token), V(null) when none was.
  returned: success
  type: dict
  sample: {holder: bob@ci, since: "2026-03-01T09:00:00Z", ttl: 3600, controller: ci, controller_pid: 4100}
held:
  description: When the lock is refused, the lock that refused it (its info.json fields but the token).
  returned: failure
  type: dict
  sample: {holder: bob@ci, since: "2026-03-01T09:00:00Z", ttl: 3600, controller: ci, controller_pid: 4100}
liveness:
  description:
    - The action plugin's verdict on the holder of a refusing lock, V(null) when no lock refused.
    - V(alive), V(dead) (then broken and taken), V(unknown) (this controller, but no usable PID or no C(ps)) or
      V(elsewhere) (another controller, which this one cannot check).
  returned: state=present
  type: str
  sample: dead
broken_because:
  description:
    - Why the lock was broken, V(null) when none was.
    - V(stale) (older than its TTL), V(dead) (O(dead_holder) matched) or V(force) (O(force=true)).
  returned: success
  type: str
  sample: dead
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._fleet_lock import (
    describe_holder,
    is_stale,
    lock_age,
    read_lock,
    remove_lock,
    try_mkdir_lock,
    write_info,
)


def _identity(info):
    """(controller, pid, since) of a lock's holder, as compared with dead_holder."""
    pid = info.get("controller_pid")
    try:
        pid = int(pid) if pid is not None else None
    except (TypeError, ValueError):
        pid = None
    return (str(info.get("controller") or ""), pid, str(info.get("since") or ""))


def describe_process(info):
    """' (ansible-playbook pid N on controller C)' when the lock names them, else ''."""
    controller, pid, _since = _identity(info)
    if not controller or pid is None:
        return ""
    return f" (ansible-playbook pid {pid} on {controller})"


def _record_controller(path, info, params):
    """Add the holder's controller and ansible-playbook PID to the info.json we just wrote."""
    if not params["controller"] and params["controller_pid"] is None:
        return info
    info = dict(
        info,
        controller=params["controller"],
        controller_pid=params["controller_pid"],
        controller_pid_started=params["controller_pid_started"],
    )
    write_info(path, info)
    return info


def present(module, result):
    p = module.params
    path = p["path"]
    info = read_lock(path)
    if info is not None and p["token"] and info.get("token") == p["token"]:
        result.update(token=info["token"], holder=info.get("holder"), since=info.get("since"))
        module.exit_json(**result)
    if info is not None:
        age = lock_age(info)
        who = describe_holder(info, age) + describe_process(info)
        dead = p["dead_holder"]
        if dead is not None and _identity(info) == _identity(dead) and _identity(info)[1] is not None:
            result["broken_because"] = "dead"
            module.warn(
                f"breaking the fleet deploy lock {path} held by {who}: that ansible-playbook is no longer running "
                "on its controller, so its run was killed before it could release the lock."
            )
        elif p["force"]:
            result["broken_because"] = "force"
            module.warn(f"breaking the fleet deploy lock {path} held by {who}, as asked (force / deploy_break_lock).")
        elif is_stale(info):
            result["broken_because"] = "stale"
            module.warn(
                f"breaking a stale fleet deploy lock {path} held by {who}: it is older than "
                "its TTL, so its run is taken to be dead."
            )
        else:
            module.fail_json(
                msg=f"the fleet deploy lock {path} is held by {who}. Another deploy or "
                "rollback is running; wait for it to finish. A re-run from the holder's controller breaks the lock "
                "by itself once that ansible-playbook is dead; if you are sure a run on another controller is dead, "
                "add -e deploy_break_lock=true (see docs/runbooks/deployment-failed.md).",
                holder=info.get("holder"),
                since=info.get("since"),
                held={k: v for k, v in info.items() if k != "token"},
                **{k: v for k, v in result.items() if k not in ("holder", "since")},
            )
        result["broken"] = {k: v for k, v in info.items() if k != "token"}
    result["changed"] = True
    if module.check_mode:
        result.update(holder=p["holder"], since=None)
        module.exit_json(**result)
    if info is not None:
        remove_lock(path)
    taken = try_mkdir_lock(path, p["holder"], p["ttl"], p["note"])
    if taken is None:
        # Someone else won the race for the broken (or just released) lock.
        other = read_lock(path) or {}
        module.fail_json(
            msg=f"the fleet deploy lock {path} was taken by {describe_holder(other)} at the same moment; wait "
            "for that run.",
            holder=other.get("holder"),
            since=other.get("since"),
            broken=result["broken"],
            broken_because=result["broken_because"],
            changed=result["broken"] is not None,
        )
    taken = _record_controller(path, taken, p)
    result.update(token=taken["token"], holder=taken["holder"], since=taken["since"])
    module.exit_json(**result)


def absent(module, result):
    p = module.params
    path = p["path"]
    info = read_lock(path)
    if info is None:
        module.exit_json(**result)
    result.update(holder=info.get("holder"), since=info.get("since"))
    if not p["force"] and info.get("token") != p["token"]:
        module.warn(
            f"left the fleet deploy lock {path} in place: it is held by {describe_holder(info, lock_age(info))}"
            f"{describe_process(info)}, "
            "not by this run (our lock was broken as stale and taken again, or no token was given)."
        )
        module.exit_json(**result)
    result["changed"] = True
    if not module.check_mode:
        remove_lock(path)
        result.update(holder=None, since=None)
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", default="/var/lib/sovereign/deploy.lock"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            holder=dict(type="str"),
            ttl=dict(type="int", default=3600),
            note=dict(type="str", default=""),
            token=dict(type="str", no_log=False),
            force=dict(type="bool", default=False),
            controller=dict(type="str", default=""),
            controller_pid=dict(type="int"),
            controller_pid_started=dict(type="str", default=""),
            dead_holder=dict(type="dict"),
        ),
        required_if=[("state", "present", ("holder",))],
        supports_check_mode=True,
    )
    p = module.params
    if p["ttl"] <= 0:
        module.fail_json(msg="ttl must be a positive number of seconds, got {}".format(p["ttl"]))
    if p["path"].rstrip("/") in ("", "/"):
        module.fail_json(msg="path must be a lock directory, not /")
    result = dict(changed=False, token=None, holder=None, since=None, broken=None, broken_because=None)
    try:
        if p["state"] == "present":
            present(module, result)
        else:
            absent(module, result)
    except OSError as exc:
        module.fail_json(msg=f"{exc.__class__.__name__}: {exc}", **result)
    # Not reached: present()/absent() always exit.
    module.exit_json(**result)  # pragma: no cover


if __name__ == "__main__":
    main()
