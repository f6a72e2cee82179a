"""Tiny DiLoCo on CPU: a 0.2M-parameter GPT on the stdlib corpus, a few minutes on 2 cores.

For: checking an install, trying `lowcomm train` / torchrun / `lowcomm peer` end to end, and tests.
DiLoCo (arXiv 2311.08105): AdamW inner steps, every H=20 steps an all-reduce of pseudo-gradients
and a Nesterov outer step (lr 0.7, momentum 0.9). H is short because the run is short.

    lowcomm train --recipe recipes/tiny_diloco.py
    torchrun --nproc-per-node 4 -m lowcomm.train --recipe recipes/tiny_diloco.py --set replica_size=2
    torchrun --nproc-per-node 4 -m lowcomm.train --recipe recipes/tiny_diloco.py --set replica_size=2 \
        --set parallel=fsdp     # FSDP2 inside each replica instead of DDP
"""

from lowcomm.train import ModelConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        name="tiny_diloco",
        description=__doc__.splitlines()[0],
        strategy="diloco",
        knobs={"sync_every": 20, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
        inner="adamw",
        lr=2e-3,
        weight_decay=0.1,
        warmup_steps=20,
        steps=300,
        batch_size=16,
        model=ModelConfig(n_layer=2, n_embd=64, n_head=4, seq_len=64),
        eval_every=60,
        eval_sequences=32,
        log_every=20,
        checkpoint_every=100,
    )
