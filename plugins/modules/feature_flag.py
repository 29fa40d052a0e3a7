#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: feature_flag
short_description: Change one flag of a flagd flag file, or write the whole file, schema-checked and atomically
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
description:
  - Edits a flag file in OpenFeature's flagd flag-definition format, the file services evaluate in-process with
    flagd's file provider (the runtime's C(--flags-file)); they re-read it when it changes, so a change reaches them
    without a restart.
  - With O(flag), changes that one flag's C(state) (O(enabled)), C(defaultVariant) (O(default_variant)) and/or its
    rollout (O(percentage) of evaluations to O(rollout_variant), the rest to the default variant, as one top-level
    C(fractional)). Everything else in the file stays as it is.
  - With O(definitions), writes the whole file from that mapping of flags (the role C(sovereign.mlops.feature_flags)
    does this).
  - The file as it is and the file as it would become are both checked against the flagd flag-definition schema
    (this collection's transcription, C(plugins/module_utils/_flagd.py)) and for what the schema cannot check (the
    default variant and every variant a C(fractional) names exist). Any problem, an unknown flag or a percentage
    outside 0-100 fails the task before anything is written, naming the flag, the place and the fix.
  - Writes with a temporary file renamed over the old one (fsync'd), so a reader sees the old file or the new one.
  - Needs the C(jsonschema) Python package on the host (Debian C(python3-jsonschema)).
options:
  path:
    description:
      - The flag file (JSON).
    type: path
    required: true
  flag:
    description:
      - The key of the flag to change. It must exist in the file.
      - Mutually exclusive with O(definitions).
    type: str
  enabled:
    description:
      - The flag's C(state), V(true) for C(ENABLED), V(false) for C(DISABLED). A disabled flag evaluates to the
        caller's default value.
    type: bool
  default_variant:
    description:
      - The flag's C(defaultVariant), one of its variants.
    type: str
  percentage:
    description:
      - Percent (0-100) of evaluations that get O(rollout_variant); the default variant gets the rest. Sets the
        flag's targeting to a top-level C(fractional) with those two buckets, keeping its bucketing expression.
      - Fails when the flag's targeting is another rule (a percentage has no single meaning there).
    type: int
  rollout_variant:
    description:
      - The variant O(percentage) applies to. Default, the first bucket of the flag's current rollout.
    type: str
  definitions:
    description:
      - The whole file's flags, a mapping of flag key to its flagd definition (C(state), C(variants),
        C(defaultVariant), C(targeting), C(metadata)). Written as the file's C(flags) object, with C($schema).
    type: dict
  metadata:
    description:
      - Flag-set C(metadata) written with O(definitions).
    type: dict
  owner:
    description:
      - Owner of the file. Default, that of the file it replaces, else the user Ansible runs as.
    type: str
  group:
    description:
      - Group of the file. Default, that of the file it replaces, else the user's group.
    type: str
  mode:
    description:
      - Mode of the file (octal string). Default, that of the file it replaces, else V('0644').
    type: str
attributes:
  check_mode:
    support: full
    details:
      - In check mode the file is read and checked, nothing is written; C(changed) and the diff say what would change.
  diff_mode:
    support: full
    details:
      - The diff is the file's text before and after.
seealso:
  - module: sovereign.mlops.host_contract
requirements:
  - jsonschema
"""

EXAMPLES = r"""
- name: Turn the runtime's batching off everywhere, without a restart
  sovereign.mlops.feature_flag:
    path: /etc/sovereign/flags/flags.json
    flag: runtime-batching
    default_variant: "off"

- name: Give the new ranking to 10 % of users
  sovereign.mlops.feature_flag:
    path: /etc/sovereign/flags/flags.json
    flag: new-ranking
    percentage: 10
    rollout_variant: "on"

- name: Disable a flag (callers get their code default)
  sovereign.mlops.feature_flag:
    path: /etc/sovereign/flags/flags.json
    flag: new-ranking
    enabled: false
