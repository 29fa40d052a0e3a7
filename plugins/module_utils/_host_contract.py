# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The host contract: one JSON local fact per host (``/etc/ansible/facts.d/sovereign.fact``, read back as
``ansible_local.sovereign``) where the roles publish the paths, ports and sockets they create, and where every
other part reads them. The schema is in docs/architecture.md, section "Host contract".

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

Written by the ``host_contract`` module; read by the modules that take a ``contract`` option
(``blue_green_switch``, ``deploy_ledger``, ``smoke_test``) to default their paths and ports.
"""

from __future__ import annotations

import json
import re

DEFAULT_PATH = "/etc/ansible/facts.d/sovereign.fact"
VERSION = 1
# Top-level keys that are not sections.
RESERVED = ("version", "metrics")
SECTION_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ENDPOINT_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
ENDPOINT_KEYS = ("job", "address", "port", "path", "scheme", "auth", "labels", "published_by")
LOCAL = ("0.0.0.0", "::", "")


class ContractError(Exception):
    """Bad input or a bad contract file; ``str(exc)`` names the problem and the fix."""


# -- parsing and rendering -------------------------------------------------------------------------------------


def parse(text, path=DEFAULT_PATH):
    """The contract in ``text`` (None or empty: an empty contract). Raises ContractError when it is not a JSON
    object, naming the fix (it is only ever written by host_contract, so a bad file was edited by hand)."""
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ContractError(
            f"{path} is not valid JSON ({exc}). It is written only by sovereign.mlops.host_contract: remove it and "
            "re-run the roles of this host (each publishes its section again)."
        ) from None
    if not isinstance(data, dict):
        raise ContractError(
            f"{path} holds a JSON {type(data).__name__}, not an object: remove it and re-run the roles."
        )
    return data


def render(contract):
    """The file's text: stable (sorted keys), so an unchanged contract is an unchanged file."""
    return json.dumps(contract, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -- validation --------------------------------------------------------------------------------------------------


def check_section(name):
    if not isinstance(name, str) or not SECTION_RE.match(name) or name in RESERVED:
        raise ContractError(
            f"section must be a lower-case identifier (letters, digits, _) other than {', '.join(RESERVED)}; got "
            f"{name!r}. Use the role's name, e.g. section: traffic_switch."
        )


def _json_safe(value, where):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ContractError(
            f"{where} cannot be stored as JSON ({exc}); give strings, numbers, lists and mappings."
        ) from None


def normalize_endpoint(name, spec, section):
    """One metrics endpoint with every key filled in, or ContractError naming the bad field."""
    where = f"metrics.{name}"
    if not isinstance(name, str) or not ENDPOINT_RE.match(name):
        raise ContractError(f"metrics: endpoint name {name!r} must be an identifier (letters, digits, _).")
    if not isinstance(spec, dict):
        raise ContractError(f"{where} must be a mapping with address and port, got {spec!r}.")
    unknown = sorted(set(spec) - set(ENDPOINT_KEYS) - {"published_by"})
    if unknown:
        raise ContractError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(ENDPOINT_KEYS[:-1])}.")
    address = spec.get("address")
    if not isinstance(address, str) or not address or any(c.isspace() for c in address):
        raise ContractError(f"{where}.address must be a host name or IP address, got {address!r}.")
    try:
        port = int(spec.get("port"))
    except (TypeError, ValueError):
        raise ContractError(f"{where}.port must be a TCP port (1-65535), got {spec.get('port')!r}.") from None
    if isinstance(spec.get("port"), bool) or not 0 < port < 65536 or str(spec.get("port")).strip() != str(port):
        raise ContractError(f"{where}.port must be a TCP port (1-65535), got {spec.get('port')!r}.")
    path = spec.get("path", "/metrics")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ContractError(f"{where}.path must start with '/', got {path!r}.")
    scheme = spec.get("scheme", "http")
    if scheme not in ("http", "https"):
        raise ContractError(f"{where}.scheme must be http or https, got {scheme!r}.")
    auth = spec.get("auth", False)
    if not isinstance(auth, bool):
        raise ContractError(f"{where}.auth must be true or false, got {auth!r}.")
    labels = spec.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and ENDPOINT_RE.match(k) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ContractError(f"{where}.labels must map label names to strings, got {labels!r}.")
    job = spec.get("job", name)
    if not isinstance(job, str) or not ENDPOINT_RE.match(job):
        raise ContractError(f"{where}.job must be a Prometheus job name (letters, digits, _), got {job!r}.")
    return dict(
        job=job,
        address=address,
        port=port,
        path=path,
        scheme=scheme,
        auth=auth,
        labels=dict(labels),
        published_by=section,
    )


