"""Audit of the figures benchmarks/decode_attention.py and benchmarks/e2e.py report, on CPU:
every number is checked against an independent count (buffer shapes and dtypes) or a hand
computation from a controlled clock, not against the script's own output."""

import json
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax as kj
from benchmarks import common
from benchmarks import decode_attention as da
from benchmarks import e2e
from benchmarks.check_kernel_gpu import random_cache

ISSUE7_ROW = ("B", "T", "Hq", "Hkv", "D", "bits", "impl", "median_ms", "bytes", "tbps", "ratio_to_dense")
ISSUE6_ROW = ("model", "cache", "prompt_len", "new_tokens", "batch", "tokens_per_s", "peak_bytes", "oom")


def _fake_times(dense_ms, kivi_ms, fail=None):
    """A common.time_fn stand-in: dense calls (q, k, v) take ``dense_ms``, KIVI calls (q, cache)
    ``kivi_ms``; ``fail(nargs, args)`` may return an exception to raise instead (the arguments
    are not kept: a test counts the live arrays)."""

    def time_fn(fn, *args, **kw):
        err = fail(len(args), args) if fail else None
        if err is not None:
            raise err
        return dense_ms if len(args) == 3 else kivi_ms
    return time_fn


def _count_bytes(bits, b, hq, hkv, t, d=128):
    """Bytes a KIVI decode-attention call moves, counted from the cache's real buffers: the
    codes, scales and mins of both K and V, both residual rings, plus q and the output."""
    cfg = kj.KIVIConfig(k_bits=bits, v_bits=bits)
    c = jax.eval_shape(lambda: random_cache(cfg, batch=b, kv_heads=hkv, tokens=t, head_dim=d))
    read = ("k_codes", "k_scale", "k_min", "k_res", "v_codes", "v_scale", "v_min", "v_res")
    cache = sum(math.prod(getattr(c, n).shape) * getattr(c, n).dtype.itemsize for n in read)
    return cache + 2 * b * hq * d * 2  # q and o, bf16


def test_time_fn_is_the_median_of_batches_without_the_warmup(monkeypatch):
    """time_fn: a compile-sized first call and the sizing call are not samples; each sample is a
    batch's time / its call count; the result is the median of the samples, not their mean."""
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    # warm-up 5 s (compile), sizing call 4 ms -> 2 calls a batch (10 ms / 4 ms), 5 batches
    per_call = iter([5.0, 0.004] + [x for ms in (1, 100, 3, 4, 5) for x in (ms / 1e3, ms / 1e3)])

    def fn():
        clock[0] += next(per_call)
        return 0.0

    got = common.time_fn(fn, reps=5, min_ms=10.0)
    assert got == pytest.approx(4.0)  # median of 1, 100, 3, 4, 5 ms (mean 22.6, with warm-up 1000+)
    with pytest.raises(StopIteration):
        next(per_call)  # exactly 2 + 5 x 2 calls


def test_hbm_copy_counts_one_read_and_one_write(monkeypatch):
    """hbm_copy_tbps = (bytes read + bytes written) / median time; the timed program really
    writes a new array of the input's size (no elided copy)."""
    got = {}

    def time_fn(f, x):
        got["x"], got["y"] = x, f(x)
        return 2.0  # ms

    monkeypatch.setattr(common, "time_fn", time_fn)
    tbps = common.hbm_copy_tbps(gib=1 / 1024)
    n = 2**20 // 4
    assert got["x"].shape == (n,) and got["x"].dtype == jnp.float32
    assert got["y"].shape == (n,) and not np.array_equal(np.asarray(got["y"]), np.asarray(got["x"]))
    assert tbps == pytest.approx(2 * n * 4 / 2e-3 / 1e12, rel=1e-12)


