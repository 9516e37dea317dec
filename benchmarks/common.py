"""Shared helpers of the GPU benchmark scripts: environment facts, timing, result files."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def int_list(allowed: str = "positive integers", ok=lambda n: n >= 1):
    """An argparse type: a non-empty comma list of integers each passing ``ok``; otherwise the
    error (argparse prefixes the flag) names the value and what is allowed (a bad --bits-mha used
    to fail every cache silently, a bad --batches to raise a bare ValueError mid-run)."""
    def parse(text: str) -> list[int]:
        try:
            out = [int(x) for x in text.split(",") if x]
        except ValueError:
            out = None
        if not out or not all(ok(n) for n in out):
            raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {allowed}")
        return out
    return parse


def at_least(lo, kind=int):
    """An argparse type: a ``kind`` number >= lo; otherwise an error naming the value and the bound
    (0 or a negative batch, token or rep count failed later, inside a run)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"{text!r}: a number >= {lo}")
        return v
    return parse


def commit() -> str:
    """KIVI_COMMIT if set (the device copy's .git, if any, is not the tree that ran), else git's HEAD."""
    if os.environ.get("KIVI_COMMIT"):
        return os.environ["KIVI_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # no git
        return "unknown"


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax_version": jax.__version__,
    }


def package_versions(*names: str) -> dict:
    """Installed versions by distribution name (None when absent), read from package metadata
    without importing anything (so no device is touched)."""
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def out_dir(outdir: str | None = None) -> pathlib.Path:
    """Where result files go: ``outdir``, else $OUT (the device tool collects it), else
    benchmarks/results."""
    path = pathlib.Path(outdir or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_fn(fn, *args, reps: int = 5, min_ms: float = 10.0) -> float:
    """Median milliseconds per call of a jitted ``fn``: calls are queued back to back
    (async dispatch) in batches of >= ``min_ms`` and synchronized once per batch."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, int(min_ms / 1e3 / one))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) * 1e3 / n)
    return statistics.median(samples)


def hbm_copy_tbps(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s."""
    n = int(gib * 2**30) // 4
    x = jax.random.uniform(jax.random.key(0), (n,), dtype=np.float32)
    f = jax.jit(lambda a: a * 1.0000001)  # one read + one write, not elided
    ms = time_fn(f, x)
    return 2 * x.nbytes / (ms * 1e-3) / 1e12


def write_results(name: str, payload: dict, table: str, outdir: str | None = None) -> pathlib.Path:
    outdir = out_dir(outdir)
    stem = f"{name}-{payload.get('date', datetime.date.today().isoformat())}"
    (outdir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (outdir / f"{stem}.md").write_text(table)
    return outdir / f"{stem}.json"


def markdown(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _hlo_sources(hlo: str) -> dict[str, str]:
    """HLO instruction name -> where it came from: its metadata's op_name (the jit / scan /
    ``jax.named_scope`` path; the library names its decode-step parts with named scopes),
    prefixed by "file.py:line" when the metadata has a source file (older XLA)."""
    out = {}
    for ln in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}", ln)
        if not m:
            continue
        meta = m.group(2)
        f = re.search(r'source_file="([^"]*)"', meta)
        line = re.search(r"source_line=(\d+)", meta)
        op = re.search(r'op_name="([^"]*)"', meta)
        src = f"{os.path.basename(f.group(1))}:{line.group(1) if line else '?'} " if f else ""
        out[m.group(1)] = src + (op.group(1) if op else "")
    return out


def trace_kernels(run, hlo: str, steps: int, plane_prefix="/device:GPU", line_prefix="Stream") -> list[dict]:
    """GPU time per kernel over ``run()`` (which runs ``steps`` steps and blocks), from a
    jax.profiler trace read back with jax.profiler.ProfileData: one row per kernel name with
    ms per step, launches per step, and the HLO source it came from (``hlo``: the compiled
    module's text). Sorted by time, largest first. The prefixes pick the trace's planes and
    lines: a GPU's streams by default."""
    import collections
    import glob
    import tempfile

    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(paths[0])
    src = _hlo_sources(hlo)
    tot = collections.defaultdict(lambda: [0, 0])
    for plane in data.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            if not line.name.startswith(line_prefix):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                name = str(stats.get("hlo_op") or ev.name)
                tot[name][0] += ev.duration_ns
                tot[name][1] += 1
    rows = [{"kernel": k[:80], "ms_per_step": ns / 1e6 / steps, "launches_per_step": n / steps,
             "source": src.get(k, src.get(k.split(".")[0], ""))[-120:]} for k, (ns, n) in tot.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


@contextlib.contextmanager
def switched(*settings):
    """Each (module, name, value) with value not None set for the block, restored after it
    (the library's trace-time switches: a jit traced inside the block takes them)."""
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in settings]
    try:
        for mod, name, value in settings:
            if value is not None:
                setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
