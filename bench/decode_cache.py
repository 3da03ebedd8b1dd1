"""Latent attention's compressed cache against the grouped-query stand-in moejax had before
(issue 32): cache bytes per token for the full-size configs/deepseek_v3.py, and decode tokens/s
of a random-init model of the same kind on this machine, through moejax.generate.

  python bench/decode_cache.py [D_MODEL LAYERS BATCH NEW_TOKENS]

The stand-in is configs/deepseek_v3.py with attention=gqa: 128 query heads sharing 8 key-value
heads of 128 dims (the old deepseek_v3_shaped.py), scaled like the MLA model here. Figures:
docs/benchmarks.md."""

import sys
import time

import numpy as np
from flax import nnx

from configs import deepseek_v3
from moejax.generate import cache_line, generate
from moejax.model.transformer import Transformer


def stand_in(m, kv_heads: int, head_dim: int):
    m = m.copy_and_resolve_references()
    m.update(attention="gqa", num_kv_heads=kv_heads, head_dim=head_dim)
    return m


full = deepseek_v3.get_config().model
print("full size, bf16:")
print("  mla:", cache_line(full))
print("  gqa:", cache_line(stand_in(full, 8, 128)))

d, layers, batch, new = (int(a) for a in (sys.argv[1:] or ["256", "4", "8", "128"]))
small = deepseek_v3.get_config("smoke").model
# 16 heads: MLA's latent (4 x the rope dims) against 2 key-value heads of the qk width
small.update(d_model=d, num_layers=layers, num_heads=16, q_lora_rank=d // 2, kv_lora_rank=d // 2,
             qk_nope_head_dim=d // 8, qk_rope_head_dim=d // 16, v_head_dim=d // 8,
             vocab_size=512, dispatch="dropless", mtp_layers=0)
prompts = np.random.default_rng(0).integers(0, 512, (batch, 16)).tolist()
for name, m in (("mla", small), ("gqa", stand_in(small, 2, d // 8 + d // 16))):
    model = Transformer(m, mesh=None, rngs=nnx.Rngs(0))
    generate(model, prompts, new, cache_len=256)  # compiles the timed program
    start = time.perf_counter()
    generate(model, prompts, new, cache_len=256)
    seconds = time.perf_counter() - start
    print(f"{name} d_model={d} layers={layers} batch={batch}: {batch * new / seconds:,.0f} "
          f"tokens/s; {cache_line(m)}")
