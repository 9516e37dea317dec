"""Shared test settings: a hypothesis profile that keeps the CPU suite fast.

jit compilation is the main cost of these tests, so property tests use modest example
counts and no deadline (the first example of a new shape compiles). Set
HYPOTHESIS_PROFILE=thorough for a longer local run.
"""

import os

from hypothesis import HealthCheck, settings

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
