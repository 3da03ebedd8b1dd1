"""Sample text from the newest checkpoint of a run.

  python -m moejax.generate --workdir runs/tiny --prompt "def main(" [--tokens 200]
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import data, parallel, state
from moejax.checkpoint import Checkpoints


def load(workdir: str):
    """The run's config and model with the newest checkpoint's parameters, on one device."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.model.num_groups = 1  # one capacity group: the prompt's tokens are routed together
    setup = state.setup(config, parallel.make_mesh({}))  # one device, whatever the run's mesh
    ckpt = Checkpoints(workdir, keep=config.train.keep_checkpoints, keep_best=False)
    step = ckpt.latest_step()
    if step is None:
        raise SystemExit(f"error: no checkpoint in {workdir}/checkpoints")
    restored, _ = ckpt.restore(step, setup.abstract)
    ckpt.close()
    return config, nnx.merge(setup.graphdef, restored["params"]), step


def sample(model, prompt_ids, num_tokens: int, temperature: float, seed: int, max_len: int):
    """Autoregressive sampling; recomputes the whole (windowed) sequence each step."""
    ids = list(prompt_ids)
    forward = nnx.jit(lambda m, t: m(t, train=False)[0])
    key = jax.random.key(seed)
    for i in range(num_tokens):
        window = jnp.asarray([ids[-max_len:]], jnp.int32)
        logits = forward(model, window)[0, -1]
        if temperature <= 0:
            nxt = int(jnp.argmax(logits))
        else:
            nxt = int(jax.random.categorical(jax.random.fold_in(key, i), logits / temperature))
        ids.append(nxt)
    return ids


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    config, model, step = load(args.workdir)
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    prompt = list(tokenizer.encode(args.prompt)) or [tokenizer.eos_id]
    ids = sample(model, prompt, args.tokens, args.temperature, args.seed, config.data.seq_len)
    print(f"# step {step} of {args.workdir}")
    print(tokenizer.decode(ids if args.prompt else ids[1:]))


if __name__ == "__main__":
    main()
