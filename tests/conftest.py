"""Hypothesis profiles for the project's own tests.

- ``dev`` (default): random examples, as many as each test asks for.
- ``ci`` (chosen when the ``CI`` environment variable is set): the same examples on every run
  (derandomized), so a red CI run is reproducible and a green one is not luck.
- ``thorough``: 1000 examples for every test that does not set its own count, for hunting rare
  cases by hand
  (``HYPOTHESIS_PROFILE=thorough pytest -n auto``).

No profile has a deadline: Z3 calls and a loaded CI machine make timing meaningless, and speed
is measured by benchmarks, never asserted by tests.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
