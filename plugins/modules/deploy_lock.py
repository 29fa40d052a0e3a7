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
description:
  - The fleet deploy lock of C(playbooks/deploy.yml) and C(playbooks/rollback.yml) is one directory on one host
    (by convention the first inference host), created with C(mkdir), which is atomic, as kamal does. It holds
    C(info.json) with the holder (C(user@controller)), when it was taken, its TTL, an optional note and a
    random token.
  - O(state=present) takes the lock. When it is already held by someone else it fails, naming the holder and
    since when, unless the lock is older than its own TTL (a run that was killed before releasing it); then it
    breaks it with a warning naming the old holder and takes it. Giving the O(token) of a lock we already hold
    renews it (C(changed=false)).
  - O(state=absent) releases the lock only when O(token) matches (a lock broken and retaken by someone else
    while we ran is left alone, with a warning), or unconditionally with O(force=true) (a person breaking a
    lock they know is dead; see docs/runbooks/deployment-failed.md).
  - Runs only on Python 3 (as do all modules of this collection).
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
    type: bool
    default: false
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - In check mode the module reads the lock and reports whether it would take, break, refuse or release it,
        failing exactly like a real run would when the lock is held by someone else. It changes nothing.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
notes:
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
  description: The stale lock that was broken (its info.json fields), V(null) when none was.
  returned: success
  type: dict
  sample: {holder: bob@ci, since: "2026-03-01T09:00:00Z", ttl: 3600}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._ledger import (
    describe_holder,
    is_stale,
    lock_age,
    read_lock,
    remove_lock,
    try_mkdir_lock,
)


def present(module, result):
    p = module.params
    path = p["path"]
    info = read_lock(path)
    if info is not None and p["token"] and info.get("token") == p["token"]:
        result.update(token=info["token"], holder=info.get("holder"), since=info.get("since"))
        module.exit_json(**result)
    if info is not None:
        age = lock_age(info)
        if not is_stale(info):
            module.fail_json(
                msg=f"the fleet deploy lock {path} is held by {describe_holder(info, age)}. Another deploy or "
                "rollback is running; wait for it to finish. If you are sure its run is dead, see "
                "docs/runbooks/deployment-failed.md (deploy_lock state=absent force=true).",
                holder=info.get("holder"),
                since=info.get("since"),
                **{k: v for k, v in result.items() if k not in ("holder", "since")},
            )
        result["broken"] = {k: v for k, v in info.items() if k != "token"}
        module.warn(
            f"breaking a stale fleet deploy lock {path} held by {describe_holder(info, age)}: it is older than "
            "its TTL, so its run is taken to be dead."
        )
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
            changed=result["broken"] is not None,
        )
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
            f"left the fleet deploy lock {path} in place: it is held by {describe_holder(info, lock_age(info))}, "
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
        ),
        required_if=[("state", "present", ("holder",))],
        supports_check_mode=True,
    )
    p = module.params
    if p["ttl"] <= 0:
        module.fail_json(msg="ttl must be a positive number of seconds, got {}".format(p["ttl"]))
    if p["path"].rstrip("/") in ("", "/"):
        module.fail_json(msg="path must be a lock directory, not /")
    result = dict(changed=False, token=None, holder=None, since=None, broken=None)
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
