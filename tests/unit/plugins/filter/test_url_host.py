# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""plugins/filter/url_host.py and its one home, module_utils/_host_contract.url_host."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ansible_collections.sovereign.mlops.plugins.filter.url_host import FilterModule
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import url_host

ROOT = Path(__file__).resolve().parents[4]

CASES = [
    ("10.0.0.5", "10.0.0.5"),
    ("127.0.0.1", "127.0.0.1"),
    ("infer-01.internal", "infer-01.internal"),
    ("::1", "[::1]"),
    ("fd00::5", "[fd00::5]"),
    ("::", "[::]"),
    ("[fd00::5]", "[fd00::5]"),  # already bracketed: not twice
    ("fe80::1%eth0", "[fe80::1%eth0]"),
]


@pytest.mark.parametrize(("address", "expected"), CASES)
def test_url_host(address, expected):
    assert url_host(address) == expected


@pytest.mark.parametrize(("address", "expected"), CASES)
def test_the_filter_is_the_module_utils_function(address, expected):
    assert FilterModule().filters()["url_host"](address) == expected


# Jinja that brackets an address by hand: "('[' ~ x ~ ']') if ':' in x".
HAND_BRACKETS = re.compile(r"""['"]\[['"]\s*~\s*[\w.|() ]+~\s*['"]\]['"]""")
# A URL made of an address variable as it is (an IPv6 listen address would make it "http://::1:80").
BARE_ADDRESS_URL = re.compile(r"://\{\{\s*[\w.]*(address|bind)\s*\}\}")


def test_no_role_brackets_an_address_by_hand():
    """Every role goes through the filter: a new hand-written copy is a second home for the rule, and a URL made
    of a bare address variable breaks on an IPv6 address."""
    found = []
    for path in sorted((ROOT / "roles").rglob("*")):
        if path.suffix in (".yml", ".yaml", ".j2") and path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if HAND_BRACKETS.search(line) or BARE_ADDRESS_URL.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "use `| sovereign.mlops.url_host`:\n" + "\n".join(found)


def test_the_guard_sees_a_hand_written_copy():
    assert HAND_BRACKETS.search("""x: "{{ ('[' ~ prometheus_listen_address ~ ']') if ':' in a else a }}" """)
    assert not HAND_BRACKETS.search("""'field': kind ~ '[' ~ loop.index0 ~ '].' ~ key""")
    assert BARE_ADDRESS_URL.search('url: "http://{{ grafana_listen_address }}:{{ grafana_port }}/api/health"')
    assert not BARE_ADDRESS_URL.search('url: "http://{{ grafana_listen_address | sovereign.mlops.url_host }}:3000"')
