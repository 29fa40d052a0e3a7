# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Tables for plugins/module_utils/_dvc_sync_errors.py: which exception becomes which message.

The same messages, from real DVC runs (unknown rev, remote, path; refused port; unknown host), are checked end to end
in tests/unit/plugins/modules/test_dvc_sync.py and, with a real SSH server, in molecule/dvc_sync.
"""

from __future__ import annotations

import errno
import itertools
import re
import socket

import pytest

pytest.importorskip("dvc", reason="dvc is not installed (pip install dvc==3.67.1)")

import dvc.config
import dvc.exceptions
import dvc.scm
from ansible_collections.sovereign.mlops.plugins.module_utils import _dvc_sync_errors as errors


class _Chained(Exception):
    pass


def _chain(*excs):
    for outer, inner in itertools.pairwise(excs):
        outer.__cause__ = inner
    return excs[0]


PARAMS = dict(repo="https://git.example.internal/ml/datasets.git", rev="v2", remote="storage", dest="/srv/ds")

# (exception, parameters over PARAMS, the whole message as a regex): problem first, then the fix.
DESCRIBE = [
    pytest.param(
        dvc.scm.RevError("unknown Git revision 'v9'"),
        dict(rev="v9"),
        r"unknown git revision 'v9' in https://git\.example\.internal/ml/datasets\.git: give a branch, tag or commit "
        r"sha that exists there \(unknown Git revision 'v9'\)",
        id="unknown-rev",
    ),
    pytest.param(
        dvc.scm.CloneError("Failed to clone repo"),
        {},
        r"cannot clone https://\S+: check the URL and the git credentials of the target host, or give the path of a "
        r"local checkout \(Failed to clone repo\)",
        id="clone",
    ),
    pytest.param(
        dvc.exceptions.NotDvcRepoError("you are not inside of a DVC repository"),
        dict(repo="/srv/checkouts/plain"),
        r"/srv/checkouts/plain is not a DVC repository \(no \.dvc directory\): you are not inside of a DVC repository",
        id="not-dvc-repo",
    ),
    pytest.param(
        dvc.config.RemoteNotFoundError("remote 'storage' doesn't exist"),
        {},
        r"DVC remote 'storage' is not defined in https://\S+ at rev 'v2': use a remote name from its \.dvc/config, or "
        r"define it for this run with remote_config: \{url: \.\.\.\} \(config file error: remote 'storage' doesn't "
        r"exist\)",
        id="remote-not-defined",
    ),
    pytest.param(
        dvc.config.NoRemoteError("no remote specified"),
        dict(rev=None, remote=None),
        r"https://\S+ at rev 'default' has no default DVC remote: give remote \(and remote_config with its url if the "
        r"repository does not define it\) \(config file error: no remote specified\)",
        id="no-default-remote",
    ),
    pytest.param(
        dvc.config.ConfigError("unsupported URL type foo://"),
        {},
        r"invalid DVC remote configuration \(remote, remote_config\) for https://\S+ at rev 'v2': config file error: "
        r"unsupported URL type foo://",
        id="config",
    ),
    pytest.param(
        PermissionError(errno.EACCES, "Permission denied", "/srv/.ds.tmp-0a1b2c3d"),
        {},
        r"dest /srv/ds is not writable: \[Errno 13\] Permission denied: '/srv/\.ds\.tmp-0a1b2c3d'; run with become or "
        r"fix the permissions",
        id="permission",
    ),
    pytest.param(
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/srv/a-file/ds"),
        dict(dest="/srv/a-file/ds"),
        r"dest /srv/a-file/ds cannot be created: .*Not a directory.*; choose a dest under a directory",
        id="not-a-directory",
    ),
    pytest.param(
        FileExistsError(errno.EEXIST, "File exists", "/srv"),
        {},
        r"dest /srv/ds cannot be created: .*File exists.*; choose a dest under a directory",
        id="file-exists",
    ),
    pytest.param(
        dvc.exceptions.DvcException("failed to load the index"),
        {},
        r"DVC failed for https://\S+ at rev 'v2': failed to load the index",
        id="other-dvc",
    ),
    pytest.param(
        ValueError("something else"),
        {},
        r"dvc_sync failed for https://\S+ at rev 'v2': ValueError: something else",
        id="anything-else",
    ),
]


@pytest.mark.parametrize(("exc", "params", "message"), DESCRIBE)
def test_describe_error(exc, params, message):
    got = errors.describe_error(exc, dict(PARAMS, **params))
    assert re.fullmatch(message, got), got


def test_error_messages_try_a_subclass_before_its_base():
    """The first matching row wins: a row below a row of one of its bases would never be used."""
    rows = [classes if isinstance(classes, tuple) else (classes,) for classes, _message in errors.ERROR_MESSAGES]
    for i, j in itertools.combinations(range(len(rows)), 2):
        for later in rows[j]:
            assert not issubclass(later, rows[i]), f"{later.__name__} (row {j}) is caught by row {i} first"


# (exception, what the hint tells the user to check)
HINTS = [
    pytest.param(socket.gaierror(-2, "Name or service not known"), "the host name does not resolve", id="dns"),
    pytest.param(OSError(errno.EHOSTUNREACH, "No route to host"), "no route to the host", id="no-route"),
    pytest.param(OSError(errno.ENETUNREACH, "Network is unreachable"), "no route to the host", id="no-network"),
    pytest.param(ConnectionRefusedError(111, "Connection refused"), "check the url's host and port", id="refused"),
    pytest.param(TimeoutError("timed out"), "raise remote_config timeout", id="timeout"),
    pytest.param(ConnectionResetError(104, "reset"), "check the url, port, user and credentials", id="other"),
]


@pytest.mark.parametrize(("exc", "hint"), HINTS)
def test_connection_hint(exc, hint):
    assert errors.connection_error(_chain(_Chained("wrapper"), exc)) is exc
    assert hint in errors.connection_hint(exc)


def test_connection_hints_for_ssh_logins():
    asyncssh = pytest.importorskip("asyncssh")
    cases = [
        (asyncssh.PermissionDenied("Permission denied"), "the server refused the login"),
        (asyncssh.HostKeyNotVerifiable("Host key is not trusted"), "add it to ~/.ssh/known_hosts"),
        (asyncssh.KeyImportError("Invalid private key"), "is a valid, unencrypted key"),
    ]
    for exc, hint in cases:
        assert errors.connection_error(_chain(_Chained("wrapper"), exc)) is exc, exc
        assert hint in errors.connection_hint(exc), exc


def test_explain_names_the_remote_only_once_the_repository_is_open():
    """Opened: a connection error under any wrapper is "cannot connect to <remote>". Not opened yet (the clone
    failed): the repository's own error is the message."""
    refused = ConnectionRefusedError(111, "Connect call failed")
    exc = _chain(dvc.exceptions.DvcException("failed to load directory"), refused)
    msg = errors.explain(exc, PARAMS, lambda: "remote 'storage' (ssh://dvc@storage/srv/dvc)")
    assert msg == (
        "cannot connect to remote 'storage' (ssh://dvc@storage/srv/dvc): ConnectionRefusedError: [Errno 111] Connect "
        "call failed; nothing accepts connections on that host and port; check the url's host and port (remote_config "
        "port)"
    )
    clone = _chain(dvc.scm.CloneError("Failed to clone repo"), socket.gaierror(-2, "Name or service not known"))
    assert errors.explain(clone, PARAMS).startswith("cannot clone https://")
    assert errors.explain(ValueError("x"), PARAMS, lambda: "unused").startswith("dvc_sync failed for")