def test_decode_rows_bytes_tbps_and_ratio_from_buffer_shapes(monkeypatch):
    """Every sweep row: bytes = the buffers read (an independent count from the cache's real
    shapes, q and output included), tbps = bytes / median seconds / 1e12, ratio = ms / dense ms."""
    time_fn = _fake_times(dense_ms=2.0, kivi_ms=0.5)
    monkeypatch.setattr(common, "time_fn", time_fn)
    kv2 = 2 * 2 * 8 * 256 * 128 * 2  # B=2's K/V: the limits compare K/V bytes, inclusive (as before)
    rows = da.run([1, 2], [256], [(32, 8)], [2, 4], ("reference",), [], ref_max_bytes=kv2, dense_max_bytes=kv2)
    assert [(r["B"], r["impl"], r["bits"]) for r in rows] == [
        (1, "dense_bf16_xla", 16), (1, "reference_xla", 2), (1, "reference_xla", 4),
        (2, "dense_bf16_xla", 16), (2, "reference_xla", 2), (2, "reference_xla", 4)]
    for r in rows:
        b = r["B"]
        if r["bits"] == 16:
            want, ms = 2 * b * 8 * 256 * 128 * 2 + 2 * b * 32 * 128 * 2, 2.0
        else:
            want, ms = _count_bytes(r["bits"], b, 32, 8, 256), 0.5
        assert r["bytes"] == want, r
        assert r["median_ms"] == ms and r["tbps"] == pytest.approx(want / (ms * 1e-3) / 1e12, rel=1e-12)
        assert r["ratio_to_dense"] == pytest.approx(ms / 2.0, rel=1e-12)
    # 2-bit: (D codes of K and V at 2 bits + bf16 scale/min per 32) = 96 B a token a head, 1 ring
    assert rows[1]["bytes"] == 8 * (256 * 96 + 2 * 128 * 128 * 2) + 2 * 32 * 128 * 2
    # the mosaic_cache rows take the same bytes: the MosaicKIVICache's own buffers agree
    m = jax.eval_shape(lambda: kj.MosaicKIVICache.from_kivi(random_cache(kj.KIVIConfig(), batch=2, kv_heads=8,
                                                                         tokens=256, head_dim=128)))
    held = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(m)) - 2 * (4 + 1)  # no lengths/overflow
    assert held + 2 * 2 * 32 * 128 * 2 == da.kivi_bytes(kj.KIVIConfig(), 2, 8, 256, hq=32) == rows[4]["bytes"]


def test_decode_a_failed_configuration_is_a_row_and_frees_its_buffers(monkeypatch):
    """Dense running out of memory at B=1 is a row (oom, its error, no time) and its K/V are not
    kept alive into the KIVI timings; a KIVI call that raises is a row too (it was dropped);
    the next shape's rows are whole, with their ratio to their own dense time."""
    leaked = []

    def fail(nargs, args):
        b = args[0].shape[0]
        if nargs == 2:  # a KIVI timing: is any dense K/V of this shape still alive?
            leaked.extend(a.shape for a in jax.live_arrays() if a.shape == (b, 8, 256, 128) and a.dtype == jnp.bfloat16)
        if b == 1:
            return (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB") if nargs == 3
                    else RuntimeError("INTERNAL: some kernel error"))
        return None

    time_fn = _fake_times(dense_ms=2.0, kivi_ms=0.5, fail=fail)
    monkeypatch.setattr(common, "time_fn", time_fn)
    rows = da.run([1, 2], [256], [(32, 8)], [2], ("reference",), [], ref_max_bytes=1 << 30,
                  dense_max_bytes=1 << 30)
    assert not leaked, leaked
    d1, k1, d2, k2 = rows
    assert (d1["impl"], d1["median_ms"], d1["oom"]) == ("dense_bf16_xla", None, True) and "RESOURCE" in d1["error"]
    assert (k1["impl"], k1["median_ms"], k1["oom"]) == ("reference_xla", None, False) and "INTERNAL" in k1["error"]
    assert k1["bytes"] == _count_bytes(2, 1, 32, 8, 256)
    assert d2["median_ms"] == 2.0 and k2["ratio_to_dense"] == pytest.approx(0.25) and "error" not in k2
    assert k2["tbps"] == pytest.approx(_count_bytes(2, 2, 32, 8, 256) / 0.5e-3 / 1e12)
    flags = da.finish_rows(rows, hbm=1.0)
    assert [r["oom_or_error"] for r in flags] == [True, True, False, False]


