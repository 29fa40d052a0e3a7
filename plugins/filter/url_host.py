# Copyright: sovereign.mlops contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An address as the host part of a URL: the roles' one way to bracket IPv6 literals."""

from __future__ import annotations

from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import url_host

DOCUMENTATION = r"""
name: url_host
author: sovereign.mlops maintainers
version_added: 0.1.0
short_description: An address as the host part of a URL or of a host:port pair
description:
  - Puts an IPv6 literal in brackets (C(::1) becomes C([::1])), as RFC 3986 requires in a URL and as
    C(host:port) listeners (HAProxy, Prometheus, Alertmanager, Zenoh endpoints) expect.
  - An IPv4 address, a host name or an address already in brackets comes back as it is.
  - The modules and the C(scrape_targets) filter use the same code (C(module_utils/_host_contract.url_host)).
options:
  _input:
    description: The address.
    type: str
    required: true
"""

EXAMPLES = r"""
- name: A URL that works for IPv4 and IPv6 listeners alike
  ansible.builtin.set_fact:
    health_url: "http://{{ listen_address | sovereign.mlops.url_host }}:{{ port }}/health"
"""

RETURN = r"""
_value:
  description: The address, bracketed when it is an IPv6 literal.
  type: str
"""


class FilterModule:
    def filters(self):
        return {"url_host": url_host}
