"""125M-class GPT with DiLoCo, for GPUs: the DiLoCo paper's hyperparameters on tokenized data.

For: real pretraining runs across poorly connected clusters (one replica per cluster/node,
launched with torchrun on each). DiLoCo (Douillard et al. 2023, arXiv 2311.08105): inner AdamW
lr 4e-4, weight decay 0.1, 1000 warmup steps then cosine decay, sequences of 1024 tokens, 512
sequences per replica per step, H=500 inner steps between syncs, outer SGD lr 0.7 with Nesterov
momentum 0.9; 88k steps in the paper. The model is GPT-2 small's shape (12 layers, width 768,
12 heads, context 1024; 124M parameters with the GPT-2 vocabulary padded to 50304).

Data: a folder of nanoGPT-style uint16 token files (`*.bin`, GPT-2 tokenizer, vocabulary 50257),
by default data/tokens; point elsewhere with `--set data=/path/to/tokens`.

    torchrun --nproc-per-node 8 --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 \\
        -m lowcomm.train --recipe recipes/gpt125m_diloco.py --set replica_size=8 --set grad_accum=2

batch_size (512) is split over the replica's ranks and then into grad_accum micro-batches:
512 / (8 ranks x 2) = 32 sequences of 1024 tokens per forward, which fits an 80 GB GPU in bf16.
"""

from lowcomm.train import ModelConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        name="gpt125m_diloco",
        description=__doc__.splitlines()[0],
        strategy="diloco",
        knobs={"sync_every": 500, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
        inner="adamw",
        lr=4e-4,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        warmup_steps=1000,
        schedule="cosine",
        min_lr_ratio=0.1,
        grad_clip=1.0,
        steps=88_000,
        batch_size=512,
        grad_accum=16,
        model=ModelConfig(n_layer=12, n_embd=768, n_head=12, seq_len=1024, vocab_size=50304),
        data="data/tokens",
        vocab_size=50257,
        eval_every=1000,
        eval_sequences=256,
        log_every=50,
        checkpoint_every=2000,
        keep_checkpoints=3,
        device="auto",
        amp=True,
    )