def test_decode_rows_not_run_by_design_are_no_errors(monkeypatch):
    """A dense shape over dense_max_bytes (the quick run's mixed-length rows) and a shape past
    the time budget are listed, with every field of issue 7, and not flagged as OOM/error."""
    time_fn = _fake_times(dense_ms=2.0, kivi_ms=0.5)
    monkeypatch.setattr(common, "time_fn", time_fn)
    rows = da.run([1], [256], [(32, 8)], [2], ("reference",), [], ref_max_bytes=1 << 30, dense_max_bytes=0)
    rows = da.run([1], [256], [(32, 8)], [2], ("reference",), [], ref_max_bytes=1 << 30, dense_max_bytes=0,
                  rows=rows, deadline=-1.0)
    da.finish_rows(rows, hbm=1.0)
    assert [r["impl"] for r in rows] == ["dense_bf16_xla", "reference_xla", "skipped_time_budget"]
    assert [r["oom_or_error"] for r in rows] == [False, False, False]
    assert rows[1]["ratio_to_dense"] is None and rows[1]["tbps"] == pytest.approx(
        _count_bytes(2, 1, 32, 8, 256) / 0.5e-3 / 1e12)
    for r in rows:
        assert set(ISSUE7_ROW) <= set(r), r


def _md_rows(text):
    """A markdown table's body rows as lists of cell strings."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_decode_main_writes_issue7_json_and_a_matching_table(tmp_path, monkeypatch):
    """The sweep's files: top-level commit, device, jax_version, hbm_copy_tbps (the measured
    value); every row with issue 7's fields and types; frac_of_hbm_copy = tbps / hbm; the kernels
    that cannot run on CPU are error rows; the table's cells are the JSON's; the checkpoint is a
    results object with the same top-level fields."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(common, "hbm_copy_tbps", lambda: 3.0)
    time_fn = _fake_times(dense_ms=2.0, kivi_ms=0.5)
    monkeypatch.setattr(common, "time_fn", time_fn)
    da.main(["--no-breakdown", "--batches", "1", "--lengths", "256", "--kv-heads", "8", "--name", "audit"])
    (path,) = tmp_path.glob("audit-*.json")
    p = json.loads(path.read_text())
    assert isinstance(p["commit"], str) and p["commit"] and p["device"] == jax.devices()[0].device_kind
    assert p["jax_version"] == jax.__version__ and p["hbm_copy_tbps"] == 3.0
    types_ = dict(B=int, T=int, Hq=int, Hkv=int, D=int, bits=int, impl=str, bytes=int)
    rows = {r["impl"]: r for r in p["rows"]}
    assert set(rows) == {"dense_bf16_xla", "pallas", "reference_xla", "mosaic_cache"}, list(rows)
    for r in p["rows"]:
        assert set(ISSUE7_ROW) <= set(r), r
        for k, t in types_.items():
            assert isinstance(r[k], t), (k, r)
        ok = r["median_ms"] is not None
        assert r["oom_or_error"] is (not ok) and isinstance(r["oom"], bool)
        if ok:
            assert r["frac_of_hbm_copy"] == pytest.approx(r["tbps"] / 3.0)
    assert rows["reference_xla"]["bytes"] == _count_bytes(2, 1, 32, 8, 256)
    assert rows["pallas"]["error"] and rows["pallas"]["bytes"] == rows["reference_xla"]["bytes"]
    head, body = _md_rows(path.with_suffix(".md").read_text())
    assert len(body) == len(p["rows"])
    for cells, r in zip(body, p["rows"]):
        for col, cell in zip(head, cells):
            v = r.get(col, "")
            assert cell == (f"{v:.4g}" if isinstance(v, float) else str(v)), (col, cell, v)
            if isinstance(v, float) and v:
                assert float(cell) == pytest.approx(v, rel=5e-4)
    part = json.loads((tmp_path / "partial-rows.json").read_text())
    assert part["partial"] is True and part["hbm_copy_tbps"] == 3.0 and part["commit"] == p["commit"]
    assert [r["impl"] for r in part["rows"]] == [r["impl"] for r in p["rows"]]


