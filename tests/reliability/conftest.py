"""Hypothesis profiles: "suite" (the default run: few, derandomized examples, so CI is reproducible and fast) and
"fuzz" (`make fuzz`: many random examples)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("suite", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 2000)), **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))