"""

RETURN = r"""
flag:
  description: The changed flag's definition after the change (with O(flag)).
  returned: when O(flag) is given
  type: dict
  sample: {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"}
rollout:
  description: The flag's rollout after the change, when its targeting is one two-bucket C(fractional).
  returned: when O(flag) is given
  type: dict
  sample: {"variant": "on", "percentage": 10.0, "rest": "off"}
flags:
  description: The keys of the flags in the file after the change.
  returned: always
  type: list
  elements: str
"""

import copy

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.sovereign.mlops.plugins.module_utils._files import read_text, write_atomic
from ansible_collections.sovereign.mlops.plugins.module_utils._flagd import (
    HAS_JSONSCHEMA,
    JSONSCHEMA_IMPORT_ERROR,
    FlagFileError,
    build,
    check,
    parse,
    render,
    rollout,
    set_rollout,
)


def changed_flag(doc, params):
    """``doc`` with the one flag changed as asked (a copy)."""
    key = params["flag"]
    flags = doc["flags"]
    if key not in flags:
        raise FlagFileError(
            f"flag {key!r} is not in {params['path']} (it has: {', '.join(sorted(flags)) or 'none'}); add it to "
            f"feature_flags_definitions first"
        )
    new = copy.deepcopy(doc)
    flag = new["flags"][key]
    if params["enabled"] is not None:
        flag["state"] = "ENABLED" if params["enabled"] else "DISABLED"
    if params["default_variant"] is not None:
        if params["default_variant"] not in flag["variants"]:
            raise FlagFileError(
                f"flag {key!r}: default_variant {params['default_variant']!r} is not one of its variants "
                f"{sorted(flag['variants'])}"
            )
        flag["defaultVariant"] = params["default_variant"]
    if params["percentage"] is not None:
        set_rollout(flag, key, params["percentage"], params["rollout_variant"])
    elif params["rollout_variant"] is not None:
        raise FlagFileError("rollout_variant needs percentage")
    return new


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "flag": {"type": "str"},
            "enabled": {"type": "bool"},
            "default_variant": {"type": "str"},
            "percentage": {"type": "int"},
            "rollout_variant": {"type": "str"},
            "definitions": {"type": "dict"},
            "metadata": {"type": "dict"},
            "owner": {"type": "str"},
            "group": {"type": "str"},
            "mode": {"type": "str"},
        },
        mutually_exclusive=[["flag", "definitions"]],
        required_one_of=[["flag", "definitions"]],
        required_by={"metadata": "definitions"},
        supports_check_mode=True,
    )
    p = module.params
    if not HAS_JSONSCHEMA:
        module.fail_json(msg=missing_required_lib("jsonschema (Debian: python3-jsonschema)"),
                         exception=str(JSONSCHEMA_IMPORT_ERROR))  # fmt: skip
    path = p["path"]
    if p["percentage"] is not None and not 0 <= p["percentage"] <= 100:
        module.fail_json(msg=f"percentage {p['percentage']} is outside 0-100; give a whole percent from 0 to 100")
    if p["flag"] is not None and all(p[k] is None for k in ("enabled", "default_variant", "percentage")):
        module.fail_json(msg=f"flag {p['flag']!r}: nothing to change; give enabled, default_variant or percentage")
    mode = None
    if p["mode"] is not None:
        try:
            mode = int(p["mode"], 8)
        except ValueError:
            module.fail_json(msg=f"mode {p['mode']!r} is not an octal mode such as '0640'")
    try:
        before_text = read_text(path)
        if p["definitions"] is not None:
            after = build(p["definitions"], p["metadata"])
            check(after, "the flag definitions given")
        else:
            if before_text is None:
                raise FlagFileError(
                    f"{path} does not exist; the feature_flags role writes it (feature_flags_definitions)"
                )
            after = changed_flag(parse(before_text, path), p)
            check(after, f"{path} after the change")
    except FlagFileError as exc:
        module.fail_json(msg=str(exc))
    after_text = render(after)
    changed = after_text != before_text
    result = {"changed": changed, "flags": sorted(after["flags"])}
    if p["flag"] is not None:
        flag = after["flags"][p["flag"]]
        current = rollout(flag)
        result["flag"] = flag
        result["rollout"] = {"variant": current[0], "percentage": current[1], "rest": current[2]} if current else None
    if module._diff:
        result["diff"] = {"before": before_text or "", "after": after_text, "before_header": path, "after_header": path}
    if changed and not module.check_mode:
        try:
            write_atomic(path, after_text, mode=mode, owner=p["owner"], group=p["group"])
        except (OSError, KeyError) as exc:
            module.fail_json(msg=f"could not write {path}: {exc}")
    # Mode and owner of an unchanged file: the role asks for them; fix them in place (no content change).
    if not changed and (mode is not None or p["owner"] or p["group"]):
        file_args = {"path": path, "mode": p["mode"], "owner": p["owner"], "group": p["group"]}
        result["changed"] = module.set_fs_attributes_if_different(
            module.load_file_common_arguments(file_args), False, diff=None
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
