"""Fragments: whole blocks, strided or sequential, the rest spread so there are exactly F."""

import pytest
import torch
from torch import nn

from lowcomm.fragments import find_blocks, split_fragments


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)


class Net(nn.Module):
    def __init__(self, layers=6, d=8, vocab=50, tie=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.small = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])  # mixed types: not blocks
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight


def ids(frags):
    return [[id(p) for p in f] for f in frags]


def block_of(model, p):
    for i, b in enumerate(model.blocks):
        if any(p is q for q in b.parameters()):
            return i
    return None


@pytest.mark.parametrize("F", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("mode", ["strided", "sequential"])
def test_exactly_f_disjoint_covering(F, mode):
    m = Net()
    frags = split_fragments(m, F, mode=mode)
    assert len(frags) == F
    flat = [id(p) for f in frags for p in f]
    assert sorted(flat) == sorted(id(p) for p in m.parameters()) and len(set(flat)) == len(flat)
    for f, ps in enumerate(frags):
        blocks = sorted({block_of(m, p) for p in ps} - {None})
        if F == 1:
            continue
        if mode == "strided":
            assert blocks == [b for b in range(6) if b % F == f]
        else:
            per = [len(range(6)[i::F]) for i in range(F)]
            start = sum(per[:f])
            assert blocks == list(range(start, start + per[f]))


def test_rest_spread_by_size():
    m = Net(layers=4, d=8, vocab=50)
    frags = split_fragments(m, 2)
    # emb (400) and head (400) are the largest outside the blocks: they go to different fragments
    where = {name: next(i for i, f in enumerate(frags) if any(p is q for q in f)) for name, p in m.named_parameters()}
    assert where["emb.weight"] != where["head.weight"]
    sizes = [sum(p.numel() for p in f) for f in frags]
    assert abs(sizes[0] - sizes[1]) <= 8 * 8 + 8  # within about one block
    # deterministic: a second build gives the same split in the same order
    m2 = Net(layers=4, d=8, vocab=50)
    names = {id(p): n for n, p in m.named_parameters()}
    names2 = {id(p): n for n, p in m2.named_parameters()}
    assert [[names[i] for i in f] for f in ids(frags)] == [[names2[i] for i in f] for f in ids(split_fragments(m2, 2))]


def test_find_blocks_and_tied_weights():
    m = Net(tie=True)
    assert find_blocks(m) is m.blocks
    frags = split_fragments(m, 3)
    assert sum(len(f) for f in frags) == len(list(m.parameters()))  # the tied weight appears once


def test_explicit_groups_and_params_filter():
    m = Net(layers=4)
    groups = [[m.blocks[0], m.blocks[3]], [m.blocks[1], m.blocks[2]]]
    frags = split_fragments(m, groups)
    assert len(frags) == 2
    assert all(block_of(m, p) in (0, 3, None) for p in frags[0])
    # only the optimizer's parameters, in the optimizer's order
    ps = [p for n, p in m.named_parameters() if not n.startswith("small")]
    frags = split_fragments(m, 2, params=ps)
    assert sorted(id(p) for f in frags for p in f) == sorted(id(p) for p in ps)
    order = {id(p): i for i, p in enumerate(ps)}
    assert all([order[id(p)] for p in f] == sorted(order[id(p)] for p in f) for f in frags)


def test_bad_arguments():
    m = Net(layers=3)
    with pytest.raises(ValueError, match="only 3 blocks"):
        split_fragments(m, 4)
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        split_fragments(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2)
    with pytest.raises(ValueError, match="overlap"):
        split_fragments(m, [[m.blocks[0]], [m.blocks[0], m.blocks[1]]])
    with pytest.raises(ValueError, match="mode"):
        split_fragments(m, 2, mode="random")
    with pytest.raises(ValueError, match=">= 1"):
        split_fragments(m, 0)
    with pytest.raises(ValueError, match="count"):
        split_fragments(m, "2")
    with pytest.raises(ValueError, match="needs model"):
        split_fragments(None, 2, params=list(m.parameters()))
    with pytest.raises(ValueError, match="no parameters"):
        ps = list(m.blocks[0].parameters())
        split_fragments(m, [[m.blocks[0]], [m.blocks[1]]], params=ps)
    assert len(split_fragments(None, 1, params=[torch.zeros(1)])) == 1
