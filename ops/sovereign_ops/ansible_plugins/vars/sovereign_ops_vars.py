# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""host_group_vars, except that a vault-encrypted vars file is skipped and its path written down.

sovereign-ops enables it (in place of host_group_vars) only when a first `ansible-inventory --list` failed with
"no vault secrets found", that is when no vault password was given at all: a group_vars/all/vault.yml of
secrets the CLI does not need then does not ask for a password. The skipped paths are appended to the file named
by SOVEREIGN_OPS_VAULT_SKIPPED, and sovereign-ops says which files it did not read. See docs/adr/0901.
"""

from __future__ import annotations

import os

from ansible.parsing.vault import is_encrypted_file
from ansible.plugins.vars.host_group_vars import VarsModule as HostGroupVars

DOCUMENTATION = """
    name: sovereign_ops_vars
    short_description: host_group_vars without the vault-encrypted files (sovereign-ops, no vault password)
    description:
        - Loads group_vars/ and host_vars/ as host_group_vars does, skipping vault-encrypted files.
    options:
      stage:
        ini:
          - key: stage
            section: vars_host_group_vars
        env:
          - name: ANSIBLE_VARS_PLUGIN_STAGE
      _valid_extensions:
        default: [".yml", ".yaml", ".json"]
        description: Extensions of vars files.
        env:
          - name: ANSIBLE_YAML_FILENAME_EXT
        ini:
          - key: yaml_valid_extensions
            section: defaults
        type: list
        elements: string
"""


def _encrypted(path):
    try:
        with open(path, "rb") as handle:
            return is_encrypted_file(handle)
    except OSError:
        return False  # host_group_vars reports it


class VarsModule(HostGroupVars):
    REQUIRES_ENABLED = True

    def load_found_files(self, loader, data, found_files):
        readable = []
        for found in found_files:
            if _encrypted(found):
                record = os.environ.get("SOVEREIGN_OPS_VAULT_SKIPPED")
                if record:
                    with open(record, "a", encoding="utf-8") as handle:
                        handle.write(os.path.realpath(found) + "\n")
                continue
            readable.append(found)
        return super().load_found_files(loader, data, readable)
