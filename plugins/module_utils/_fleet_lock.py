# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The fleet deploy lock: one directory, taken with ``mkdir`` by the release flow for the whole fleet.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

``mkdir`` is atomic on POSIX (as kamal does). The directory holds ``info.json`` (holder, since, ttl, token). It
outlives the process that took it; its TTL is what frees it after a killed run. Not to be confused with the
per-host switch lock (``_switch_lock``), an ``flock`` that dies with its holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid

from ansible_collections.sovereign.mlops.plugins.module_utils._files import read_text, write_atomic
from ansible_collections.sovereign.mlops.plugins.module_utils._ledger import epoch_from_iso, iso_from_epoch

LOCK_INFO = "info.json"


def describe_holder(info, age=None):
    holder = info.get("holder") or "an unknown holder"
    since = info.get("since") or "an unknown time"
    text = f"{holder} since {since}"
    if age is not None:
        text += f" ({int(age)}s ago, TTL {info.get('ttl', '?')}s)"
    if info.get("note"):
        text += ": " + str(info["note"])
    return text


def read_lock(path):
    """The lock's info (dict) or None when there is no lock. A lock directory without a readable info.json (a run
    killed between mkdir and write, or one writing it right now) gets holder 'unknown', its since from the
    directory's mtime and a 60 s TTL."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    text = read_text(os.path.join(path, LOCK_INFO))
    info = None
    if text:
        with contextlib.suppress(ValueError):
            info = json.loads(text)
    if not isinstance(info, dict):
        info = dict(holder="unknown (lock without info.json)", since=iso_from_epoch(stat.st_mtime), ttl=60)
    if epoch_from_iso(info.get("since")) is None:
        info["since"] = iso_from_epoch(stat.st_mtime)
    return info


def lock_age(info, now=None):
    now = time.time() if now is None else now
    since = epoch_from_iso(info.get("since"))
    return max(0.0, now - since) if since is not None else float("inf")


def is_stale(info, now=None):
    try:
        ttl = float(info.get("ttl") or 0)
    except (TypeError, ValueError):
        ttl = 0.0
    return lock_age(info, now) > ttl


def try_mkdir_lock(path, holder, ttl, note="", token=None, now=None):
    """Create the lock directory atomically; returns its info, or None when it already exists."""
    now = time.time() if now is None else now
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, 0o755, exist_ok=True)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return None
    info = dict(
        holder=holder,
        since=iso_from_epoch(now),
        ttl=int(ttl),
        token=token or uuid.uuid4().hex,
        note=note or "",
        pid=os.getpid(),
    )
    write_info(path, info)
    return info


def write_info(path, info):
    """(Re)write the lock's info.json atomically (a reader sees the old info or the new, never half)."""
    write_atomic(os.path.join(path, LOCK_INFO), json.dumps(info, sort_keys=True) + "\n", mode=0o644)


def remove_lock(path):
    """Remove the lock directory: rename first (atomic, so a concurrent taker never sees a half-removed lock)."""
    graveyard = f"{path}.removed-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, graveyard)
    except FileNotFoundError:
        return False
    shutil.rmtree(graveyard, ignore_errors=True)
    return True
