# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to the sovereign.mlops collection (leading underscore): it may change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # The `contract` option of the modules that read the host contract (docs/architecture.md, "Host contract").
    # Each option that defaults from it says so in its own description, with the contract key it reads.
    DOCUMENTATION = r"""
options:
  contract:
    description:
      - The host contract, the fact C(ansible_local.sovereign) that the roles publish with
        M(sovereign.mlops.host_contract) (see C(docs/architecture.md), section "Host contract").
      - The options whose description names O(contract) take their default from it when not given; an option
        given explicitly wins.
    type: dict
"""
