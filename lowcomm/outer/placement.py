"""Where lowcomm keeps its own state: DTensor shards (FSDP2 inside a replica) and the anchor device.

**Sharded replicas.** With ``torch.distributed.fsdp.fully_shard`` inside a replica, parameters are
DTensors and each rank holds one shard of each. lowcomm's state is plain local tensors: each rank
keeps global weights, outer state and error-feedback state for its local shard only (memory per
rank divided by the replica size), forms the pseudo-gradient of its shard and syncs it with the
same shard of the other replicas over the transport's flat rank-r path (rank r of each replica
with rank r of the others). Every elementwise rule (DiLoCo, FedAvg, Streaming DiLoCo, NoLoCo)
gives on each shard exactly what it gives on the whole tensor, so sharding changes nothing but
where the numbers live. :func:`check_sharded` rejects what cannot be served, at construction.

**Anchor device.** ``anchor_device="cpu"`` keeps the global weights and the outer optimizer's
state in CPU memory (pinned when CUDA is present, for fast copies); the pseudo-gradient is formed
there in chunks of :data:`CHUNK` elements (copy a chunk of the local weights, negate, add the
anchor), the outer step runs there, and the new global weights are copied back chunk by chunk.
Every operation is elementwise, so the result is bit-identical to keeping them on the parameters'
device whenever the outer step runs on the same kind of device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["CHUNK", "anchor_copy", "check_sharded", "is_dtensor", "local_tensor", "localize", "resolve_anchor_device",
           "shard_inner_states", "shard_like"]

CHUNK = 1 << 22
"""Elements per chunk (16 MiB of fp32) when lowcomm's state is offloaded (``anchor_device`` given)."""


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. a parameter sharded by FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The plain tensor lowcomm works on: a DTensor's local shard (sharing its storage), else ``p``."""
    return p.to_local().detach() if is_dtensor(p) else p


