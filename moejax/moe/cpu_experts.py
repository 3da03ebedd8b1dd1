"""The SwiGLU experts kernel for XLA:CPU (cpu_experts.cc): build, register, call.

The kernel is compiled on first use for the CPU it runs on (-march=native) and cached under
$MOEJAX_CACHE (default ~/.cache/moejax). It needs AVX-512. Where it cannot be built (no C++
compiler, no AVX-512), or with MOEJAX_CPU_KERNEL=0, the experts run as XLA ops
(moejax/moe/experts.py) instead.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cpu_signature() -> bytes:
    """What -march=native depends on: a cached build is reused only on the same CPU kind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine.encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.startswith(wanted)})).encode()


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + include.encode()
                         + _cpu_signature()).hexdigest()[:16]
    cache = Path(os.environ.get("MOEJAX_CACHE", Path.home() / ".cache" / "moejax"))
    lib = cache / f"cpu_experts-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # rename: concurrent builds are safe
            out = Path(tmp) / lib.name
            subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(out)],
                           check=True, capture_output=True, text=True)
            os.replace(out, lib)
    return lib


@functools.cache
def available() -> bool:
    """Builds and registers the kernel once per process; False where that is not possible."""
    if os.environ.get("MOEJAX_CPU_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return False
    for name, symbol in (("moejax_experts_fwd", lib.MoejaxExpertsForward),
                         ("moejax_experts_bwd", lib.MoejaxExpertsBackward)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return True


# Rows per expert up to which the kernel beats XLA:CPU's matmuls (`bench layer`, d = 512,
# f = 1024, ratio to dense: 40 rows 1.43 against XLA's 2.43; 160 rows 1.32-1.35 against
# 1.46-1.73; 320 rows 1.50 against 1.37-1.48; 1280 rows 2.2 against 1.2). With hundreds of
# rows XLA's blocked matmuls reuse each weight well enough.
MAX_ROWS = 192


def supports(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation: str) -> bool:
    """Whether the kernel runs these experts: float32 SwiGLU on CPU, widths multiples of 16,
    at most MAX_ROWS rows per expert."""
    d, f = x.shape[-1], w_out.shape[-2]
    return (activation == "swiglu" and d % 16 == 0 and f % 16 == 0 and x.shape[1] <= MAX_ROWS
            and all(a.dtype == jnp.float32 for a in (x, w_in, w_out))
            and jax.default_backend() == "cpu" and available())


def forward(x, w_in, w_out, filled):
    """-> y [E, rows, d] and h [E, rows, 2f] (the pre-activations, filled rows first)."""
    num_experts, rows, _ = x.shape
    h = jax.typeof(x).update(shape=(num_experts, rows, w_in.shape[-1]))  # varies like x
    return jax.ffi.ffi_call("moejax_experts_fwd", (jax.typeof(x), h))(x, w_in, w_out, filled)


def backward(x, w_in, w_out, filled, h, dy):
    """-> dx, and the gradients of w_in and w_out."""
    out = (jax.typeof(x), jax.typeof(w_in), jax.typeof(w_out))
    return jax.ffi.ffi_call("moejax_experts_bwd", out)(x, w_in, w_out, filled, h, dy)
