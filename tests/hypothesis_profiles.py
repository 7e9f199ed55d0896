"""Hypothesis profiles for the property tests, chosen with the environment variable
HYPOTHESIS_PROFILE (default "ci"):

- "ci":  derandomized (the same examples on every run), 25 examples per property, no deadline;
- "dev": 300 random examples per property, for a longer local search:
         HYPOTHESIS_PROFILE=dev python -m pytest tests/test_properties_verification.py

Import ``PROFILE`` (the settings object) and decorate properties with ``@PROFILE``; shrinking
reports a minimal failing example either way.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

COMMON = dict(deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **COMMON)
settings.register_profile("dev", max_examples=300, **COMMON)

NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
try:
    PROFILE = settings.get_profile(NAME)
except Exception as error:  # hypothesis.errors.InvalidArgument
    raise ValueError(f"HYPOTHESIS_PROFILE={NAME!r} is not a registered profile "
                     "(use 'ci' or 'dev')") from error
