"""The benchmark scripts' measuring helpers, on CPU (the GPU runs use the same code)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common


def test_trace_kernels_attributes_time_to_hlo_ops_and_sources():
    """trace_kernels reads a jax.profiler trace back: the op that runs appears once per step,
    with a positive time and the named scope the HLO metadata gives."""
    def g(x):
        with jax.named_scope("my_part"):
            return jnp.sin(x) * 3.0

    f = jax.jit(g)
    # on the CPU backend even where a GPU is the default device: the trace's CPU plane is read
    x = jax.device_put(jax.random.normal(jax.random.key(0), (512, 512)), jax.devices("cpu")[0])
    compiled = f.lower(x).compile()
    hlo = compiled.as_text()
    f(x).block_until_ready()

    def run():
        for _ in range(3):
            out = compiled(x)
        out.block_until_ready()

    rows = common.trace_kernels(run, hlo, steps=3, plane_prefix="/host:CPU", line_prefix="tf_XLA")
    ops = [r for r in rows if "sin" in r["kernel"] or "fusion" in r["kernel"]]
    assert ops, rows
    assert ops[0]["ms_per_step"] > 0
    assert abs(ops[0]["launches_per_step"] - 1.0) < 1e-9
    assert "my_part" in ops[0]["source"]


def test_hlo_sources_parses_metadata():
    hlo = ('  %fusion.3 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%fc, '
           'metadata={op_name="jit(f)/mul" source_file="/x/y/attention_pallas.py" source_line=42}\n'
           '  ROOT %copy.1 = f32[4]{0} copy(%fusion.3)\n')
    src = common._hlo_sources(hlo)
    assert src["fusion.3"] == "attention_pallas.py:42 jit(f)/mul"
    hlo = '  %sin.0 = f32[4]{0} sine(%p), metadata={op_name="jit(f)/kivi_window/sin" stack_frame_id=2}'
    assert common._hlo_sources(hlo) == {"sin.0": "jit(f)/kivi_window/sin"}
    assert "copy.1" not in src


def test_kernel_tuning_dry_run_configurations_agree(tmp_path, monkeypatch):
    """The device script, run small in interpret mode before it costs device time: every
    tuning configuration (chunk, warps) computes the same bulk attention as the default, and
    the whole-call column is filled."""
    import json

    from benchmarks import kernel_tuning

    monkeypatch.setenv("OUT", str(tmp_path))
    kernel_tuning.main(["--dry-run", "--shapes", "1"])
    rows = json.loads((tmp_path / "kernel-tuning.json").read_text())["rows"]
    tuned = [r for r in rows if r["impl"] != "dense_bf16"]
    assert len(tuned) == len(kernel_tuning.CONFIGS)
    for r in tuned:
        assert r["error"] is None, r
        assert r["rel_err_vs_first"] < 1e-3, r  # bf16 tiles of other chunkings: rounding only
        assert r["whole_call_ms"] > 0


def test_e2e_keeps_what_a_killed_child_measured(tmp_path):
    """A sweep configuration killed by its timeout after its warm-up generate still counts as
    fitting (the sweep's max batch, and it doubles on); one killed after its timed call keeps
    its tokens/s; one killed before either is an error row."""
    from benchmarks import e2e

    runner = e2e.Runner(e2e.parse_args(["--dry-run", "--out", str(tmp_path)]))
    spec = runner.spec("generate", "sweep", "tiny-llama", 256, 8, 2, cache="kivi2")
    base = e2e._base_row(spec, "kivi2")

    def killed(batch, partial):
        s = {**spec, "batch": batch}
        res = e2e.Child(rows=[], rc=-9, timed_out=True, tail=[], partial=partial)
        runner.missing_rows(s, ["kivi2"], res)
        return runner.payload["rows"][-1]

    timed = killed(2, {**base, "batch": 2, "fits": True, "tokens_per_s": 123.0, "peak_bytes": 10})
    assert timed["tokens_per_s"] == 123.0 and "error" not in timed and "prefill not timed" in timed["note"]
    warm = killed(4, {**base, "batch": 4, "fits": True, "peak_bytes": 20})
    assert warm["fits"] and "not timed" in warm["error"]
    lost = killed(8, None)
    assert lost["error"].startswith("timeout") and not lost.get("fits")
    summary = e2e.summarize(runner.payload)["tiny-llama"]["sweep_T256"]["kivi2"]
    assert summary["max_batch"] == 4 and summary["best_tokens_per_s"] == 123.0 and summary["best_at_batch"] == 2
    status = {r["batch"]: r["status"] for r in e2e._fmt_rows(runner.payload["rows"])}
    assert status[2] == "ok" and status[4].startswith("fits") and status[8].startswith("error: timeout")
    runner.log.close()


def test_e2e_only_mistral_runs_the_mistral_sections_alone(tmp_path, monkeypatch):
    """--only-mistral: the paper setting and the sweep of the Mistral shape, nothing of Llama's."""
    from benchmarks import e2e

    runner = e2e.Runner(e2e.parse_args(["--dry-run", "--only-mistral", "--out", str(tmp_path)]))
    calls = []
    for name in ("paper", "hf", "compile", "profile", "sweep"):
        monkeypatch.setattr(runner, f"section_{name}", lambda model, name=name: calls.append((name, model)))
    runner.run()
    assert calls == [("paper", "tiny-mistral"), ("sweep", "tiny-mistral")]
    assert runner.payload["settings"]["only_mistral"] is True


def test_e2e_a_kernel_too_big_for_shared_memory_is_no_oom():
    from benchmarks import e2e

    assert e2e._is_oom("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68.00GiB")
    assert not e2e._is_oom("RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 294912, available: 232448")


def test_stacked_copy_count_skips_fusions_that_only_slice():
    """decode_step_ab's copy detector: a transpose inside a fusion whose root is a slice of it is
    computed for the slice alone (the flush branch's k_res read), while a fusion or a top-level
    copy that produces the whole stacked array is a copy."""
    from benchmarks.decode_step_ab import _count

    big = "bf16[32,96,32,128,128]"
    hlo = f"""HloModule m

%fused_dynamic_slice (p: {big}, i: s32[]) -> bf16[1,96,32,128,128] {{
  %p = {big}{{4,3,2,1,0}} parameter(0)
  %transpose.1 = {big}{{4,3,2,1,0}} transpose(%p), dimensions={{0,1,2,4,3}}
  ROOT %ds = bf16[1,96,32,128,128]{{4,3,2,1,0}} dynamic-slice(%transpose.1, %i), dynamic_slice_sizes={{1,96,32,128,128}}
}}

%fused_transpose (p: {big}) -> {big} {{
  %p = {big}{{4,3,2,1,0}} parameter(0)
  ROOT %transpose.2 = {big}{{4,3,2,1,0}} transpose(%p), dimensions={{0,1,2,4,3}}
}}

ENTRY %main (a: {big}) -> {big} {{
  %a = {big}{{4,3,2,1,0}} parameter(0)
  ROOT %copy.3 = {big}{{3,4,2,1,0}} copy(%a)
}}
"""
    found = _count(hlo, {"[32,96,32,128,128]"})
    assert [x.split(" =")[0].removeprefix("ROOT ") for x in found] == ["%transpose.2", "%copy.3"]


def test_prefill_memory_finds_the_largest_buffers_of_a_compiled_program():
    """benchmarks.prefill_memory.largest_buffers reads an optimized HLO module: a program that
    makes a [64, 256, 128] float32 product (8 MiB) and a transposed bf16 copy of it lists those
    first and lists the copy with its bytes and layout (instructions inside fusions count too:
    they say where a big buffer is made), parameters left out, largest first."""
    import numpy as np

    from benchmarks.prefill_memory import largest_buffers

    def f(a, b):
        x = jnp.einsum("bij,bjk->bik", a, b)  # [64, 256, 128] float32
        return x, jnp.swapaxes(x, 1, 2).astype(jnp.bfloat16) * 2

    s = jax.ShapeDtypeStruct
    hlo = jax.jit(f).lower(s((64, 256, 32), jnp.float32), s((64, 32, 128), jnp.float32)).compile().as_text()
    top = largest_buffers(hlo, top=50)
    assert top[0]["bytes"] == 64 * 256 * 128 * 4 and top[0]["shape"] == "f32[64, 256, 128]", top
    copies = [r for r in top if r["shape"] == "bf16[64, 128, 256]"]
    assert copies and copies[0]["bytes"] == 64 * 256 * 128 * 2 and copies[0]["layout"].startswith("{"), top
    assert all(r["op"] != "parameter" for r in top) and np.all(np.diff([r["bytes"] for r in top]) <= 0)


def test_decode_loop_gap_dry_run_drives_one_computation_two_ways(tmp_path, monkeypatch):
    """benchmarks.decode_loop_gap on a tiny CPU model: generate's while_loop and its step called
    from Python emit the same greedy tokens (KIVI-2), every timing is positive, and the results
    are written."""
    import json

    from benchmarks import decode_loop_gap

    monkeypatch.setenv("OUT", str(tmp_path))
    decode_loop_gap.main(["--dry-run", "--caches", "kivi2", "--no-trace", "--name", "gap"])
    (path,) = tmp_path.glob("gap-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["cache"] for r in rows] == ["kivi2"]
    for r in rows:
        assert r["same_tokens"] and r["steps"] == r["new_tokens"] - 1, r
        assert min(r["loop_ms"], r["python_steps_ms"], r["model_steps_ms"]) > 0, r


def test_continuation_benchmark_runs_its_ways(monkeypatch):
    """benchmarks.continuation on a tiny random Llama (dense, float32): the chunked prefill (its
    own writes, or appends), the decode-step feed and a fresh prefill of the whole sequence give
    the same first token; the extend_appends way really appends (and only it); the decode_steps
    way really runs the decode steps (the model is never called with extend=True)."""
    import functools

    import models
    from benchmarks import continuation
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    model = models.init_random(cfg, jax.random.key(2), init_std=0.5)
    extends, call = [], type(model).__call__

    @functools.wraps(call)  # (generate reads the call's keywords from its signature)
    def counted(self, *a, **kw):
        extends.append(kw.get("extend", False))
        return call(self, *a, **kw)

    monkeypatch.setattr(type(model), "__call__", counted)
    each, append_each = [], continuation.StackedCache.append_each

    def counted_each(self, *a, **kw):
        each.append(1)
        return append_each(self, *a, **kw)

    monkeypatch.setattr(continuation.StackedCache, "append_each", counted_each)
    times, tokens = continuation.measure(model, prompt=20, new=9, capacity=40, kivi=None, reps=1, batch=2,
                                         ways=("extend", "fresh_prefill", "extend_chunked", "fresh_chunked"), chunk=4)
    assert not each
    times2, tokens2 = continuation.measure(model, prompt=20, new=9, capacity=40, kivi=None, reps=1, batch=2,
                                           ways=("extend_appends", "extend_xla", "extend_whole", "extend_in_loop",
                                                 "extend_after", "decode_steps"))
    assert each  # (the extend_appends way's traces, one a layer: after the extend way's, not a cache hit)
    times.update(times2)
    tokens.update(tokens2)
    assert set(times) == set(continuation.WAYS)
    assert len(set(tokens.values())) == 1, tokens
    assert all(t > 0 for t in times.values())
    assert True in extends  # (the extend way's traces; the decode_steps way's below do not)
    extends.clear()
    with continuation.mock.patch.object(continuation.gen, "_takes", continuation._no_extend(continuation.gen._takes)):
        continuation.gen.generate(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=1,
                                  cache=continuation.gen.generate(model, jnp.zeros((1, 5), jnp.int32), max_new_tokens=1,
                                                                  max_length=12).cache)
    assert extends and not any(extends)
    # a chunk's compiled temporaries are a fraction of the whole continuation's
    temp = {n: continuation.extend_temp_bytes(model, batch=2, new=n, capacity=600, kivi=None) for n in (16, 512)}
    assert 0 < temp[16] < temp[512] / 4, temp


def test_e2e_summary_gives_each_kivi2_layouts_ratios_to_dense():
    """The paper-setting ratios come for KIVI-2 in both layouts, each against the dense row and
    HF's fastest."""
    from benchmarks import e2e

    def row(cache, tps, step, peak):
        return {"model": "m", "section": "paper", "cache": cache, "tokens_per_s": tps, "step_ms": step,
                "peak_bytes": peak, "batch": 96, "prompt_len": 160}

    s = e2e.summarize({"rows": [row("dense", 800.0, 10.0, 30e9), row("kivi2", 700.0, 12.5, 20e9),
                                row("kivi2m", 900.0, 9.0, 24e9), row("hf_dense", 160.0, 60.0, 31e9),
                                row("hf_quanto2", 150.0, 70.0, 21e9)]})["m"]
    assert s["paper_hf_best"] == "hf_dense"
    assert abs(s["paper_tps_kivi2_over_hf_best"] - 4.375) < 1e-12 and abs(s["paper_tps_kivi2m_over_hf_best"] - 5.625) < 1e-12
    assert abs(s["paper_step_ms_kivi2_over_dense"] - 1.25) < 1e-12
    assert abs(s["paper_step_ms_kivi2m_over_dense"] - 0.9) < 1e-12
    assert abs(s["paper_tps_kivi2m_over_dense"] - 1.125) < 1e-12
    assert abs(s["paper_peak_dense_over_kivi2m"] - 1.25) < 1e-12
    assert e2e.TARGETS["paper_step_ms_kivi2m_over_dense"] == 1.0
    assert e2e.TARGETS["paper_peak_dense_over_kivi2m"] == e2e.TARGETS["paper_peak_dense_over_kivi2"] == 2.6


def test_e2e_sweep_ratios_for_each_kivi2_layout():
    """The sweep's targets (max batch, best tokens/s against dense's) for KIVI-2 in the Mosaic
    layout too: run126 swept dense and kivi2m only and its summary had no ratio (the README's
    8x and 1.63x were computed by hand). Equal-batch step ratios likewise."""
    from benchmarks import e2e

    def row(cache, batch, tps, step, oom=False):
        return {"model": "m", "section": "sweep", "cache": cache, "batch": batch, "tokens_per_s": tps,
                "step_ms": step, "prompt_len": 4096, "oom": oom, "status": "oom" if oom else "ok"}

    rows = [row("dense", 16, 700.0, 20.0), row("dense", 32, 926.1, 22.0), row("dense", 64, None, None, oom=True),
            row("kivi2m", 32, 1283.0, 21.0), row("kivi2m", 256, 1514.0, 60.0)]
    s = e2e.summarize({"rows": rows})["m"]
    assert s["sweep_T4096_max_batch_kivi2m_over_dense"] == 8.0
    assert abs(s["sweep_T4096_best_tps_kivi2m_over_dense"] - 1514.0 / 926.1) < 1e-12
    assert s["sweep_T4096_step_ms_kivi2m_over_dense_by_batch"] == {"32": 21.0 / 22.0}
    assert "sweep_T4096_max_batch_kivi2_over_dense" not in s  # (no kivi2 rows)
    assert e2e.TARGETS["sweep_max_batch_kivi2m_over_dense"] == 4.0  # (what the markdown flags it against)
    assert e2e.TARGETS["sweep_best_tps_kivi2m_over_dense"] == 3.5


def test_e2e_plot_draws_only_the_sections_a_run_has(tmp_path):
    """A sweep-only run (--skip-paper) is one panel, not a second one saying "no data": the PNG
    is one 7-inch panel wide at the plot's 110 dpi; with both sections it is two."""
    import struct

    from benchmarks import e2e

    def row(section, cache, batch, tps):
        return {"model": "m", "section": section, "cache": cache, "batch": batch, "tokens_per_s": tps,
                "peak_bytes": 2**30, "prompt_len": 160, "new_tokens": 8, "status": "ok"}

    def width(rows):
        path = tmp_path / f"{len(rows)}.png"
        e2e.render_plot({"rows": rows, "commit": "x", "device": "cpu", "dry_run": True}, path)
        return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the IHDR chunk's width

    sweep = [row("sweep", "dense", 8, 100.0), row("sweep", "kivi2", 8, 90.0), row("sweep", "kivi2", 16, 150.0)]
    assert width(sweep) == 7 * 110
    assert width(sweep + [row("paper", "dense", 96, 800.0)]) == 14 * 110
    assert width([]) == 14 * 110  # nothing measured: both panels say so


def test_mosaic_modules_hash_a_kernel_without_its_locations():
    """benchmarks.mosaic_modules: the same configuration lowers to the same printed module (no
    debug locations, so a refactor that moves code keeps it), another variant to another, and the
    op counts see the default lane_softmax's fewer exps than the picks' (one a thread for every
    query row, not one a row)."""
    from benchmarks import mosaic_modules as mm

    lane, again, picks = mm.modules(4, {}), mm.modules(4, {}), mm.modules(4, {"lane_softmax": False})
    assert len(lane) == 1 and mm.digest(lane[0]) == mm.digest(again[0]) != mm.digest(picks[0])
    assert "loc(" not in lane[0]
    assert 0 < mm.op_counts(lane[0])["math.exp"] < mm.op_counts(picks[0])["math.exp"]


def test_decode_step_ab_command_buffer_presets():
    """decode_step_ab --command-buffers: a preset is the jit option XLA parses (XLA's defaults
    plus the kinds named), "default" sets nothing, another name is a named error; the option
    compiles (ignored off a GPU)."""
    from benchmarks import decode_step_ab as ab

    got = ab.compiler_options("conditional_while")["xla_gpu_enable_command_buffer"].split(",")
    assert got[:len(ab.DEFAULT_COMMAND_BUFFER)] == list(ab.DEFAULT_COMMAND_BUFFER)
    assert got[len(ab.DEFAULT_COMMAND_BUFFER):] == ["CONDITIONAL", "WHILE"]
    assert ab.compiler_options("default") == ab.compiler_options(None) == {}
    assert ab.compiler_options("off") == {"xla_gpu_enable_command_buffer": ""}
    with pytest.raises(ValueError, match=r"command buffer preset 'cond'; allowed: default, listed"):
        ab.compiler_options("cond")
    f = jax.jit(lambda x: x * 2.0, compiler_options=ab.compiler_options("conditional_while"))
    assert float(f(jnp.float32(1.5))) == 3.0


def test_decode_step_ab_rejects_a_tag_no_file_name_can_hold(capsys):
    """decode_step_ab --tag ends the result files' names: a comma (run96) is refused before any
    model is built, with the value named."""
    from benchmarks import decode_step_ab as ab
    with pytest.raises(SystemExit):
        ab.main(["--tag=-cb-default,conditional_while", "--layers", "1"])
    assert "--tag '-cb-default,conditional_while'" in capsys.readouterr().err


def test_decode_step_ab_summary_pairs_each_step_with_dense():
    """decode_step_ab.summary: each row's ratio is to dense's step with the same arm and command
    buffers, not to another configuration's."""
    import argparse

    from benchmarks import decode_step_ab as ab

    rows = [dict(cache="dense", arm="pallas", command_buffer="default", step_ms=8.0),
            dict(cache="dense", arm="pallas", command_buffer="conditional", step_ms=7.0),
            dict(cache="kivi2", arm="pallas", command_buffer="default", step_ms=8.4, rare_writes="step"),
            dict(cache="kivi2", arm="pallas", command_buffer="conditional", step_ms=7.7, rare_writes="step"),
            dict(cache="kivi2", arm="scan", command_buffer="default", step_ms=9.0)]
    env = dict(device="NVIDIA H200", jax_version="0.11.2", commit="abc1234")
    args = argparse.Namespace(model="mistral-7b", layers=32, batch=96, prompt=160, max_length=498)
    lines = ab.summary(rows, env, args).splitlines()
    assert lines[0].startswith("Decode step, mistral-7b shape, 32 layers, batch 96, prompt 160, capacity 498; "
                               "NVIDIA H200, jax 0.11.2, commit abc1234")
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[4:]]
    assert [b[4] for b in body] == ["1", "1", "1.05", "1.1", "None"]  # 8.4 / 8, 7.7 / 7, no dense scan row
    assert body[2][5] == "rare_writes=step" and body[0][5] == "-"


def test_gpu_tests_select_runs_only_the_matching_tests(tmp_path):
    """gpu_tests' --select reaches pytest as -k: of two tests in a group only the named one runs,
    and the table says which expression picked them."""
    from benchmarks import gpu_tests

    f = tmp_path / "test_pick.py"
    f.write_text("def test_alpha():\n    assert 1 + 1 == 2\n\n\ndef test_beta():\n    assert False\n")
    row = gpu_tests.run_group("g", [str(f)], workers=1, seconds=120, per_test=0, xml=str(tmp_path / "r.xml"),
                              select="alpha")
    assert (row["status"], row["tests"], row["passed"], row["failed"], row["select"]) == ("done", 1, 1, 0, "alpha")
    table = gpu_tests.summary_table([row], {"device": "cpu", "commit": "abc", "jax_version": "0"})
    assert "(-k 'alpha')" in table and "**1 passed, 0 failed" in table


def test_gpu_tests_reads_junit_and_progress_and_covers_every_test_file(tmp_path):
    """benchmarks/gpu_tests: a JUnit file's counts and failures (a failure and an error, a skip),
    the -q progress lines of a run cut before its summary, the table naming each failure, and
    GROUPS holding every test file of tests/ (a new file is not left out of the GPU run)."""
    import pathlib

    from benchmarks import gpu_tests

    xml = tmp_path / "r.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="1" tests="6" '
        'time="12.5"><testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a" '
        'name="test_ok2"/><testcase classname="tests.test_a" name="test_bad"><failure message="assert 2 == 1&#10;'
        'more">tb</failure></testcase><testcase classname="tests.test_a" name="test_np"><failure message='
        '"AssertionError: &#10;Arrays are not equal&#10;&#10;Mismatched elements: 3 / 8 (37.5%)&#10;x">tb</failure>'
        '</testcase><testcase classname="tests.test_b" name="test_err"><error message="boom">tb'
        '</error></testcase><testcase classname="tests.test_b" name="test_skip"><skipped message="no gguf"/>'
        '</testcase></testsuite></testsuites>')
    got = gpu_tests.junit_summary(str(xml))
    assert {k: got[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == dict(
        tests=6, passed=2, failed=2, errors=1, skipped=1)
    assert got["seconds"] == 12.5
    assert got["failures"] == [
        {"test": "tests.test_a::test_bad", "message": "assert 2 == 1 / more"},
        {"test": "tests.test_a::test_np", "message": "Arrays are not equal / Mismatched elements: 3 / 8 (37.5%) / x"},
        {"test": "tests.test_b::test_err", "message": "boom"}]
    out = "bringing up nodes...\n" + "." * 72 + " [ 30%]\n" + "..F.s.E.x\nsome other line with . and F\n"
    assert gpu_tests.progress_counts(out) == dict(passed=77, failed=1, errors=1, skipped=2)
    env = {"device": "NVIDIA H200", "commit": "abc", "jax_version": "0.11.2"}
    table = gpu_tests.summary_table([{"group": "g", "files": ["tests/test_a.py"], "status": "done", **got}], env)
    assert "**2 passed, 2 failed, 1 errors, 1 skipped** of 6" in table
    assert "- `tests.test_a::test_bad` (g): assert 2 == 1 / more" in table
    tests = pathlib.Path(common.ROOT) / "tests"
    grouped = {f for files in gpu_tests.GROUPS.values() for f in files}
    files = {f"tests/{p.name}" for p in tests.glob("test_*.py")} | {"tests/models"}
    assert files == grouped, f"benchmarks/gpu_tests.GROUPS lacks {files - grouped} / names missing {grouped - files}"


def test_continuation_way_out_of_memory_keeps_the_others(monkeypatch):
    """A way that runs out of device memory is None in the row (its oom_ways), the other ways are
    still timed; any other runtime error is raised."""
    import models
    from benchmarks import continuation
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16)
    model = models.init_random(cfg, jax.random.key(3), init_std=0.5)
    hidden = continuation._hidden

    def failing(way, text):
        def patched(w):
            if w == way:
                return continuation.mock.patch.object(continuation.gen, "generate",
                                                      side_effect=jax.errors.JaxRuntimeError(text))
            return hidden(w)
        return patched

    monkeypatch.setattr(continuation, "_hidden", failing("fresh_prefill", "RESOURCE_EXHAUSTED: Out of memory"))
    times, tokens = continuation.measure(model, prompt=6, new=3, capacity=16, kivi=None, reps=1,
                                         ways=("extend", "fresh_prefill"))
    assert times["fresh_prefill"] is None and tokens["fresh_prefill"] is None
    assert times["extend"] > 0 and 0 <= tokens["extend"] < 53
    monkeypatch.setattr(continuation, "_hidden", failing("fresh_prefill", "INTERNAL: something else"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        continuation.measure(model, prompt=6, new=3, capacity=16, kivi=None, reps=1, ways=("extend", "fresh_prefill"))


def test_generate_cpu_times_the_decode_steps_alone(monkeypatch):
    """benchmarks.generate_cpu on a tiny random Llama, with a stand-in clock (each generate call takes
    0.5 s plus 0.1 s a new token; dense's long call in the first timed round 2 s more): each cache's row
    has the prompt, N, the median times, decode_tokens_per_s = N / (median t_{1+N} - median t_1) and
    best_decode_tokens_per_s from the fastest times; an unknown cache is a usage error."""
    import models
    from benchmarks import generate_cpu
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=32)  # (KIVI's groups of 32 channels)
    model = models.init_random(cfg, 3)
    clock, calls, generate = [0.0], [], generate_cpu.kj.generate

    def timed(*a, max_new_tokens, **kw):
        calls.append(max_new_tokens)
        # calls 0-3 compile (dense 1, dense 5, kivi2 1, kivi2 5); call 5 is dense's first timed 5
        clock[0] += 0.5 + 0.1 * max_new_tokens + (2.0 if len(calls) == 6 else 0.0)
        return generate(*a, max_new_tokens=max_new_tokens, **kw)

    monkeypatch.setattr(generate_cpu.kj, "generate", timed)
    monkeypatch.setattr(generate_cpu, "_now", lambda: clock[0])
    rows = generate_cpu.measure(model, jnp.asarray([[5, 7, 11]], jnp.int32), ["dense", "kivi2"], new_tokens=4, reps=2)
    assert calls == [1, 5] * 6
    assert [r["cache"] for r in rows] == ["dense", "kivi2"]
    dense, kivi2 = ([r["prefill_s"], r["total_s"], r["decode_tokens_per_s"], r["best_decode_tokens_per_s"]]
                    for r in rows)
    np.testing.assert_allclose(dense, [0.6, 2.0, 4 / 1.4, 10.0])
    np.testing.assert_allclose(kivi2, [0.6, 1.0, 10.0, 10.0])
    assert all((r["prompt_len"], r["new_tokens"]) == (3, 4) for r in rows)
    with pytest.raises(SystemExit):
        generate_cpu.main(["--caches", "dense,kivi3"])
