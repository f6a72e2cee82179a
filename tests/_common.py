"""Helpers shared by the strategy tests: a tiny model, per-(rank, step) batches, the loss."""

import threading

import torch

# run_local's workers are threads sharing torch's global RNG: seed and draw atomically.
RNG_LOCK = threading.Lock()


def make_model(seed=0, dtype=torch.float32):
    with RNG_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5, 6, generator=g).to(dtype), torch.randn(5, 3, generator=g).to(dtype)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()
