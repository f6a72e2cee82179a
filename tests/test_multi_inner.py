"""Several inner optimizers (Muon + AdamW): one scheduler, old checkpoints, the ValueErrors, MuLoCo."""

import copy
import math

import pytest
import torch
from _common import RNG_LOCK

import lowcomm
from lowcomm.comm.local import LocalTransport, LocalWorld
from lowcomm.loop import make_inner as _make_inner
from lowcomm.loop import muon_split
from lowcomm.models import GPT, GPTConfig
from lowcomm.outer.multi import InnerOptimizers
from lowcomm.sim import SimConfig, run_strategy

TINY = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=16, vocab_size=32)


def make_inner(model, kind, lr, weight_decay=0.1):
    return _make_inner(kind, list(model.parameters()), lr, weight_decay=weight_decay, model=model)


def world_of_one():
    return LocalTransport(LocalWorld(1), 0)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def make_gpt(seed=0):
    with RNG_LOCK:
        torch.manual_seed(seed)
        return GPT(TINY)


def gpt_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, TINY.vocab_size, (3, TINY.seq_len + 1), generator=g)


def gpt_loss(model, tokens):
    return model(tokens[:, :-1], tokens[:, 1:])[1]


def train(model, opt, steps, start=0):
    for s in range(start, steps):
        opt.zero_grad()
        gpt_loss(model, gpt_batch(s)).backward()
        opt.step()


