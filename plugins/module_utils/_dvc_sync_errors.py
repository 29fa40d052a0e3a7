# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The errors of ``sovereign.mlops.dvc_sync``: what DVC, SSH and the OS raise, translated into one message that names
the problem and the fix.

Private to the sovereign.mlops collection (leading underscore): no stability promise to anyone else.

* :class:`SyncError`: raised where the problem is known (the dest side, the DVC adapter); reported as it is.
* :func:`connection_error`: finds, in an exception's chain, the transport error that says the remote could not be
  reached or refused the login (DVC wraps them), so that is what the user is told, never "data missing".
* :func:`describe_error`: the message for any other exception, one row of :data:`ERROR_MESSAGES` per kind.
"""

from __future__ import annotations

import errno
import re
import socket

try:
    import dvc.config
    import dvc.exceptions
    import dvc.scm

    HAS_DVC = True
except ImportError:  # the module reports it (missing_required_lib) before anything here is used
    HAS_DVC = False


class SyncError(Exception):
    """An error the module reports with fail_json: ``str(exc)`` names the problem and the fix."""


# -- a remote that cannot be reached -------------------------------------------------------------------------------

NETWORK_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ETIMEDOUT, errno.ECONNREFUSED}


def connection_error(exc):
    """The error in ``exc``'s chain that says the remote could not be reached or refused the login, else None.

    DVC wraps transport errors: a directory listing it cannot load raises DataIndexDirError (from the
    ConnectionRefusedError, socket.gaierror or asyncssh error below it), so the chain is searched. SFTP status errors
    (no such file) are not connection errors: they mean the data is missing.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
            return exc
        if isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS:
            return exc
        cls = type(exc)
        if cls.__module__.startswith("asyncssh") and any(
            c.__name__ in ("DisconnectError", "ChannelOpenError", "KeyImportError") for c in cls.__mro__
        ):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def connection_hint(exc):
    """What to check, for a connection error found by :func:`connection_error`."""
    name = type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve from this host; check the host in the remote's url"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
        return "no route to the host from this host; check the url's host and that the host is up"
    if isinstance(exc, ConnectionRefusedError):
        return "nothing accepts connections on that host and port; check the url's host and port (remote_config port)"
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return (
            "the host did not answer in time; check that it is up and reachable (firewall), or raise "
            "remote_config timeout"
        )
    if name == "PermissionDenied":
        return (
            "the server refused the login; check the user (url or remote_config user) and that the key "
            "(remote_config keyfile) is authorized for that user on the remote host"
        )
    if name == "HostKeyNotVerifiable":
        return "the host key of the remote is not trusted; add it to ~/.ssh/known_hosts of the user the module runs as"
    if name == "KeyImportError":
        return "the private key (remote_config keyfile) cannot be read; check that it is a valid, unencrypted key"
    return "check the url, port, user and credentials of the remote and that it is reachable from this host"


def unreachable(remote, exc):
    """The SyncError for connection error ``exc`` of ``remote`` (its description, as TrackedData.describe_remote)."""
    return SyncError(f"cannot connect to {remote}: {type(exc).__name__}: {exc}; {connection_hint(exc)}")


def redact_url(url):
    """A URL for a message, without a password in its userinfo."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url) if isinstance(url, str) else url


# -- every other error ---------------------------------------------------------------------------------------------

# (exception classes, message): the first row whose classes match wins, so a subclass comes before its base.
# Placeholders: {repo} {rev} {remote} {dest} (the module's parameters), {at} ("<repo> at rev '<rev or default>'"),
# {exc} (the exception's own text).
ERROR_MESSAGES = []
if HAS_DVC:
    ERROR_MESSAGES += [
        (
            dvc.scm.RevError,
            "unknown git revision '{rev}' in {repo}: give a branch, tag or commit sha that exists there ({exc})",
        ),
        (
            dvc.scm.CloneError,
            "cannot clone {repo}: check the URL and the git credentials of the target host, or give the path of a "
            "local checkout ({exc})",
        ),
        (dvc.exceptions.NotDvcRepoError, "{repo} is not a DVC repository (no .dvc directory): {exc}"),
        (
            dvc.config.RemoteNotFoundError,
            "DVC remote '{remote}' is not defined in {at}: use a remote name from its .dvc/config, or define it for "
            "this run with remote_config: {{url: ...}} ({exc})",
        ),
        (
            dvc.config.NoRemoteError,
            "{at} has no default DVC remote: give remote (and remote_config with its url if the repository does not "
            "define it) ({exc})",
        ),
        (dvc.config.ConfigError, "invalid DVC remote configuration (remote, remote_config) for {at}: {exc}"),
    ]
ERROR_MESSAGES += [
    (PermissionError, "dest {dest} is not writable: {exc}; run with become or fix the permissions"),
    ((NotADirectoryError, FileExistsError), "dest {dest} cannot be created: {exc}; choose a dest under a directory"),
]
if HAS_DVC:
    ERROR_MESSAGES.append((dvc.exceptions.DvcException, "DVC failed for {at}: {exc}"))


def describe_error(exc, params):
    """The message for an exception nothing else explained, from the module's ``params``."""
    fields = dict(
        repo=params["repo"],
        rev=params["rev"],
        remote=params["remote"],
        dest=params["dest"],
        at=f"{params['repo']} at rev '{params['rev'] or 'default'}'",
        exc=exc,
    )
    for classes, message in ERROR_MESSAGES:
        if isinstance(exc, classes):
            return message.format(**fields)
    return "dvc_sync failed for {at}: {name}: {exc}".format(name=type(exc).__name__, **fields)


def explain(exc, params, describe_remote=None):
    """The message for an exception a run did not expect.

    ``describe_remote`` (a callable, given once the repository is open) names the remote: a connection error in the
    chain is then reported as such, with the remote's name and url.
    """
    conn = connection_error(exc) if describe_remote is not None else None
    if conn is not None:
        return str(unreachable(describe_remote(), conn))
    return describe_error(exc, params)
