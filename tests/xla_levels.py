"""XLA:CPU optimization levels of the test suite (tests/conftest.py sets FAST_COMPILE for the run).

FAST_COMPILE: LLVM at -O0 without its expensive passes, for the suite's many small programs,
which mostly compile. RUN_OPTIONS: XLA's own level, as per-jit ``compiler_options``, for the
programs that run many times (SmolLM2's decode steps: 8.2 s at -O0 vs 2.4 s) or whose numbers -O0
changes (bfloat16 subnormals flushed moving through a broadcast or a select).
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RUN_OPTIONS = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}
