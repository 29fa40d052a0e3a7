# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to the sovereign.mlops collection (leading underscore): it may change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # Options that name a part of the sovereign.mlops.traffic_switch role's HAProxy on the host, for every module
    # that reads or writes it. The defaults are the role's defaults; the modules' argument specs must keep them.
    # A module may override one key of an option (a default, a description) in its own DOCUMENTATION.

    # The live-color entry: sovereign.mlops.traffic_switch_map_file and traffic_switch_map_key.
    DOCUMENTATION = r"""
options:
  map_file:
    description:
      - The traffic switch's live-color map file, exactly as written in C(haproxy.cfg)'s C(map()) converter (the
        C(sovereign.mlops.traffic_switch) role's C(traffic_switch_map_file)).
    type: path
    default: /etc/haproxy/sovereign/live.map
  map_key:
    description:
      - The key of the live-color entry in O(map_file) (the role's C(traffic_switch_map_key)).
    type: str
    default: live
"""

    # HAProxy's runtime API: sovereign.mlops.traffic_switch_admin_socket.
    ADMIN_SOCKET = r"""
options:
  admin_socket:
    description:
      - Path of HAProxy's admin socket (C(stats socket ... level admin)), the C(sovereign.mlops.traffic_switch)
        role's C(traffic_switch_admin_socket).
    type: path
    default: /run/haproxy/admin.sock
"""
