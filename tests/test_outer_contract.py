"""The OuterOptimizer contract: torch's hooks run (state-dict hooks included) for every strategy."""

import contextlib

import pytest
import torch

import lowcomm
from lowcomm.outer.registry import get_strategy


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _build(name):
    m = _model()
    knobs = {"sync_every": 2} if name in ("diloco", "noloco", "sparseloco") else {}
    if name == "streaming":
        m = torch.nn.Module()
        m.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        knobs = {"sync_every": 2, "fragments": 2, "overlap": 0}
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    return m, get_strategy(name).build(inner, lowcomm.connect(), m, **knobs)


@pytest.mark.parametrize("name", ["diloco", "streaming", "noloco", "demo", "ddp", "sparseloco"])
def test_every_kind_of_hook_runs(name):
    m, opt = _build(name)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        return {**sd, "note": "added by a hook"}
    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        assert sd["note"] == "added by a hook"
        return {k: v for k, v in sd.items() if k != "note"}
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))

    for _ in range(2):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    sd = opt.state_dict()
    assert sd["note"] == "added by a hook"
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post"] * 2 + ["sd_pre", "sd_post", "load_pre", "load_post"]
    # torch's own initialisation ran; the wrapper holds no groups or state of its own
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # acts on the inner optimizer's groups
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    sched.step()


# ---- devices: every tensor a strategy or codec allocates is on its parameters' (data's) device -----------
# Under ``with torch.device("meta")`` a factory call that does not name a device makes a meta tensor.
# Parameters and data stay on the CPU, so a buffer allocated without ``device=`` lands on "meta" and
# either breaks the step or shows up in the walk of the optimizer's tensors below. (With no GPU here,
# "meta" stands in for the second device.)

def _tensors(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lowcomm"):
        for v in vars(obj).values():
            yield from _tensors(v, seen)


def _run(name, knobs, steps, default_device=None):
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
    t = lowcomm.connect()
    ctx = torch.device(default_device) if default_device else contextlib.nullcontext()
    with ctx:
        opt = get_strategy(name).build(torch.optim.SGD(m.parameters(), lr=0.1), t, m, **knobs)
        for i in range(steps):
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.01 * (i + 1)) * p.detach().sign()
            opt.step()
        opt.flush()
    return [p.detach().clone() for p in m.parameters()], opt


@pytest.mark.parametrize("name,knobs", [
    ("diloco", {"sync_every": 2, "codec": "int8"}),
    ("streaming", {"sync_every": 2, "fragments": 2, "overlap": 0, "codec": "e3m0", "error_feedback": True}),
    ("streaming", {"sync_every": 4, "fragments": 2, "overlap": 1, "codec": "int4:block=4"}),
    ("noloco", {"sync_every": 2}),
    ("demo", {"topk": 2, "chunk": 4, "values": "sign"}),
    ("ddp", {"codec": "bf16"}),
    ("sparseloco", {"sync_every": 2, "topk": 2, "chunk": 4}),
])
def test_strategy_allocates_on_its_parameters_device(name, knobs):
    ref, _ = _run(name, knobs, 5)
    got, opt = _run(name, knobs, 5, default_device="meta")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    devices = {str(x.device) for x in _tensors(opt)}
    assert devices <= {"cpu"}, devices


@pytest.mark.parametrize("spec", ["bf16", "fp16", "int8", "int4:block=4:scale=bf16", "e3m0"])
def test_codec_allocates_on_the_data_device(spec):
    from lowcomm.codecs import ErrorFeedback, get_codec

    x = torch.randn(37)
    c = get_codec(spec)
    want = c.decode(c.encode(x), 37)
    with torch.device("meta"):
        parts = c.encode(x)
        got = c.decode(parts, 37)
        ef = ErrorFeedback(c, 37, device="cpu")
        ef.residual(x.clone(), shards=3)
    assert all(p.device.type == "cpu" for p in parts) and torch.equal(got, want)
    assert ef.error.device.type == "cpu" and ef._pending.device.type == "cpu"


# ---- anchor_device="cpu": lowcomm's state off the parameters' device, formed in chunks -------------------
_OFFLOADABLE = [
    ("diloco", {"sync_every": 2, "codec": "int8"}),
    ("fedavg", {"sync_every": 3}),
    ("streaming", {"sync_every": 2, "fragments": 2, "overlap": 0, "codec": "e3m0", "error_feedback": True}),
    ("streaming", {"sync_every": 4, "fragments": 2, "overlap": 1, "alpha": 0.3, "codec": None}),
    ("noloco", {"sync_every": 2}),
    ("noloco", {"sync_every": 2, "consensus_lr": 0.0}),
    ("noloco", {"sync_every": 2, "consensus_lr": 0.3}),
    ("sparseloco", {"sync_every": 2, "topk": 3, "chunk": 4}),
]


@pytest.mark.parametrize("name,knobs", _OFFLOADABLE)
def test_anchor_device_cpu_chunked_equals_on_device(name, knobs, monkeypatch):
    from lowcomm.outer import placement

    ref, ref_opt = _run(name, knobs, 7)
    monkeypatch.setattr(placement, "CHUNK", 5)  # every tensor crosses chunk boundaries (the biggest has 64)
    got, opt = _run(name, {**knobs, "anchor_device": "cpu"}, 7, default_device="meta")
    assert all(u.offloaded for u in opt.units) and not any(u.offloaded for u in ref_opt.units)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # bitwise: the outer step runs on the same kind
    for u, v in zip(ref_opt.units, opt.units):
        assert all(torch.equal(a, b) for a, b in zip(u.anchors, v.anchors))
    # every tensor lowcomm holds is on the anchor device (a stray allocation would land on "meta")
    assert {str(x.device) for x in _tensors(opt)} <= {"cpu"}
    sd = opt.state_dict()
    assert {str(x.device) for x in _tensors(sd)} <= {"cpu"}


def test_anchor_device_is_checked():
    m = _model()
    for bad in ("tpu-ish", "meta", 3.5):
        with pytest.raises(ValueError, match="anchor_device"):
            lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=lowcomm.connect(), anchor_device=bad)


def test_dtensor_parameters_need_a_transport_that_knows_the_replica():
    # A mesh of one process (no process group needed for Replicate): parameters become DTensors.
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate

    if not dist.is_available():
        pytest.skip("torch without distributed")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        p = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 2), mesh, [Replicate()]))
        with pytest.raises(ValueError, match="does not know the replica's ranks"):
            lowcomm.DiLoCo(torch.optim.SGD([p], lr=0.1), transport=lowcomm.connect())
        for name in ("demo", "ddp"):
            with pytest.raises(ValueError, match="does not accept DTensor"):
                get_strategy(name).build(torch.optim.SGD([p], lr=0.1), lowcomm.connect(), None)
    finally:
        dist.destroy_process_group()
