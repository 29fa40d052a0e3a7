# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to the sovereign.mlops collection (leading underscore): it may change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # Options that name a part of the sovereign.mlops.traffic_switch role's HAProxy on the host, for every module
    # that reads or writes it (with the _host_contract fragment). They have no default in the argument spec: the
    # value comes from the module's `contract` option (the host contract) when not given, else the role's default
    # named here. ansible-doc merges an option a module also writes in its own DOCUMENTATION key by key over this
    # one (the module's keys win).

    # The live-color entry: sovereign.mlops.traffic_switch_map_file and traffic_switch_map_key.
    DOCUMENTATION = r"""
options:
  map_file:
    description:
      - The traffic switch's live-color map file, exactly as written in C(haproxy.cfg)'s C(map()) converter (the
        C(sovereign.mlops.traffic_switch) role's C(traffic_switch_map_file)).
      - Default from O(contract) (C(traffic_switch.map_file)), else C(/etc/haproxy/sovereign/live.map).
    type: path
  map_key:
    description:
      - The key of the live-color entry in O(map_file) (the role's C(traffic_switch_map_key)).
      - Default from O(contract) (C(traffic_switch.map_key)), else C(live).
    type: str
"""

    # HAProxy's runtime API: sovereign.mlops.traffic_switch_admin_socket.
    ADMIN_SOCKET = r"""
options:
  admin_socket:
    description:
      - Path of HAProxy's admin socket (C(stats socket ... level admin)), the C(sovereign.mlops.traffic_switch)
        role's C(traffic_switch_admin_socket).
      - Default from O(contract) (C(traffic_switch.admin_socket)), else C(/run/haproxy/admin.sock).
    type: path
"""
