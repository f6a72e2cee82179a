"""The small GPT: size, causality, initial loss, fragments."""

import math

import pytest
import torch

from lowcomm.models import GPT, GPTConfig


def test_calibration_size():
    # DESIGN 9's calibration model: 4 layers, width 128, 4 heads, context 128, bytes.
    m = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, seq_len=128))
    assert m.num_params() == 842_496
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 4
    assert m.head.weight is m.tok_emb.weight  # tied


def test_causal_and_initial_loss():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, seq_len=16)).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(y)
    assert torch.equal(a[:, :10], b[:, :10])  # the future does not leak into the past
    assert not torch.equal(a[:, 10:], b[:, 10:])
    _, loss = m(x, torch.randint(0, 256, (2, 16)))
    assert abs(loss.item() - math.log(256)) < 0.1  # near-uniform predictions at init


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="positive"):
        GPTConfig(n_layer=0)
    m = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8))
    with pytest.raises(ValueError, match="context"):
        m(torch.zeros(1, 9, dtype=torch.long))