@pytest.mark.parametrize("argv, flag, allowed", [
    (["--bits-mha", "3"], "--bits-mha", "{2, 4}"), (["--kv-heads", "5"], "--kv-heads", "divisors of Hq = 32"),
    (["--batches", "0,8"], "--batches", "positive"), (["--lengths", "4k"], "--lengths", "positive"),
    (["--trace-shapes", "1x4096"], "--trace-shapes", "BxTxHkv"), (["--rounds", "0"], "--rounds", ">= 1"),
    (["--xla-options", "+cc:novalue"], "--xla-options", "KEY=VALUE")])
def test_decode_bad_arguments_name_flag_value_and_allowed(argv, flag, allowed, capsys):
    with pytest.raises(SystemExit) as e:
        da.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: '{argv[1]}'" in err and allowed in err, err


@pytest.mark.parametrize("argv, flag", [(["--sweep-prompts", "4k"], "--sweep-prompts"),
                                        (["--paper-batch", "0"], "--paper-batch"),
                                        (["--reps", "-1"], "--reps")])
def test_e2e_bad_arguments_name_flag_value_and_allowed(argv, flag, capsys):
    with pytest.raises(SystemExit):
        e2e.parse_args(argv)
    err = capsys.readouterr().err
    assert f"argument {flag}: '{argv[1]}'" in err and ("positive" in err or ">= 1" in err), err


def _child_rows(capsys):
    return [json.loads(ln[6:]) for ln in capsys.readouterr().out.splitlines() if ln.startswith("@@ROW ")]


