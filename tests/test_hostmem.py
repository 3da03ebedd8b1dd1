"""hostmem.keep_freed_memory: a freed large block is reused without new page faults."""

import os
import subprocess
import sys

import pytest

from moejax.run import hostmem

# malloc a 256 MiB block, write it, free it, do it again; print the minor page faults of the
# second round. glibc mmaps a block this large and unmaps it on free, so by default the second block
# faults in every 4 KiB page again (65,536 faults).
SCRIPT = """
import ctypes, resource
from moejax.run import hostmem
print(hostmem.keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch_and_free():
    block = libc.malloc(2**28)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_second_block(env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_block_is_reused_without_page_faults():
    applied, faults = faults_of_second_block({"JAX_PLATFORMS": "cpu"})
    assert applied
    assert faults < 1000  # a few stray pages of Python's own, not 65,536
    for env in ({"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"}):
        applied, faults = faults_of_second_block(env)
        assert not applied  # other backends, and users who tune malloc, keep their settings
        assert faults > 60_000


def test_backend_choice_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem._runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not hostmem._runs_on_cpu()
