"""Issue 32: the DeepSeek-V3 architecture as a whole (configs/deepseek_v3.py:smoke: latent
attention with a low-rank query, YaRN, group-limited sigmoid routing with its bias, a dense
first layer, a shared expert, a multi-token prediction module) gives one device's loss and
every gradient on six layouts of the 8 devices, and a checkpoint moves between two of them."""

import numpy as np
import pytest

from configs import deepseek_v3
from moejax.train import train_and_evaluate
from tests.test_state import loss_and_grads, on


def small():
    config = deepseek_v3.get_config("smoke")
    # a vocabulary `tensor` divides; capacity groups fixed, so every layout drops alike; one
    # dense layer, one MoE layer and the MTP module's: every kind of block, compiled 7 times
    config.model.update(vocab_size=256, num_groups=8, num_layers=2)
    return config


LAYOUTS = [  # (data, fsdp, expert, tensor)
    (8, 1, 1, 1),
    (1, 8, 1, 1),
    (1, 4, 2, 1),  # FSDP x EP
    (1, 2, 4, 1),
    (1, 1, 4, 2),  # EP x TP: the heads split
    (1, 2, 2, 2),  # FSDP x EP x TP
]


@pytest.mark.slow
def test_same_loss_and_gradients_on_six_layouts():
    loss0, grads0, _ = loss_and_grads(on(small(), (1, 1, 1, 1)))
    assert any(".attn.kv_up" in n for n in grads0) and any(n.startswith("mtp.") for n in grads0)
    for layout in LAYOUTS:
        loss, grads, _ = loss_and_grads(on(small(), layout))
        assert grads.keys() == grads0.keys()
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=str(layout))
        for name, want in grads0.items():
            # rtol 1e-5 on each entry; entries far below their weight's largest gradient
            # against 1e-5 of that instead: this model's sums cancel more than tiny's (the
            # layout's other summation order moves them by up to 2e-6 of it, measured).
            np.testing.assert_allclose(grads[name], want, rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{layout}: {name}")


@pytest.mark.slow
def test_checkpoint_moves_from_fsdp_x_expert_to_expert_x_tensor(tmp_path):
    config = small()
    config.model.vocab_size = 260  # the byte tokenizer's 257 ids, a multiple of tensor
    config.train.update(steps=4, ckpt_every=2, eval_every=4)
    straight = train_and_evaluate(on(config, (1, 4, 2, 1)), str(tmp_path / "straight"))
    first = on(config, (1, 4, 2, 1))
    first.train.stop_at = 2
    train_and_evaluate(first, str(tmp_path / "moved"))
    got = train_and_evaluate(on(config, (1, 1, 4, 2)), str(tmp_path / "moved"))["train_loss"]
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[s] for s in (3, 4)],
                               [straight["train_loss"][s] for s in (3, 4)], rtol=1e-5)
