"""Shared test settings: a hypothesis profile that keeps the CPU suite fast.

jit compilation is the main cost of these tests, so property tests use modest example
counts and no deadline (the first example of a new shape compiles). Set
HYPOTHESIS_PROFILE=thorough for a longer local run. The suite also runs on a GPU (the kernels
compiled; results/gpu-tests-*), where float32 dots are asked for at full precision.
"""

import os
import shutil
import tempfile

from xla_levels import FAST_COMPILE

# Most of the suite's time is XLA compiling small programs (interpreted kernels, tiny models):
# LLVM at -O0 without its expensive passes cut the whole suite's pytest time by a third on the
# 2-core CI machine (1114 -> 719 s; tests/test_pallas_kernels.py's two slowest 52 -> 31 s), the
# tests that generate with SmolLM2 included (86 -> 74 s). Set before jax starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

# Many tests compile programs another test (or the other xdist worker) already compiled: a new
# jax.jit of the same lambda, the same interpreted kernel at the same shapes. jax's persistent
# compilation cache keys an executable by its HLO, so a directory of this run's own, shared by
# its workers, compiles each once: the whole suite on 2 workers 1102 -> 568 s (594 passed). The
# process that imports this first (pytest-xdist's controller, whose environment its workers
# inherit) makes it and removes it at the end: no entry outlives the run.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kivi-jax-tests-jit-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # (smaller ones: cheaper to compile)

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

if jax.default_backend() == "gpu":
    # XLA:GPU runs float32 dots in TF32 (10 bits of mantissa) by default; the tests hold float32
    # paths to float32 tolerances against float64 NumPy and PyTorch (the kernels ask for HIGHEST
    # themselves). On the CPU, where CI runs, float32 dots are float32 already.
    jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The packaged SmolLM2 GGUF's path; the test is skipped, saying how to get it, where it is missing."""
    pytest.importorskip("gguf")
    import models

    try:
        return models.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer (byte-level BPE and a chat template) from the packaged GGUF."""
    import models
    from models.config import read_gguf

    tok = models.gguf_tokenizer(read_gguf(smollm2_gguf))
    assert tok.chat_template and len(tok) == 49152
    return tok


def pytest_unconfigure(config):
    """The run's compilation cache goes with the run."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