def localize(obj: Any) -> Any:
    """``obj`` (nested dicts/lists of state) with every DTensor replaced by its local shard."""
    if is_dtensor(obj):
        return obj.to_local().detach()
    if isinstance(obj, dict):
        return {k: localize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(localize(v) for v in obj)
    return obj


def _as_like(t: Any, like: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, torch.Tensor) or is_dtensor(t):
        return t
    loc = like.to_local()
    if tuple(t.shape) != tuple(loc.shape):
        raise ValueError(f"a saved shard has shape {tuple(t.shape)}, this rank's shard has {tuple(loc.shape)}: the "
                         f"checkpoint was written with another replica size or sharding; resume with the same one")
    return DTensor.from_local(t.to(device=loc.device, dtype=loc.dtype), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride())


def shard_like(obj: Any, template: Any) -> Any:
    """Inverse of :func:`localize`: wrap each plain tensor of ``obj`` as the DTensor at its place in ``template``.

    ``template`` is a ``state_dict()`` of the sharded model. An inner optimizer's state may be empty before
    its first step, so it has no template: use :func:`shard_inner_states`, which takes the parameters.
    """
    if is_dtensor(template):
        return _as_like(obj, template)
    if isinstance(obj, dict) and isinstance(template, dict):
        return {k: shard_like(v, template[k]) if k in template else v for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and isinstance(template, (list, tuple)) and len(obj) == len(template):
        return type(obj)(shard_like(v, t) for v, t in zip(obj, template))
    return obj


def shard_inner_state(sd: dict[str, Any], params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """An inner optimizer's saved state with each per-parameter tensor of the parameter's local shape made a
    DTensor like that parameter (torch's ``Optimizer.load_state_dict`` keeps plain tensors plain)."""
    state = {}
    for k, st in sd.get("state", {}).items():
        p = params[int(k)] if int(k) < len(params) else None
        if p is not None and is_dtensor(p):
            shape = tuple(p.to_local().shape)
            st = {n: _as_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == shape else v
                  for n, v in st.items()}
        state[k] = st
    return {**sd, "state": state}


def shard_inner_states(saved: Any, inners: Sequence[torch.optim.Optimizer]) -> Any:
    """:func:`shard_inner_state` for an outer optimizer's saved ``"inner"``: one state dict per inner optimizer
    (a list), or the plain state dict of a single one."""
    params = [[p for g in o.param_groups for p in g["params"]] for o in inners]
    if isinstance(saved, (list, tuple)):
        return [shard_inner_state(sd, ps) for sd, ps in zip(saved, params)]
    return shard_inner_state(saved, params[0])


def check_sharded(params: Sequence[torch.Tensor], transport: Any, strategy: str, supported: bool,
                  why: str = "") -> bool:
    """Whether ``params`` hold DTensors; a ValueError when lowcomm cannot serve them (never a hang later).

    ``supported``: the strategy's rule is elementwise, so it is exact on shards; else ``why`` says why not.
    The transport must know the replica's ranks (``transport.replica_ranks``, the torch.distributed
    transport's), every DTensor's mesh must be exactly those ranks, and the transport must use the flat
    rank-r path (``hierarchical=True`` assumes identical tensors inside a replica).
    """
    sharded = [p for p in params if is_dtensor(p)]
    if not sharded:
        return False
    if not supported:
        raise ValueError(f"{strategy} does not accept DTensor (FSDP-sharded) parameters: {why}. Use DiLoCo, FedAvg, "
                         f"Streaming DiLoCo or NoLoCo with FSDP, or DistributedDataParallel inside the replica")
    ranks = getattr(transport, "replica_ranks", None)
    if ranks is None:
        raise ValueError(f"the parameters are DTensors (sharded by FSDP) but the transport "
                         f"{type(transport).__name__} does not know the replica's ranks, so the shards cannot be "
                         f"matched across replicas; under torchrun pass transport=lowcomm.connect(replica_size=R) "
                         f"and fully_shard(..., mesh=DeviceMesh.from_group(transport.replica_group, device_type))")
    ranks = sorted(int(r) for r in ranks)
    for p in sharded:
        mesh_ranks = sorted(int(r) for r in p.device_mesh.mesh.flatten().tolist())
        if mesh_ranks != ranks:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is sharded over global ranks {mesh_ranks} but "
                             f"this rank's replica is ranks {ranks} (replica_size={len(ranks)}); shard over the "
                             f"replica's mesh: fully_shard(module, mesh=DeviceMesh.from_group(transport.replica_group, "
                             f"device_type)), or connect with replica_size={len(mesh_ranks)}")
    if getattr(transport, "hierarchical", False):
        raise ValueError("hierarchical=True assumes every rank of a replica holds the same tensors, but FSDP shards "
                         "them; connect with hierarchical=False (each rank then syncs its own shard with the same "
                         "shard of the other replicas, 1/R of the model per rank)")
    return True


def check_inner_on_shards(inner: torch.optim.Optimizer) -> None:
    """Muon orthogonalises each whole weight matrix; on FSDP's row shards it would orthogonalise each shard."""
    if "muon" in type(inner).__name__.lower():
        raise ValueError(f"{type(inner).__name__} orthogonalises whole matrices, but FSDP gives each rank a block of "
                         f"rows, so it would orthogonalise each shard instead (another algorithm); use AdamW/SGD as "
                         f"the inner optimizer with FSDP, or DistributedDataParallel inside the replica")


def resolve_anchor_device(anchor_device: Any) -> torch.device | None:
    """``None`` (lowcomm's state on the parameters' device) or the device named, checked."""
    if anchor_device is None:
        return None
    try:
        dev = torch.device(anchor_device)
    except (RuntimeError, TypeError):
        raise ValueError(f"anchor_device must be None (the parameters' device) or a device such as 'cpu', "
                         f"got {anchor_device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"anchor_device must be 'cpu' or a CUDA device, got {anchor_device!r}")
    return dev


def anchor_copy(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A fresh copy of ``t`` on ``device`` (``t``'s own when None); CPU copies are pinned when CUDA is present."""
    if device is None:
        return t.detach().clone()
    pin = device.type == "cpu" and torch.cuda.is_available()
    out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
    copy_(out, t)
    return out


def _chunks(split: bool, *tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching pieces of ``tensors`` (same numel): whole when not ``split``, else flat chunks."""
    chunk = CHUNK
    if not split or tensors[0].numel() <= chunk or not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for i in range(0, flat[0].numel(), chunk):
        yield tuple(f[i:i + chunk] for f in flat)


@torch.no_grad()
def copy_(dst: torch.Tensor, src: torch.Tensor, split: bool = True) -> None:
    """``dst := src`` (any two devices), chunk by chunk when ``split`` (lowcomm's state is offloaded)."""
    for d, s in _chunks(split, dst, src):
        d.copy_(s)


@torch.no_grad()
def pseudo_grad_(out: torch.Tensor, local: torch.Tensor, anchor: torch.Tensor, split: bool = True) -> None:
    """``out := anchor - local`` as ``-local + anchor`` (DiLoCo's in-place form), ``out`` beside ``anchor``.

    ``out`` may be ``local`` itself (same device: the pseudo-gradient overwrites the local weights,
    which the sync resets anyway). Elementwise, so any chunking gives the same bits.
    """
    if out is local:
        out.neg_().add_(anchor)
        return
    for o, loc, a in _chunks(split, out, local, anchor):
        o.copy_(loc)
        o.neg_().add_(a)


@torch.no_grad()
def sub_(out: torch.Tensor, anchor: torch.Tensor, local: torch.Tensor, split: bool = True) -> None:
    """``out := anchor - float(local)`` (Streaming DiLoCo's fp32 pseudo-gradient), ``out`` beside ``anchor``."""
    for o, loc, a in _chunks(split, out, local, anchor):
        o.copy_(a)
        o.sub_(loc.to(device=o.device, dtype=o.dtype))


@torch.no_grad()
def mix_(local: torch.Tensor, anchor: torch.Tensor, alpha: float, split: bool = True) -> None:
    """``local := alpha * local + (1 - alpha) * anchor``, computed on the local weights' device."""
    for loc, a in _chunks(split, local, anchor):
        loc.mul_(alpha)
        loc.add_(a.to(loc.device), alpha=1.0 - alpha)
