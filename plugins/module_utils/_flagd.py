# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""flagd flag files (OpenFeature's flagd flag-definition format): the schema they are checked against, the checks
JSON Schema cannot say, and the edits the feature_flag module makes.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

The schema (:data:`SCHEMA`, JSON Schema draft-07) is this collection's transcription of flagd's flag-definition
schema v0 (``https://flagd.dev/schema/v0/flags.json`` with its ``targeting.json``): flagd publishes those files in
its flagd-schemas repository and on flagd.dev only, in no package of PyPI or npm (docs/adr/1441). It is the same
shape, stricter where this collection writes files: every flag has ``state`` and ``variants``; variants of one flag
share one type (boolean, string, number or object); ``fractional`` buckets are ``[variant, integer weight >= 0]``
after an optional bucketing expression. What JSON Schema cannot say, :func:`problems` adds: the default variant
and every variant a ``fractional`` names exist, and the weights do not all sum to zero.
"""

from __future__ import annotations

import copy
import json

try:
    import jsonschema

    HAS_JSONSCHEMA = True
    JSONSCHEMA_IMPORT_ERROR = None
except ImportError as _exc:  # the module says which package to install
    jsonschema = None
    HAS_JSONSCHEMA = False
    JSONSCHEMA_IMPORT_ERROR = _exc

SCHEMA_URL = "https://flagd.dev/schema/v0/flags.json"

_SCALAR = {"type": ["string", "number", "boolean", "null"]}


def _variants(kind):
    return {"type": "object", "minProperties": 1, "propertyNames": {"minLength": 1}, "additionalProperties": kind}


SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "flagd flag definitions (v0), as sovereign.mlops checks them",
    "type": "object",
    "required": ["flags"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"},
        "metadata": {"$ref": "#/definitions/metadata"},
        "flags": {
            "type": "object",
            "propertyNames": {"minLength": 1},
            "additionalProperties": {"$ref": "#/definitions/flag"},
        },
        "$evaluators": {"type": "object", "additionalProperties": {"$ref": "#/definitions/rule"}},
    },
    "definitions": {
        "metadata": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        "flag": {
            "type": "object",
            "required": ["state", "variants"],
            "additionalProperties": False,
            "properties": {
                "state": {"enum": ["ENABLED", "DISABLED"]},
                "variants": {
                    "anyOf": [
                        _variants({"type": "boolean"}),
                        _variants({"type": "string"}),
                        _variants({"type": "number"}),
                        _variants({"type": "object"}),
                    ]
                },
                "defaultVariant": {"type": ["string", "null"], "minLength": 1},
                "targeting": {"anyOf": [{"type": "object", "maxProperties": 0}, {"$ref": "#/definitions/operation"}]},
                "metadata": {"$ref": "#/definitions/metadata"},
            },
        },
        # JsonLogic: a value, a list of rules, or one operator applied to its arguments.
        "rule": {
            "anyOf": [
                _SCALAR,
                {"type": "array", "items": {"$ref": "#/definitions/rule"}},
                {"$ref": "#/definitions/operation"},
            ]
        },
        "operation": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "fractional": {"$ref": "#/definitions/fractional"},
                "var": {"anyOf": [{"type": "string"}, {"type": "array"}]},
                "$ref": {"type": "string"},
            },
            "additionalProperties": {"$ref": "#/definitions/rule"},
        },
        "fractional": {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [{"$ref": "#/definitions/bucket"}, {"$ref": "#/definitions/operation"}, {"type": "string"}]
            },
        },
        "bucket": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": [{"type": "string", "minLength": 1}, {"type": "integer", "minimum": 0}],
        },
    },
}


class FlagFileError(Exception):
    """The file or the change is not acceptable; the message names the flag, the place and the fix."""


def schema_errors(doc):
    """The schema's complaints about ``doc``, each as ``<json pointer>: <message>``, best first (empty: valid)."""
    if not HAS_JSONSCHEMA:
        raise FlagFileError("the jsonschema Python package is needed to check flag files")
    validator = jsonschema.Draft7Validator(SCHEMA)
    out = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: (len(list(e.absolute_path)), str(e.message))):
        pointer = "/" + "/".join(str(p) for p in error.absolute_path)
        context = [c.message for c in (error.context or [])][:3]
        out.append(f"{pointer}: {error.message}" + (f" ({'; '.join(context)})" if context else ""))
    return out


