import os
import time

import pytest

# Eight simulated CPU devices; must be set before jax is first imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_runtest_setup(item):
    # CI runs the slow tests only while its time budget lasts: a test that would start after
    # the deadline (seconds since the epoch) is skipped, so running out of time is not a failure
    # and a test that fails before it still is.
    deadline = os.environ.get("MOEJAX_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("CI time budget spent (MOEJAX_TEST_DEADLINE)")
