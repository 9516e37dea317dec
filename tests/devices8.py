"""A test module's 8-device part, run as a child process: jax fixes the device count when it
starts, so `--xla_force_host_platform_device_count=8` needs a fresh interpreter. The module runs
itself as a script with ``--child`` (see :func:`child_main`) and prints one ``RESULT <json>`` line;
under pytest-xdist the workers share one run through a file (each worker that ran a test of the
module would otherwise run the child again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(test_file: str, timeout: int = 600) -> dict:
    """``python test_file --child`` with 8 host CPU devices -> its RESULT json."""
    # (keeping conftest's fast-compile XLA_FLAGS: the child mostly compiles)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.abspath(test_file), "--child"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def shared_child(test_file: str, name: str, tmp_path_factory, worker_id) -> dict:
    """:func:`run_child`'s result, once per test run (``name``: the file the workers share it through)."""
    if worker_id == "master":
        return run_child(test_file)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / f"{name}.json"
    with FileLock(str(shared) + ".lock"):
        if not shared.is_file():
            shared.write_text(json.dumps(run_child(test_file)))
        return json.loads(shared.read_text())


def child_main(test_file: str, child) -> None:
    """The ``--child`` entry point: ``child()``'s dict printed as the RESULT line."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    # run as a script, tests/ is sys.path[0] and tests/models would shadow the models package
    here = os.path.dirname(os.path.abspath(test_file))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    print("RESULT " + json.dumps(child()), flush=True)
