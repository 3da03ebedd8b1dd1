"""Bytes per device of the train state on fsdp x expert layouts (parallel.RULES), read off the
live arrays' shards: every weight and AdamW moment split over all 8 devices, the dense part
(attention, embeddings, norms, dense FFNs, routers) over fsdp and expert together, so that
each device holds total / 8 of the parameters and of the optimizer state, not `expert` copies
of the dense part."""

import os

import jax
import jax.numpy as jnp
import pytest

from moejax import cli, parallel
from moejax.plan.estimate import resolve_vocab
from moejax.run import state
from moejax.run.params import bytes_per_device
from tests.test_state import state_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `path.py[:variant]`, as --config takes it
CONFIGS = ["configs/tiny.py", "configs/deepseek_v3.py:smoke"]
LAYOUTS = [{"fsdp": 4, "expert": 2}, {"fsdp": 2, "expert": 4}]


def live_state(s: state.Setup) -> dict:
    """The train state of `s` made on the devices in the layout state.init gives it (its
    out_shardings), as zeros: the layout is under test, and zeros compile in a fraction of
    the initializer's time."""
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), s.abstract),
                    out_shardings=s.shardings)
    return zeros()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda m: "f{fsdp}e{expert}".format(**m))
@pytest.mark.parametrize("spec", CONFIGS)
def test_each_device_holds_an_eighth_of_params_and_optimizer(spec, layout):
    config = cli.load(os.path.join(REPO, spec),
                      [f"--config.mesh.{a}={layout.get(a, 1)}" for a in parallel.AXES])
    resolve_vocab(config)
    s = state.setup(config, parallel.make_mesh(parallel.mesh_sizes(config.mesh, 8)))
    train_state = live_state(s)
    for part in ("params", "opt_state"):
        total = sum(x.nbytes for x in jax.tree.leaves(train_state[part]))
        per_device = state_bytes(train_state[part])
        assert len(per_device) == 8
        print(f"{spec} {parallel.describe(s.mesh)} {part}: total / 8 = {total / 8 / 2**20:.3f} "
              f"MiB, per device {min(per_device.values()) / 2**20:.3f}-"
              f"{max(per_device.values()) / 2**20:.3f} MiB")
        for device, got in per_device.items():
            assert abs(got - total / 8) <= 0.05 * total / 8, (part, device, got, total / 8)
        # The planner's figure (run/params.py, from the abstract state) is the live one.
        assert bytes_per_device(s.abstract[part]) == bytes_per_device(train_state[part])


def test_a_mesh_axis_splits_one_dim_of_an_array():
    """A routed expert's weight keeps its experts dim over expert and its d_model dim over fsdp
    alone; a dense weight's d_model dim takes both; an axis that does not divide is dropped."""
    mesh = parallel.make_mesh({"fsdp": 2, "expert": 4})
    P = jax.sharding.PartitionSpec
    expert_in = ("experts", "embed", None, "mlp")  # [E, d, 2, f] after the layer axis
    assert parallel.spec(expert_in, (3, 8, 32, 2, 64), mesh) == P(None, "expert", "fsdp", None,
                                                                  None)
    assert parallel.spec(("mlp", "embed"), (64, 32), mesh) == P(None, ("fsdp", "expert"))
    assert parallel.spec(("vocab", "embed"), (257, 32), mesh) == P(None, ("fsdp", "expert"))
    assert parallel.spec(("embed",), (6,), mesh) == P("fsdp")  # 8 does not divide 6, 2 does
    assert parallel.undivided(("embed",), (6,), mesh) == ["embed=6 (expert)"]
    assert parallel.undivided(expert_in, (8, 32, 2, 64), mesh) == []