def test_muon_split_of_the_gpt():
    m = make_gpt()
    hidden, rest = muon_split(m)
    names = [n for n, _ in hidden]
    assert names and all(p.ndim == 2 for _, p in hidden)
    assert not any("emb" in n for n in names)  # embeddings (and the tied head) go to AdamW
    assert {n for n, _ in rest} >= {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"}
    assert len(hidden) + len(rest) == len(list(m.parameters()))
    inner = make_inner(m, "muon", 1e-3, 0.1)
    assert [type(o) for o in inner] == [torch.optim.Muon, torch.optim.AdamW]
    assert inner[0].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    with pytest.raises(ValueError, match="needs the model"):
        _make_inner("muon", list(m.parameters()), 1e-3)
    with pytest.raises(ValueError, match="unknown inner optimizer"):
        make_inner(m, "lion", 1e-3)


def test_world_of_one_with_two_inner_optimizers_is_those_optimizers():
    """DiLoCo at W=1, H=1, FedAvg outer around [Muon, AdamW] follows Muon + AdamW stepped by hand."""
    ref, m = make_gpt(), make_gpt()
    ref_opts = make_inner(ref, "muon", 1e-2, 0.1)
    opt = lowcomm.DiLoCo(make_inner(m, "muon", 1e-2, 0.1), transport=world_of_one(), sync_every=1,
                         outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    assert isinstance(opt.inner, InnerOptimizers) and len(opt.inners) == 2
    assert len(opt.param_groups) == 2 and len(opt.params) == len(list(m.parameters()))
    for s in range(4):
        for o in ref_opts:
            o.zero_grad()
        gpt_loss(ref, gpt_batch(s)).backward()
        for o in ref_opts:
            o.step()
        train(m, opt, s + 1, start=s)
    # FedAvg's phi - (phi - theta) rounds, and Muon's bf16 Newton-Schulz iteration amplifies that a little
    assert (flat(ref.parameters()) - flat(m.parameters())).abs().max() <= 1e-4


def test_one_scheduler_on_the_wrapper_moves_every_inner_lr():
    m = make_gpt()
    opt = lowcomm.SparseLoCo(make_inner(m, "muon", 1e-2, 0.1), transport=world_of_one(), sync_every=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        train(m, opt, 1)
        sched.step()
    assert [g["lr"] for o in opt.inners for g in o.param_groups] == [1e-2 * 0.125] * 2
    assert all(g["initial_lr"] == 1e-2 for g in opt.param_groups)


def test_state_dict_lists_inner_states_and_resumes_exactly():
    steps, half = 6, 3

    def run(resume=None):
        m = make_gpt()
        opt = lowcomm.DiLoCo(make_inner(m, "muon", 1e-2, 0.1), transport=world_of_one(), sync_every=2)
        if resume is not None:
            m.load_state_dict(resume["model"])
            opt.load_state_dict(resume["opt"])
        train(m, opt, half if resume is None else steps, start=0 if resume is None else half)
        return m, opt

    m, opt = run()
    ck = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
    assert isinstance(ck["opt"]["inner"], list) and len(ck["opt"]["inner"]) == 2
    train(m, opt, steps, start=half)
    m2, _ = run(ck)
    assert torch.equal(flat(m.parameters()), flat(m2.parameters()))
    bad = copy.deepcopy(ck["opt"])
    bad["inner"] = bad["inner"][:1]
    with pytest.raises(ValueError, match="1 inner optimizer"):
        opt.load_state_dict(bad)


def test_single_inner_checkpoint_still_loads():
    """A checkpoint written when ``inner`` held one optimizer's state dict (not a list) resumes exactly."""
    steps, half = 6, 3
    m = make_gpt()
    opt = lowcomm.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=world_of_one(), sync_every=2)
    train(m, opt, half)
    old = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
    old["opt"]["inner"] = old["opt"]["inner"][0]  # the single-inner format
    assert "state" in old["opt"]["inner"]
    train(m, opt, steps, start=half)
    m2 = make_gpt()
    opt2 = lowcomm.DiLoCo(torch.optim.AdamW(m2.parameters(), lr=1e-2), transport=world_of_one(), sync_every=2)
    m2.load_state_dict(old["model"])
    opt2.load_state_dict(old["opt"])
    train(m2, opt2, steps, start=half)
    assert torch.equal(flat(m.parameters()), flat(m2.parameters()))
    opt3 = lowcomm.DiLoCo(make_inner(make_gpt(), "muon", 1e-2), transport=world_of_one(), sync_every=2)
    with pytest.raises(ValueError, match="this run has 2"):
        opt3.load_state_dict(old["opt"])


def test_overlapping_or_non_matrix_parameters_raise_value_error_naming_them():
    m = make_gpt()
    named = dict(m.named_parameters())
    a = torch.optim.AdamW(m.named_parameters(), lr=1e-3)
    b = torch.optim.Muon([("blocks.0.attn.qkv.weight", named["blocks.0.attn.qkv.weight"])], lr=1e-3)
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight'.*is also.*AdamW"):
        lowcomm.DiLoCo([a, b], transport=world_of_one())
    muon = torch.optim.Muon([("blocks.0.attn.qkv.weight", named["blocks.0.attn.qkv.weight"])], lr=1e-3)
    muon.add_param_group({"params": [named["ln_f.bias"]], "param_names": ["ln_f.bias"]})  # Muon does not check
    rest = [p for n, p in named.items() if n not in ("blocks.0.attn.qkv.weight", "ln_f.bias")]
    with pytest.raises(ValueError, match=r"'ln_f.bias'.*not 2-D.*Muon"):
        lowcomm.SparseLoCo([muon, torch.optim.AdamW(rest, lr=1e-3)], transport=world_of_one())
    with pytest.raises(ValueError, match="empty list"):
        InnerOptimizers([])
    with pytest.raises(ValueError, match="plain torch.optim.Optimizer"):
        lowcomm.DiLoCo([a, "adamw"], transport=world_of_one())


def test_muloco_in_the_simulator():
    cfg = SimConfig(workers=2, steps=4, batch_size=2, model=TINY, eval_every=4, eval_sequences=2, threads=1,
                    warmup_steps=1)
    r = run_strategy("muloco", cfg, {"sync_every": 2})
    assert r.syncs == 2 and math.isfinite(r.final_eval_loss)
    s = lowcomm.get_strategy("muloco")
    assert s.config.inner == "muon" and not s.default_run and s.defaults == lowcomm.get_strategy("diloco").defaults
