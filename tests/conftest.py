import os
import shutil
import tempfile

# Eight simulated CPU devices; must be set before jax is first imported. The tests' programs
# are tiny, so compiling is most of their time: XLA:CPU's backend (LLVM) optimisation is off,
# which halves a compile, and its fusions are emitted by the elemental emitter instead of the
# MLIR fusion emitters, which cuts the rest by more than half (a layout test's train-step
# gradient: 7.9 s of compile -> 2.8 s). The partitioned HLO the tests check (shardings,
# collectives) is the same either way; only this CPU's machine code differs.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA's persistent compilation cache, made new for each run of the suite (never an earlier
# run's) and shared by the run's pytest-xdist workers and the processes its tests start: the
# many tests that compile the same program (the smoke config's train step above all) compile
# it once. A cached executable is the program XLA compiled, bit for bit. The process that
# makes the folder (the controller, or the only one) removes it when the run ends.
_MADE_CACHE = "MOEJAX_TEST_XLA_CACHE" not in os.environ
if _MADE_CACHE:
    os.environ["MOEJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="moejax-test-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MOEJAX_TEST_XLA_CACHE"]
# Programs that compile in under 0.1 s (eager ops, small helpers) cost more to store than
# to compile again.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _MADE_CACHE:
        shutil.rmtree(os.environ["MOEJAX_TEST_XLA_CACHE"], ignore_errors=True)
