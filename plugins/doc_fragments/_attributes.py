# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to the sovereign.mlops collection (leading underscore): it may change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # The attributes every module of the collection declares. A module adds only what differs between modules:
    # the support (and details) of check_mode and diff_mode. ansible-doc merges each attribute's keys, so
    # `attributes: {check_mode: {support: full}}` in a module completes the description given here.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
    details:
      - Linux hosts, with Python 3 (no module of this collection runs on Python 2). The tests run on Debian 12.
"""

    # With DOCUMENTATION, for a module that changes nothing on the target (a probe, a wait, facts).
    READ_ONLY = r"""
options: {}
attributes:
  check_mode:
    support: full
    details:
      - The module only reads (requests and files that change nothing on the target), so it runs the same in check
        mode and returns the same result. C(changed) is always false.
  diff_mode:
    support: N/A
    details:
      - The module changes nothing.
"""
