# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Files on a managed host: the one place the collection reads, writes, locks and parses them.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

* :func:`read_text` / :func:`read_bytes`: a file's content, ``None`` when it does not exist.
* :func:`write_atomic`: replace a file so that a reader, or a crash, sees the old content or the new one,
  never a torn one: a temporary file in the same directory, fsync'd, given the mode and owner of the file it
  replaces (or those asked for), renamed over the path, then the directory fsync'd so the rename survives a
  power loss.
* :class:`FileLock` / :func:`lock_fd`: an exclusive ``flock`` with a timeout. The kernel drops it when its
  holder dies, so a killed run never leaves it held.
* Map files (HAProxy's ``<key> <value>`` lines) and env files (``KEY=VALUE`` as systemd's ``EnvironmentFile=``
  reads them, which is also what the roles' templates and the runtime write).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import tempfile
import time

# -- reading -------------------------------------------------------------------------------------------------------


def read_bytes(path):
    """Content of ``path`` as bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def read_text(path, encoding="utf-8"):
    """Content of ``path`` as text, or None when it does not exist. Other errors (a directory, no permission)
    raise: they are not "absent", and the caller says what to fix."""
    try:
        with open(path, encoding=encoding) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


# -- atomic write ----------------------------------------------------------------------------------------------------


def fsync_dir(path):
    """fsync a directory, so the entries renamed or created in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _account_id(name, lookup):
    """A numeric id as is (int or digits), a name through ``lookup`` (KeyError when unknown), None as None."""
    if name is None or isinstance(name, int):
        return name
    return int(name) if str(name).isdigit() else lookup(name)


def write_atomic(path, content, mode=None, owner=None, group=None, encoding="utf-8"):
    """Replace ``path`` with ``content`` (str or bytes) atomically.

    Mode, owner and group: those given (mode an int, owner/group names or ids), else those of the file being
    replaced, else 0644 and the writing process's own. Raises OSError (the old file is then untouched and no
    temporary file is left behind), KeyError for an unknown owner or group name.
    """
    data = content.encode(encoding) if isinstance(content, str) else content
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"write_atomic: content must be str or bytes, got {type(content).__name__}")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    uid = _account_id(owner, lambda n: pwd.getpwnam(n).pw_uid)
    gid = _account_id(group, lambda n: grp.getgrnam(n).gr_gid)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        current = None
    if mode is None:
        mode = (current.st_mode & 0o7777) if current is not None else 0o644
    if current is not None:
        uid = current.st_uid if uid is None else uid
        gid = current.st_gid if gid is None else gid
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # Owner before mode: chown clears setuid/setgid bits.
        if (uid is not None and uid != os.getuid()) or (gid is not None and gid != os.getgid()):
            os.chown(tmp_path, -1 if uid is None else uid, -1 if gid is None else gid)
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    fsync_dir(directory)


# -- flock -------------------------------------------------------------------------------------------------------


class LockTimeout(Exception):
    """The lock stayed held by someone else for the whole wait."""

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        super().__init__(f"{path} stayed locked by another process for {timeout}s")


def lock_fd(fd, timeout=None, poll=0.05, path="", shared=False):
    """``flock`` an open file descriptor: wait forever (``timeout`` None) or up to ``timeout`` seconds, then
    raise :class:`LockTimeout` (the descriptor stays open: the caller owns it)."""
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if timeout is None:
        fcntl.flock(fd, kind)
        return
    deadline = time.monotonic() + float(timeout)
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(path, timeout) from None
            time.sleep(poll)


class FileLock:
    """``with FileLock(path, timeout):`` an exclusive flock on ``path`` (created with ``mode``; its directory too
    when ``make_dirs``). The file is never removed: removing a locked file lets two processes lock two inodes."""

    def __init__(self, path, timeout=60.0, mode=0o644, poll=0.05, make_dirs=True):
        self.path = path
        self.timeout = timeout
        self.mode = mode
        self.poll = poll
        self.make_dirs = make_dirs
        self.fd = None

    def acquire(self):
        if self.make_dirs:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), 0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, self.mode)
        try:
            lock_fd(fd, self.timeout, self.poll, self.path)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False


# -- map files (HAProxy ``map()`` files) -------------------------------------------------------------------------


