"""Offline stand-in for the get-pip.py bootstrap script ansible-test downloads.

ansible-test fetches get-pip-<version>.py from Ansible's CI file server to put pip into the empty
virtual environments of its sanity tests; that server is not reachable from every machine (ours
reach PyPI only). This script does the same job: ensurepip puts the interpreter's bundled pip in
place, then that pip installs what ansible-test asked for (the pinned pip version) from the index.
ansible-test runs it as __main__ with pip's own arguments.
"""

import ensurepip
import os
import subprocess
import sys

# ansible-test runs this with a reduced environment; a machine whose index sits behind a
# TLS-intercepting proxy needs the system CA bundle named explicitly (pip otherwise uses certifi's).
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

ensurepip.bootstrap()
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
if os.path.exists(SYSTEM_CA_BUNDLE) and "PIP_CERT" not in os.environ:
    args.insert(0, f"--cert={SYSTEM_CA_BUNDLE}")
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args]))
