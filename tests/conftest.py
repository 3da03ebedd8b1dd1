import os

# Eight simulated CPU devices; must be set before jax is first imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def compile_cache(tmp_path):
    """XLA's persistent cache for one test: its runs compile the same programs, and only the
    first compiles them (a cached executable is the same program, bit for bit)."""
    import jax
    from jax._src import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {key: getattr(jax.config, key) for key in keys}
    for key, value in zip(keys, (str(tmp_path / "xla"), 0.0, 0), strict=True):
        jax.config.update(key, value)
    compilation_cache.reset_cache()
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()