def parse_map(text):
    """``(key, value)`` pairs of a map file's text, in order, as HAProxy loads them: blank lines and lines
    starting with ``#`` are skipped, the key is the first word and the value the rest of the line, stripped."""
    entries = []
    for line in (text or "").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        entries.append((parts[0], parts[1].strip() if len(parts) > 1 else ""))
    return entries


def map_value(text, key):
    """Value of ``key`` in a map file's text (the last one wins, as in a lookup), or None."""
    values = [v for k, v in parse_map(text) if k == key]
    return values[-1] if values else None


def render_map(text, key, value):
    """Map file text with ``key`` set to ``value``: the first ``key`` line replaced, later duplicates dropped,
    comments and other keys kept; appended when absent."""
    out = []
    done = False
    for line in (text or "").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped.split(None, 1)[0] == key:
            if not done:
                out.append(f"{key} {value}")
                done = True
            continue
        out.append(line)
    if not done:
        out.append(f"{key} {value}")
    return "\n".join(out) + "\n"


# -- env files (systemd EnvironmentFile=) ------------------------------------------------------------------------

# What a backslash escapes inside double quotes (systemd's SHELL_NEED_ESCAPE); before anything else it stays.
_DQ_ESCAPES = '"\\`$'


def parse_env(text):
    """{KEY: value} of an env file, read the way systemd reads an ``EnvironmentFile=`` (the last KEY wins).

    Lines starting with ``#`` or ``;`` are comments; an optional ``export`` before the key is ignored (dotenv).
    Values: unquoted (surrounding blanks stripped, ``\\x`` is ``x``), ``'single'`` (verbatim) or
    ``"double"`` (``\\"``, ``\\\\``, ``\\$``, ``\\``` unescaped, other backslashes kept); quoted parts may
    span lines and be concatenated with unquoted ones; a backslash at the end of a line continues it.
    A line without ``=`` is ignored, as systemd does.
    """
    out = {}
    key = []
    value = []
    state = "pre_key"
    last_kept = 0  # length of value up to its last character that trailing-blank stripping keeps

    def push():
        name = "".join(key).strip()
        if name.startswith("export ") or name.startswith("export\t"):
            name = name[len("export") :].strip()
        if name:
            out[name] = "".join(value[:last_kept])

    for char in text or "":
        if state == "pre_key":
            if char in "#;":
                state = "comment"
            elif not char.isspace():
                state, key, value, last_kept = "key", [char], [], 0
        elif state == "key":
            if char == "\n":
                state = "pre_key"  # no '=': not an assignment
            elif char == "=":
                state = "pre_value"
            else:
                key.append(char)
        elif state == "pre_value":
            if char == "\n":
                push()
                state = "pre_key"
            elif char == "'":
                state = "single"
            elif char == '"':
                state = "double"
            elif char == "\\":
                state = "value_escape"
            elif not char.isspace():
                value.append(char)
                last_kept = len(value)
                state = "value"
        elif state == "value":
            if char == "\n":
                push()
                state = "pre_key"
            elif char == "\\":
                state = "value_escape"
            else:
                value.append(char)
                if not char.isspace():
                    last_kept = len(value)
        elif state == "value_escape":
            if char != "\n":  # backslash-newline: the value goes on on the next line
                value.append(char)
                last_kept = len(value)
            state = "value"
        elif state == "single":
            if char == "'":
                state = "pre_value"
            else:
                value.append(char)
                last_kept = len(value)
        elif state == "double":
            if char == '"':
                state = "pre_value"
            elif char == "\\":
                state = "double_escape"
            else:
                value.append(char)
                last_kept = len(value)
        elif state == "double_escape":
            if char in _DQ_ESCAPES:
                value.append(char)
            elif char != "\n":
                value.extend(("\\", char))
            last_kept = len(value)
            state = "double"
        elif state == "comment":
            if char == "\\":
                state = "comment_escape"
            elif char == "\n":
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment"
    # The last line may lack its newline; an unterminated quote runs to the end of the file (systemd keeps it).
    if state not in ("pre_key", "key", "comment", "comment_escape"):
        push()
    return out


def quote_env(value):
    """``value`` as a double-quoted env file value that :func:`parse_env` and systemd read back verbatim."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError("an env file value cannot hold a newline")
    return '"' + "".join("\\" + c if c in _DQ_ESCAPES else c for c in text) + '"'


def read_env(path):
    """{KEY: value} of the env file at ``path``, or None when it does not exist."""
    text = read_text(path)
    return None if text is None else parse_env(text)