def _fractionals(node):
    """Every ``fractional`` argument list in a targeting rule."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "fractional" and isinstance(value, list):
                yield value
            yield from _fractionals(value)
    elif isinstance(node, list):
        for item in node:
            yield from _fractionals(item)


def _buckets(fractional):
    return [b for b in fractional if isinstance(b, list)]


def problems(doc):
    """Schema errors, then what the schema cannot check: named variants exist, weights are not all zero."""
    found = schema_errors(doc)
    if found:
        return found
    for key, flag in sorted(doc["flags"].items()):
        variants = flag["variants"]
        default = flag.get("defaultVariant")
        if default is not None and default not in variants:
            found.append(f"/flags/{key}/defaultVariant: {default!r} is not one of its variants {sorted(variants)}")
        for fractional in _fractionals(flag.get("targeting") or {}):
            buckets = _buckets(fractional)
            for bucket in buckets:
                if bucket[0] not in variants:
                    found.append(f"/flags/{key}/targeting: fractional names {bucket[0]!r}, not one of its variants "
                                 f"{sorted(variants)}")  # fmt: skip
            if buckets and all(len(b) == 2 for b in buckets) and sum(b[1] for b in buckets) == 0:
                found.append(f"/flags/{key}/targeting: fractional weights sum to 0")
    return found


def check(doc, where):
    """Raise FlagFileError naming ``where`` and the problems when ``doc`` is not a valid flag file."""
    found = problems(doc)
    if found:
        raise FlagFileError(f"{where} fails the flagd flag-definition schema: " + "; ".join(found[:5]))


def parse(text, where):
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise FlagFileError(f"{where} is not JSON: {exc}") from None
    check(doc, where)
    return doc


def render(doc):
    """The file's text: sorted keys, two-space indent, a final newline (stable, so unchanged input is unchanged)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def build(flags, metadata=None):
    """A whole flag file from the ``flags`` mapping (flagd format) and optional flag-set ``metadata``."""
    doc = {"$schema": SCHEMA_URL, "flags": copy.deepcopy(flags or {})}
    if metadata:
        doc["metadata"] = copy.deepcopy(metadata)
    return doc


def rollout(flag):
    """(variant, percentage, other variant) of a flag whose targeting is one top-level two-bucket fractional."""
    targeting = flag.get("targeting") or {}
    fractional = targeting.get("fractional") if len(targeting) == 1 else None
    if not isinstance(fractional, list):
        return None
    buckets = _buckets(fractional)
    if len(buckets) != 2 or any(len(b) != 2 for b in buckets):
        return None
    total = buckets[0][1] + buckets[1][1]
    pct = round(100.0 * buckets[0][1] / total, 2) if total else 0.0
    return buckets[0][0], pct, buckets[1][0]


def set_rollout(flag, key, percentage, variant=None):
    """Give ``variant`` ``percentage`` % of evaluations and the default variant the rest, as a top-level
    ``fractional`` (its bucketing expression kept). Raise FlagFileError when the targeting is something else."""
    targeting = flag.get("targeting") or {}
    current = rollout(flag)
    if targeting and current is None:
        raise FlagFileError(
            f"flag {key!r}: its targeting is not one top-level two-bucket fractional rollout, so a percentage has no "
            f"single meaning there; change its definition (feature_flags_definitions) instead"
        )
    variant = variant or (current[0] if current else None)
    if variant is None:
        raise FlagFileError(
            f"flag {key!r} has no rollout yet: give rollout_variant (one of {sorted(flag['variants'])})"
        )
    if variant not in flag["variants"]:
        raise FlagFileError(f"flag {key!r}: rollout_variant {variant!r} is not one of {sorted(flag['variants'])}")
    rest = current[2] if current and current[0] == variant else flag.get("defaultVariant")
    if rest is None or rest == variant:
        others = sorted(v for v in flag["variants"] if v != variant)
        if not others:
            raise FlagFileError(f"flag {key!r} has only the variant {variant!r}: nothing to roll out against")
        rest = others[0]
    head = [x for x in targeting.get("fractional", []) if not isinstance(x, list)]
    flag["targeting"] = {"fractional": [*head, [variant, int(percentage)], [rest, 100 - int(percentage)]]}
