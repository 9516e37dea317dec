"""The test suite on the device, file group by file group, with a summary that survives a time limit.

On a GPU the same tests run the compiled kernels against their float64 references and the GPU's
own defaults (kernels, rotation algorithm, append kernels). A device call has at most 10 minutes;
one pytest run over everything cut by that limit leaves no summary (run114 lost its last 3
tests' names that way). Here each group of files is its own pytest run with its own JUnit file,
read back as soon as it ends, and the groups stop when ``--budget-s`` is spent; what ran is
written to ``gpu-tests-<name>-<date>.{json,md}`` (under $OUT on the device) after every group.

    python -m benchmarks.gpu_tests --name run116                       # every group, 540 s at most
    python -m benchmarks.gpu_tests --groups kernels --budget-s 300     # the kernel-side files only
    python -m benchmarks.gpu_tests --files tests/test_eager.py         # these files, one group
    python -m benchmarks.gpu_tests --files tests/test_attention.py --select extend   # pytest -k

Each pytest worker process gets XLA_PYTHON_CLIENT_PREALLOCATE=false and an equal share of the
device memory (the workers share one GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from benchmarks import common

# kernel-side files first: they compile the Triton and Mosaic kernels against float64
GROUPS = {
    "kernels": ["tests/test_mosaic_kernel.py", "tests/test_cache_mosaic.py", "tests/test_pallas_kernels.py",
                "tests/test_kivi_append.py", "tests/test_row_writes.py", "tests/test_active_append.py",
                "tests/test_extend.py", "tests/test_kernel_audit.py", "tests/test_dense_kernels_audit.py"],
    "attention": ["tests/test_attention.py", "tests/test_extensions.py", "tests/test_decode_step.py",
                  "tests/test_prefix_audit.py", "tests/test_extensions_audit.py"],
    "library": ["tests/test_generate.py", "tests/test_cache.py", "tests/test_quant.py", "tests/test_eager.py",
                "tests/test_stacked_matmul.py", "tests/test_packing.py", "tests/test_prefill_blocks.py",
                "tests/test_prefill_chunk.py", "tests/test_sampling_audit.py", "tests/test_quant_audit.py",
                "tests/test_generate_audit.py", "tests/test_api_audit.py"],
    "models": ["tests/models"],
    "tools": ["tests/test_sharding.py", "tests/test_sharding_audit.py", "tests/test_bench_tools.py", "tests/test_cli.py",
              "tests/test_eval.py", "tests/test_readme.py", "tests/test_checkpoint_cli_audit.py",
              "tests/test_eval_audit.py", "tests/test_bench_audit.py"],
}


def failure_message(text: str, limit: int = 300) -> str:
    """The first lines of a failure's message that say something, joined by " / " up to ``limit``
    characters: numpy's assertions open with a bare "AssertionError: " line and put the
    mismatch on the lines after it (run116's first summary named nothing else)."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    kept = []
    for ln in lines:
        if not ln or ln.rstrip(":") in ("AssertionError", "E   AssertionError"):
            continue
        if kept and len(" / ".join(kept + [ln])) > limit:
            break
        kept.append(ln)
        if ln.startswith("Max relative difference") or len(kept) == 4:
            break
    return " / ".join(kept)[:limit]


def junit_summary(path: str) -> dict:
    """Counts and failures of one pytest JUnit XML file: tests, passed, failed, errors, skipped,
    seconds, and ``failures`` [{test, message}] (message: :func:`failure_message` of what pytest gave)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0, "failures": []}
    for suite in suites:
        out["tests"] += int(suite.get("tests", 0))
        out["failed"] += int(suite.get("failures", 0))
        out["errors"] += int(suite.get("errors", 0))
        out["skipped"] += int(suite.get("skipped", 0))
        out["seconds"] += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            for bad in [*case.findall("failure"), *case.findall("error")]:
                out["failures"].append({"test": f"{case.get('classname', '')}::{case.get('name', '')}",
                                        "message": failure_message(bad.get("message") or bad.text or "")})
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    return out


def progress_counts(output: str) -> dict:
    """What pytest's -q progress lines (``..F.s  [ 30%]``) say ran: passed, failed, errors,
    skipped; for a run cut before its summary."""
    marks = "".join(m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?\s*$", output, re.M))
    return {"passed": marks.count(".") + marks.count("X"), "failed": marks.count("F"), "errors": marks.count("E"),
            "skipped": marks.count("s") + marks.count("x")}


def summary_table(groups: list[dict], env: dict) -> str:
    """The groups' rows (one a pytest run) and every failure, as markdown."""
    cols = ["group", "status", "tests", "passed", "failed", "errors", "skipped", "wall_s", "files"]
    rows = [{**g, "files": " ".join(g["files"]) + (f" (-k {g['select']!r})" if g.get("select") else "")}
            for g in groups]
    total = {k: sum(g.get(k, 0) for g in groups) for k in ("tests", "passed", "failed", "errors", "skipped")}
    head = (f"# The test suite on {env['device']} (commit {env['commit']}, jax {env['jax_version']})\n\n"
            f"**{total['passed']} passed, {total['failed']} failed, {total['errors']} errors, {total['skipped']} "
            f"skipped** of {total['tests']} in the groups that ran"
            + (" (a group cut by the budget counts its progress lines)" if any(g["status"] == "cut" for g in groups)
               else "") + ".\n\n")
    failures = [f"- `{f['test']}` ({g['group']}): {f['message']}" for g in groups for f in g.get("failures", [])]
    return head + common.markdown(rows, cols) + ("\n" + "\n".join(failures) + "\n" if failures else "")


def run_group(name: str, files: list[str], *, workers: int, seconds: float, per_test: int, xml: str,
              select: str | None = None) -> dict:
    """One pytest run over ``files`` (``workers`` processes sharing the device; ``select``: a
    pytest -k expression) stopped after ``seconds``: its JUnit summary and status "done", or
    status "cut" when the limit killed it."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--tb=line", f"--junitxml={xml}"]
    cmd += ["-n", str(workers)] if workers > 1 else []
    cmd += ["-k", select] if select else []
    cmd += [f"--timeout={per_test}"] if per_test and importlib.util.find_spec("pytest_timeout") else []
    cmd += files
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / max(workers, 1):.3f}")
    t0 = time.monotonic()
    # a session of its own: at the limit the xdist workers (pytest's children) are killed with it
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, status = proc.communicate(timeout=seconds)[0], "done"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, status = proc.communicate()[0], "cut"
    print(output[-3000:], flush=True)
    row = {"group": name, "files": files, "status": status, "wall_s": round(time.monotonic() - t0, 1)}
    if select:
        row["select"] = select
    if status == "done" and os.path.exists(xml):
        row.update(junit_summary(xml))
    elif status == "done":
        row["status"] = f"exit {proc.returncode}, no JUnit file"
    else:  # cut: no JUnit file; what the progress lines showed before the limit
        row.update(progress_counts(output))
        row["tests"] = sum(row[k] for k in ("passed", "failed", "errors", "skipped"))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="gpu-tests", help="the result files' name (gpu-tests-<name>-<date>)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)}")
    ap.add_argument("--files", default="", help="comma list of test files or folders: one group of them instead")
    ap.add_argument("--select", default=None, help="a pytest -k expression applied to every group")
    ap.add_argument("--budget-s", type=float, default=540.0, help="all groups together (a device call has 600 s)")
    ap.add_argument("--workers", type=int, default=7, help="pytest-xdist processes (1: none)")
    ap.add_argument("--per-test-timeout", type=int, default=240, help="seconds a test (with pytest-timeout; 0: none)")
    a = ap.parse_args(argv)
    # this process reads the device's name only (common.environment): no memory of the workers' share
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if a.files:
        groups = [("files", a.files.split(","))]
    else:
        unknown = [g for g in a.groups.split(",") if g not in GROUPS]
        if unknown:
            ap.error(f"--groups {a.groups!r}: unknown {unknown}; allowed: {list(GROUPS)}")
        groups = [(g, GROUPS[g]) for g in a.groups.split(",")]
    name = a.name if a.name.startswith("gpu-tests") else f"gpu-tests-{a.name}"
    out, start, rows = common.out_dir(), time.monotonic(), []
    for group, files in groups:
        left = a.budget_s - (time.monotonic() - start)
        if left < 30:
            rows.append({"group": group, "files": files, "status": "not run (budget)"})
            continue
        rows.append(run_group(group, files, workers=a.workers, seconds=left, per_test=a.per_test_timeout,
                              xml=str(out / f"{name}-{group}.xml"), select=a.select))
        env = common.environment()
        common.write_results(name, {**env, "groups": rows}, summary_table(rows, env))
    env = common.environment()
    common.write_results(name, {**env, "groups": rows}, summary_table(rows, env))
    return 0 if all(r.get("status") == "done" and not r.get("failed") and not r.get("errors") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
