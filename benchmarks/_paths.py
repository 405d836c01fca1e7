"""Where the benchmarks find the repository, the shared data and their results, and how
they start their subprocesses; no heavy imports, so ``run.py`` can use it too."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# ../shared/data beside the checkout, or where JAXREG_SHARED_DATA says (as for the tests
# and examples): on a machine that gets the repository alone, the data travel inside it.
SHARED_DATA = os.environ.get("JAXREG_SHARED_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")
RESULTS = os.path.join(HERE, "results")


def repo_env() -> dict:
    """This process's environment with the repository first on ``PYTHONPATH``, so that a
    worker imports this checkout's ``jaxreg`` and ``benchmarks``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@contextlib.contextmanager
def work_folder(prefix: str, *, keep: bool = False):
    """A temporary folder for a run's inputs, outputs and logs: removed afterwards unless
    ``keep`` (then its path is printed)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    try:
        yield folder
    finally:
        if keep:
            print(f"work folder kept: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
