"""Build the scenario's git + DVC repository on the controller (molecule/dvc_sync).

Usage: make_repo.py WORKDIR REMOTE_URL

Makes WORKDIR/repo (git, ``dvc init``, default remote ``storage`` = REMOTE_URL, the URL data hosts use) with tags:

* ``v1``: ``data/ds/`` = a.bin, b.bin, keep.bin, sub/c.txt; ``model/weights.bin`` (a single tracked file).
* ``v2``: a.bin changed, b.bin removed, sub/d.bin added; weights.bin changed.
* ``v3-unpushed``: e.bin added to ``data/ds``, weights.bin changed, both outputs marked ``push: false`` so
  ``dvc push --all-tags`` leaves their new data off the remote (the "data missing on the remote" cases).

and WORKDIR/repo.tar.gz (a clone of it for the data host: git history, no DVC cache) and WORKDIR/expected.json
(per tag: commit sha, DVC's ``.dir`` md5 of data/ds, ``{relpath: md5}`` of its files, md5 and size of weights.bin),
written last: its existence means the repository is complete. Content is pseudo-random but fixed (seeded), so md5s
are the same every run.
Pushing is the converge's job (``dvc push -r storage --all-tags``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

KIB = 1024


def blob(seed, size):
    return random.Random(seed).randbytes(size)


VERSIONS = {
    "v1": {
        "ds": {
            "a.bin": blob("a1", 256 * KIB),
            "b.bin": blob("b1", 128 * KIB),
            "keep.bin": blob("k", 64 * KIB),
            "sub/c.txt": b"charlie\n",
        },
        "weights": blob("w1", 32 * KIB),
    },
    "v2": {
        "ds": {
            "a.bin": blob("a2", 256 * KIB),
            "keep.bin": blob("k", 64 * KIB),
            "sub/c.txt": b"charlie\n",
            "sub/d.bin": blob("d2", 96 * KIB),
        },
        "weights": blob("w2", 32 * KIB),
    },
    "v3-unpushed": {
        "ds": {
            "a.bin": blob("a2", 256 * KIB),
            "keep.bin": blob("k", 64 * KIB),
            "sub/c.txt": b"charlie\n",
            "sub/d.bin": blob("d2", 96 * KIB),
            "e.bin": blob("e3", 16 * KIB),
        },
        "weights": blob("w3", 32 * KIB),
    },
}


def md5(data):
    return hashlib.md5(data).hexdigest()  # DVC's content address


def main(workdir, remote_url):
    repo = os.path.join(workdir, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    os.makedirs(repo)
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="molecule",
        GIT_AUTHOR_EMAIL="molecule@example.invalid",
        GIT_COMMITTER_NAME="molecule",
        GIT_COMMITTER_EMAIL="molecule@example.invalid",
        GIT_CONFIG_NOSYSTEM="1",
        DVC_NO_ANALYTICS="1",
    )

    def run(*argv):
        subprocess.run(argv, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)

    def dvc(*argv):
        run(sys.executable, "-m", "dvc", *argv)

    run("git", "init", "-q", "-b", "main")
    dvc("init", "-q")
    dvc("remote", "add", "-d", "storage", remote_url)
    run("git", "add", ".dvc")
    run("git", "commit", "-q", "-m", "dvc init, remote storage")
    expected = {}
    for tag, version in VERSIONS.items():
        shutil.rmtree(os.path.join(repo, "data", "ds"), ignore_errors=True)
        for rel, data in version["ds"].items():
            path = os.path.join(repo, "data", "ds", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fobj:
                fobj.write(data)
        os.makedirs(os.path.join(repo, "model"), exist_ok=True)
        with open(os.path.join(repo, "model", "weights.bin"), "wb") as fobj:
            fobj.write(version["weights"])
        dvc("add", "-q", "data/ds", "model/weights.bin")
        if tag.endswith("-unpushed"):
            for dvcfile in ("data/ds.dvc", "model/weights.bin.dvc"):
                path = os.path.join(repo, dvcfile)
                with open(path) as fobj:
                    text = fobj.read()
                with open(path, "w") as fobj:  # the out's own keys are indented 4 under "outs:\n- "
                    fobj.write(text.replace("\n  path: ", "\n  push: false\n  path: ", 1))
        run("git", "add", "data/ds.dvc", "model/weights.bin.dvc", "data/.gitignore", "model/.gitignore")
        run("git", "commit", "-q", "-m", f"data {tag}")
        run("git", "tag", tag)
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        with open(os.path.join(repo, "data", "ds.dvc")) as fobj:
            dir_md5 = next(line.split(":", 1)[1].strip() for line in fobj if line.strip().startswith("- md5:"))
        expected[tag] = dict(
            sha=sha,
            dir_md5=dir_md5,
            files={rel: md5(data) for rel, data in version["ds"].items()},
            sizes={rel: len(data) for rel, data in version["ds"].items()},
            weights_md5=md5(version["weights"]),
            weights_size=len(version["weights"]),
        )
    # What the data host gets: a clone (git-tracked files and history only: no DVC cache, no local config).
    checkout = os.path.join(workdir, "checkout", "datasets")
    shutil.rmtree(os.path.dirname(checkout), ignore_errors=True)
    subprocess.run(["git", "clone", "-q", repo, checkout], env=env, check=True)
    subprocess.run(["git", "-C", checkout, "fetch", "-q", "--tags"], env=env, check=True)
    shutil.make_archive(os.path.join(workdir, "repo"), "gztar", os.path.dirname(checkout), "datasets")
    with open(os.path.join(workdir, "expected.json.tmp"), "w") as fobj:
        json.dump(expected, fobj, indent=2, sort_keys=True)
    os.replace(os.path.join(workdir, "expected.json.tmp"), os.path.join(workdir, "expected.json"))


if __name__ == "__main__":
    main(*sys.argv[1:])