@pytest.mark.parametrize("stats", [{"peak_bytes_in_use": 123456789, "bytes_limit": 10**10}, None])
def test_e2e_child_throughput_counts_prefill_and_peak_is_the_allocators(monkeypatch, capsys, stats):
    """One configuration on a controlled clock: tokens/s = B x new tokens / the best whole
    generate (prefill included, the warm-up left out), decode tokens/s = B x (N - 1) / (that
    minus the best prefill-only call), step = decode / (N - 1); peak_bytes is the allocator's
    peak_bytes_in_use, and null (no estimate) where the backend has no stats (CPU)."""
    import kivi_jax

    b, n = 2, 6
    clock = [0.0]
    took = iter([10.0, 3.0, 2.0, 0.5, 0.4])  # warm-up, 2 timed, 2 prefill-only (seconds)

    def fake_generate(model, x, max_new_tokens, eos_id=None, **kw):
        clock[0] += next(took)
        assert x.shape == (b, 160) and max_new_tokens == n
        return types.SimpleNamespace(tokens=np.full((b, n), 7), lengths=np.full((b,), 1 if eos_id else n),
                                     cache=None)

    monkeypatch.setattr(e2e.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(kivi_jax, "generate", fake_generate)
    monkeypatch.setattr(e2e, "_memory_stats", lambda: dict(stats or {}))
    runner_args = e2e.parse_args(["--dry-run", "--reps", "2"])
    spec = dict(kind="generate", section="paper", model="tiny-llama", config=e2e.MODELS["tiny-llama"], prompt_len=160,
                new_tokens=n, batch=b, reps=runner_args.reps, seed=0, prefill_reps=2, matmul_impl=None, cache="kivi2")
    e2e.child_generate(spec)
    (row,) = _child_rows(capsys)
    assert "error" not in row, row
    assert row["tokens_per_s"] == pytest.approx(b * n / 2.0)
    assert row["total_s"] == 2.0 and row["prefill_s"] == pytest.approx(0.4) and row["compile_s"] == pytest.approx(8.0)
    assert row["decode_tokens_per_s"] == pytest.approx(b * (n - 1) / 1.6)
    assert row["step_ms"] == pytest.approx(1.6 / (n - 1) * 1e3)
    assert row["peak_bytes"] == (123456789 if stats else None) and row["oom"] is False
    assert set(ISSUE6_ROW) <= set(row)


def test_e2e_an_oom_ends_one_series_only_and_files_stay_valid(tmp_path, monkeypatch):
    """The sweep with dense out of memory from batch 4: dense stops there, kivi2 goes on to the
    cap with its own numbers; after every row the JSON on disk is whole (issue 6's fields), and
    its Markdown table shows the same tokens/s, peak GiB and status."""
    monkeypatch.setattr(e2e, "render_plot", lambda p, path: None)
    runner = e2e.Runner(e2e.parse_args(["--dry-run", "--out", str(tmp_path), "--skip-paper", "--skip-hf",
                                        "--skip-compile-check"]))
    snapshots = []

    def fake_run_child(spec, timeout):
        res = e2e.Child(rows=[], rc=0, timed_out=False, tail=[])
        b = spec["batch"]
        row = e2e._base_row(spec, spec["cache"])
        if spec["cache"] == "dense" and b >= 4:
            row.update(oom=True, error="XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory", phase="warmup")
        else:
            row.update(tokens_per_s=100.0 * b + (1 if spec["cache"] == "kivi2" else 0), peak_bytes=b * 2**30,
                       fits=True)
        runner._line("@@ROW " + json.dumps(row) + "\n", res, [])
        snapshots.append(json.loads((tmp_path / f"{runner.stem}.json").read_text()))
        return res

    monkeypatch.setattr(runner, "run_child", fake_run_child)
    runner.run()
    for snap in snapshots:  # every intermediate file: complete rows, top-level fields
        assert snap["commit"] and snap["jax_version"] == jax.__version__
        for r in snap["rows"]:
            assert set(ISSUE6_ROW) <= set(r) and isinstance(r["oom"], bool), r
    p = json.loads((tmp_path / f"{runner.stem}.json").read_text())
    got = [(r["cache"], r["batch"], r["tokens_per_s"], r["peak_bytes"], r["oom"]) for r in p["rows"]]
    assert got == [("dense", 2, 200.0, 2 * 2**30, False), ("kivi2", 2, 201.0, 2 * 2**30, False),
                   ("dense", 4, None, None, True), ("kivi2", 4, 401.0, 4 * 2**30, False),
                   ("kivi2", 8, 801.0, 8 * 2**30, False)]
    s = p["summary"]["tiny-llama"]["sweep_T256"]
    assert s["dense"]["max_batch"] == 2 and s["dense"]["first_oom_batch"] == 4 and s["kivi2"]["max_batch"] == 8
    assert p["summary"]["tiny-llama"]["sweep_T256_best_tps_kivi2_over_dense"] == pytest.approx(801.0 / 200.0)
    md = (tmp_path / f"{runner.stem}.md").read_text()
    head, body = _md_rows(md.split("## Long-context sweep")[1])
    col = {c: i for i, c in enumerate(head)}
    for cells, r in zip(body, p["rows"]):
        assert cells[col["cache"]] == r["cache"] and int(cells[col["batch"]]) == r["batch"]
        if r["oom"]:
            assert cells[col["status"]] == "OOM" and cells[col["tokens_per_s"]] == ""
        else:
            assert float(cells[col["tokens_per_s"]]) == pytest.approx(r["tokens_per_s"], rel=5e-4)
            assert float(cells[col["peak_GiB"]]) == pytest.approx(r["peak_bytes"] / 2**30)
            assert cells[col["status"]] == "ok"


def test_e2e_a_budget_cut_leaves_whole_files(tmp_path, monkeypatch):
    """With no time left every configuration is a skipped row with issue 6's fields, and the
    files still carry commit and jax_version (no child ever reported its environment)."""
    monkeypatch.setattr(e2e, "render_plot", lambda p, path: None)
    runner = e2e.Runner(e2e.parse_args(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"]))
    runner.run()
    p = json.loads((tmp_path / f"{runner.stem}.json").read_text())
    assert p["rows"] and all(r["skipped"] and r["tokens_per_s"] is None for r in p["rows"])
    assert {r["cache"] for r in p["rows"]} >= {"dense", "kivi2", "kivi4", "hf_dense"}
    for r in p["rows"]:
        assert set(ISSUE6_ROW) <= set(r) and r["oom"] is False, r
    assert p["commit"] and p["jax_version"] == jax.__version__ and "device" in p
    md = (tmp_path / f"{runner.stem}.md").read_text()
    assert md.count("| skipped: time budget") == len(p["rows"]) and re.search(r"jax \d", md)
