"""The OuterOptimizer contract: torch's hooks run (state-dict hooks included) for every strategy."""

import pytest
import torch

import lowcomm
from lowcomm.outer.registry import get_strategy


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _build(name):
    m = _model()
    knobs = {"sync_every": 2} if name in ("diloco", "noloco") else {}
    if name == "streaming":
        m = torch.nn.Module()
        m.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        knobs = {"sync_every": 2, "fragments": 2, "overlap": 0}
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    return m, get_strategy(name).build(inner, lowcomm.connect(), m, **knobs)


@pytest.mark.parametrize("name", ["diloco", "streaming", "noloco", "demo", "ddp"])
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