def publish(contract, section, data=None, metrics=None, state="present"):
    """A new contract: ``contract`` with ``section``'s data replaced by ``data`` (unless None) and the metrics
    endpoints published by ``section`` replaced by ``metrics`` (unless None); ``state=absent`` removes both.
    ``contract`` is not modified. Raises ContractError for bad input, or when an endpoint name is already
    published by another section."""
    check_section(section)
    new = json.loads(json.dumps(contract))  # a deep copy of JSON data
    new["version"] = VERSION
    if state == "absent":
        new.pop(section, None)
        data, metrics = None, {}
    elif data is not None:
        if not isinstance(data, dict):
            raise ContractError(f"data must be a mapping (the whole {section} section), got {type(data).__name__}.")
        _json_safe(data, "data")
        new[section] = data
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise ContractError(f"metrics must map endpoint names to endpoints, got {type(metrics).__name__}.")
        current = new.get("metrics") if isinstance(new.get("metrics"), dict) else {}
        for name in metrics:
            owner = (current.get(name) or {}).get("published_by")
            if owner not in (None, section):
                raise ContractError(
                    f"metrics.{name} is already published by section {owner}: give this endpoint another name."
                )
        kept = {k: v for k, v in current.items() if not (isinstance(v, dict) and v.get("published_by") == section)}
        kept.update({name: normalize_endpoint(name, spec, section) for name, spec in metrics.items()})
        new["metrics"] = kept
    return new


# -- reading, for modules with a ``contract`` option ---------------------------------------------------------------


def get(contract, *keys):
    """``contract[k1][k2]...``, None when any level is missing or not a mapping."""
    value = contract
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def local_address(address):
    """The address a client on the same host uses for a listener bound to ``address`` (a wildcard: loopback)."""
    if address in LOCAL:
        return "127.0.0.1"
    return address


def url_host(address):
    """``address`` as the host part of a URL or a ``host:port`` pair: an IPv6 literal in brackets (RFC 3986),
    anything else (IPv4, a name, an address already bracketed) as it is. The one copy: the roles reach it
    through the ``sovereign.mlops.url_host`` filter."""
    address = str(address)
    if ":" in address and not address.startswith("["):
        return f"[{address}]"
    return address


def http_url(address, port):
    return f"http://{url_host(local_address(str(address)))}:{int(port)}"


def runtime_colors(contract):
    """{color: {host, port}} of the runtime section (None without one)."""
    colors = get(contract, "runtime", "colors")
    if not isinstance(colors, dict) or not colors:
        return None
    return {
        color: dict(host=local_address(str(spec.get("host") or "127.0.0.1")), port=spec.get("port"))
        for color, spec in colors.items()
        if isinstance(spec, dict)
    }


def resolve(params, contract, defaults):
    """Fill in each option left unset (None) in ``params``: from ``contract`` via ``defaults[name][0]`` (a tuple
    of keys, or a callable taking the contract) when it has a value there, else ``defaults[name][1]``.
    Returns {name: 'option' | 'contract' | 'default'}: where each value came from."""
    source = {}
    for name, (where, fallback) in defaults.items():
        if params.get(name) is not None:
            source[name] = "option"
            continue
        value = None
        if contract:
            value = where(contract) if callable(where) else get(contract, *where)
        if value is not None:
            params[name] = value
            source[name] = "contract"
        else:
            params[name] = fallback
            source[name] = "default"
    return source
