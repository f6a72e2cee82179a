"""The configuration of a training run (``lowcomm train``, ``lowcomm peer``, recipes).

A recipe is a Python file with ``config() -> TrainConfig``; :func:`load_recipe` loads one by path
(lowcomm never imports recipes/), :func:`apply_overrides` applies ``--set key=value`` overrides,
each parsed against its field's type (strategy knobs against the strategy's typed config).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from .loop import StrategySetup, resolve_strategy
from .outer.registry import available, get_strategy, parse_knob

__all__ = ["ModelConfig", "TrainConfig", "TrainResult", "apply_overrides", "load_recipe"]


@dataclass
class ModelConfig:
    """The GPT's shape (see :class:`lowcomm.models.GPTConfig`); vocab_size 0 takes the corpus's."""

    n_layer: int = 4  # transformer blocks
    n_embd: int = 128  # width
    n_head: int = 4  # attention heads
    seq_len: int = 128  # context (tokens)
    vocab_size: int = 0  # 0: the corpus's vocabulary (256 for text); larger pads the embedding
    dropout: float = 0.0  # dropout (draws from the RNG; 0 keeps replicas' runs independent of thread timing)


@dataclass
class TrainConfig:
    """Everything a run needs; recipes return one of these. Every field is documented in place."""

    name: str = "run"  # run name; the output goes to <out_dir>
    description: str = ""  # what the recipe is for
    strategy: str = "diloco"  # a registered strategy (lowcomm.available())
    knobs: dict[str, Any] = field(default_factory=dict)  # strategy knobs over its config's defaults (typed)
    inner: str = ""  # inner optimizer (lowcomm.loop.INNER_OPTIMIZERS); "" takes the strategy's (else adamw)
    lr: float = 0.0  # peak inner learning rate; 0 takes the strategy's default (else 1e-3)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 0  # linear warmup from lr/warmup to lr
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio*lr at `steps`) | "constant"
    min_lr_ratio: float = 0.1  # final lr of the cosine as a fraction of the peak
    grad_clip: float = 1.0  # clip the gradient's global norm (0: off)
    steps: int = 200  # inner steps per replica
    batch_size: int = 16  # sequences per replica per step (split over the replica's ranks)
    grad_accum: int = 1  # micro-batches per rank per step (gradient accumulation)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = "stdlib"  # text file/folder, "stdlib" (default corpus), or a uint16 token file/folder
    vocab_size: int = 0  # >0: `data` holds uint16 token files with this vocabulary
    # "module:Name": your own torch Dataset class or factory, called with seq_len= and split="train"|"eval"
    # (items: seq_len + 1 token ids, or an (inputs, targets) pair); replaces `data`; needs model.vocab_size.
    dataset: str = ""
    data_shards: int = 0  # disjoint data shards (0: one per replica); volunteers take shard member_id % data_shards
    eval_every: int = 50  # held-out evaluation every N steps (0: only at the end)
    eval_sequences: int = 32  # held-out sequences per evaluation
    seed: int = 0  # model init and data order
    log_every: int = 10  # progress line / TensorBoard scalars every N steps
    checkpoint_every: int = 0  # checkpoint every N steps (0: never)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    out_dir: str = ""  # output folder ("" = runs/<name>)
    replica_size: int = 1  # ranks per replica under torchrun (ordinary data parallelism inside)
    hierarchical: bool = True  # torchrun: each of a replica's R ranks syncs 1/R across replicas, then all-gathers
    parallel: str = "ddp"  # inside a replica: "ddp" (DistributedDataParallel) | "fsdp" (FSDP2; hierarchical off)
    device: str = "auto"  # "auto" (cuda when present) | "cpu" | "cuda"
    amp: bool = True  # bf16 autocast on CUDA
    threads: int = 0  # torch CPU threads (0: leave as is)
    tensorboard: bool = True  # write TensorBoard event files

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        self.betas = tuple(self.betas)

    def validate(self) -> None:
        if self.strategy not in available():
            raise ValueError(f"unknown strategy {self.strategy!r}; available: {', '.join(available())}")
        for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 0), ("log_every", 1),
                         ("checkpoint_every", 0), ("keep_checkpoints", 1), ("replica_size", 1),
                         ("eval_sequences", 1), ("warmup_steps", 0), ("data_shards", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.dataset and not self.model.vocab_size:
            raise ValueError("a recipe's own dataset needs model.vocab_size (its tokenizer's vocabulary size)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp' (how a replica's ranks share the model), "
                             f"got {self.parallel!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        self.setup()  # knob names and types, the inner optimizer's name

    def setup(self) -> StrategySetup:
        """The strategy's typed config (``knobs`` over its defaults) and the inner optimizer and lr it runs with."""
        return resolve_strategy(self.strategy, self.knobs, inner=self.inner, lr=self.lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a finished run reports (one per process)."""

    steps: int
    tokens: int
    final_eval_loss: float
    eval_curve: list[tuple[int, float]]
    bytes_sent: int
    syncs: int
    failed_syncs: int
    seconds: float
    params: list[torch.Tensor]  # this process's final parameters (CPU copies)
    out_dir: str
    # Per step of this session: [seconds of forward/backward (+clip), seconds of opt.step(), whether
    # opt.step() communicated]; the network lab feeds it to the simulator's clock.
    timeline: list[list] = field(default_factory=list)
    first_step: int = 0  # the step this session started from (timeline[i] is step first_step + i + 1)
    sync_log: list[Any] = field(default_factory=list)  # the optimizer's SyncRecords


# ---- recipes ----------------------------------------------------------------------------------
def load_recipe(path: str) -> TrainConfig:
    """Load a recipe: a Python file defining ``config() -> TrainConfig`` (lowcomm never imports recipes/)."""
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} is not a file; pass the path of a recipe such as recipes/tiny_diloco.py")
    spec = importlib.util.spec_from_file_location(f"lowcomm_recipe_{abs(hash(os.path.abspath(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, "config", None)
    if not callable(fn):
        raise ValueError(f"recipe {path} must define a function config() returning lowcomm.train.TrainConfig")
    cfg = fn()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"recipe {path}: config() returned {type(cfg).__name__}, expected lowcomm.train.TrainConfig")
    return cfg


def apply_overrides(cfg: TrainConfig, sets: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides: ``steps=50``, ``model.n_layer=2``, ``knobs.sync_every=10``.

    Every value is parsed against its field's type (``amp=false`` is False; ``knobs.nesterov=maybe``
    is a ValueError naming the knob and its type); an unknown field or knob is a ValueError listing
    the known ones.
    """
    for item in sets:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. steps=100 or knobs.sync_every=10)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "knobs" and len(parts) == 2:
            cfg.knobs[parts[1]] = text  # parsed against the strategy's knob types below
            continue
        obj = cfg
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"unknown config field {key!r}")
            obj = getattr(obj, p)
        last = parts[-1]
        names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        if last not in names or last == "knobs":
            raise ValueError(f"unknown config field {key!r}; fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(obj))} (knobs: knobs.NAME=VALUE)")
        hint = typing.get_type_hints(type(obj))[last]
        value = parse_knob(key, hint, text)
        setattr(obj, last, value)
    cfg.__post_init__()
    if cfg.knobs and cfg.strategy in available():
        cfg.knobs = {k: v for k, v in cfg.setup().config.to_dict().items()
                     if k in {get_strategy(cfg.strategy).config.canonical(n) for n in cfg.knobs}}
    return cfg