# -- moved unchanged from tests/unit/plugins/modules/test_dvc_sync.py ----------------------------------------------


@pytest.mark.parametrize(
    ("exc", "found"),
    [
        (_chain(_Chained("wrapper"), ConnectionRefusedError(111, "refused")), ConnectionRefusedError),
        (_chain(_Chained("wrapper"), socket.gaierror(-2, "Name or service not known")), socket.gaierror),
        (_chain(FileNotFoundError(2, "no such object"), _Chained("an SFTP status error")), None),
        (_chain(_Chained("wrapper"), OSError(errno.EHOSTUNREACH, "Connect call failed")), OSError),
        (FileNotFoundError(2, "no such object"), None),
        (ValueError("other"), None),
    ],
    ids=["refused", "dns", "missing-data", "no-route", "plain-missing", "other"],
)
def test_connection_error_finds_transport_errors_in_the_chain_only(exc, found):
    got = errors.connection_error(exc)
    assert (type(got) if got is not None else None) is found


def test_connection_error_knows_asyncssh_login_errors_but_not_sftp_status():
    asyncssh = pytest.importorskip("asyncssh")
    denied = asyncssh.PermissionDenied("Permission denied for user dvc on host storage")
    assert errors.connection_error(_chain(_Chained("wrapper"), denied)) is denied
    assert "refused the login" in errors.connection_hint(denied)
    assert errors.connection_error(_chain(FileNotFoundError(2, "x"), asyncssh.SFTPNoSuchFile("x"))) is None


def test_redact_url_hides_a_password():
    assert errors.redact_url("ssh://dvc:s3cret@storage/srv") == "ssh://dvc:***@storage/srv"
    assert errors.redact_url("ssh://dvc@storage:2222/srv") == "ssh://dvc@storage:2222/srv"
