"""What the ranks of one replica do together in ``lowcomm train``: DDP or FSDP2 (``parallel=``).

- ``parallel="ddp"`` (default): every rank holds the whole model, torch's
  ``DistributedDataParallel`` on the replica's process group averages the gradients; one rank per
  replica writes the replica's checkpoint.
- ``parallel="fsdp"``: ``torch.distributed.fsdp.fully_shard`` over the replica's ranks (each block,
  then the whole model), so parameters are DTensors and each rank holds 1/R of every one. The
  strategy keeps its global weights and outer state for this rank's shard only and syncs it with
  the same shard of the other replicas (:mod:`lowcomm.outer.placement`); every rank writes its own
  checkpoint of local shards (``replica_<r>/rank_<k>``), and a forward pass needs every rank of the
  replica, so the chief's whole replica evaluates.

A replica of one rank is the plain model either way.
"""

from __future__ import annotations

from typing import Any

import torch

from .outer.placement import is_dtensor, localize, shard_inner_states, shard_like

__all__ = ["PARALLEL", "check_same_layout", "checkpoint_name", "full_parameters", "full_state_dict", "load_state",
           "local_state", "wrap"]

PARALLEL = ("ddp", "fsdp")
"""How the ranks of a replica share the work (``TrainConfig.parallel``)."""


def wrap(model: torch.nn.Module, replica_group: Any, replica_size: int, parallel: str,
         device: torch.device) -> torch.nn.Module:
    """The module to run forward: ``model`` itself (sharded in place by FSDP2) or its DDP wrapper."""
    if replica_group is None or replica_size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(replica_group, device.type)  # the replica's ranks, nothing else
        blocks = getattr(model, "blocks", None)
        for block in blocks if blocks is not None else []:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Ordinary data parallelism inside the replica; DDP broadcasts the first rank's weights.
    return DistributedDataParallel(model, process_group=replica_group,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def checkpoint_name(replica: int, replica_rank: int, sharded: bool) -> str:
    """Where a rank's checkpoint goes inside a step's folder (every rank writes one when sharded)."""
    return f"replica_{replica}/rank_{replica_rank}" if sharded else f"replica_{replica}"


def check_same_layout(cfg: Any, old: dict[str, Any], where: str) -> None:
    """A ValueError when ``where`` was written with another replica size or parallelism than ``cfg``: its
    checkpoints hold other shards (or none of this rank's), so resuming would be wrong or silently start over."""
    for key, default in (("replica_size", 1), ("parallel", "ddp")):
        if old.get(key, default) != getattr(cfg, key):
            raise ValueError(f"{where} was written with {key}={old.get(key, default)!r}, this run has {key}="
                             f"{getattr(cfg, key)!r}; resume with the same {key} (each rank's checkpoint holds "
                             f"its own part of the state)")


def local_state(model: torch.nn.Module, opt: Any) -> dict[str, Any]:
    """The model's and optimizer's state with DTensors replaced by this rank's shards (for safetensors)."""
    return {"model": localize(model.state_dict()), "optimizer": localize(opt.state_dict())}


def load_state(model: torch.nn.Module, opt: Any, model_sd: dict[str, Any], opt_sd: dict[str, Any]) -> None:
    """Inverse of :func:`local_state`: shards wrapped back as the model's DTensors, then loaded."""
    model.load_state_dict(shard_like(model_sd, model.state_dict()))
    opt.load_state_dict(dict(opt_sd, inner=shard_inner_states(opt_sd["inner"], opt.inners)))


def full_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """CPU copies of the whole parameters (an all-gather inside the replica when sharded: every rank calls it)."""
    return [(p.full_tensor() if is_dtensor(p) else p.detach()).to("cpu", copy=True) for p in model.parameters()]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as whole CPU tensors (every rank of a sharded replica calls it)."""
    return {k: (v.full_tensor() if is_dtensor(v) else v.detach()).to("cpu").contiguous()
            for k, v in model.state_dict().items()}
