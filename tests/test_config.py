"""Typed strategy configs: defaults equal the classes', --set parsed by type, unknown knobs, one-line CLI errors."""

import dataclasses
import inspect

import pytest
import torch

import lowcomm
from lowcomm.cli import main as cli_main
from lowcomm.outer.registry import available, get_strategy, register_strategy
from lowcomm.sim.runner import build_knobs
from lowcomm.train import TrainConfig, apply_overrides

CLASSES = {"diloco": lowcomm.DiLoCo, "streaming": lowcomm.StreamingDiLoCo, "noloco": lowcomm.NoLoCo,
           "demo": lowcomm.DeMo, "ddp": lowcomm.DDP}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_config_defaults_are_the_constructors(name):
    sig = inspect.signature(CLASSES[name].__init__).parameters
    for f in dataclasses.fields(get_strategy(name).config):
        assert f.name in sig, f"knob {f.name} of {name} is not a constructor argument"
        assert f.default == sig[f.name].default, (name, f.name)


def test_set_parses_against_the_field_type():
    s = get_strategy("diloco")
    c = s.make_config({"nesterov": "False", "sync_every": "7", "outer_lr": "0.5", "codec": "none"})
    assert c.nesterov is False and c.sync_every == 7 and c.outer_lr == 0.5 and c.codec is None
    assert s.make_config({"nesterov": "true", "codec": '"int8"'}).codec == "int8"
    with pytest.raises(ValueError, match=r"nesterov takes bool.*'maybe'"):
        s.make_config({"nesterov": "maybe"})
    with pytest.raises(ValueError, match="sync_every takes int"):
        s.make_config({"sync_every": 2.5})
    with pytest.raises(ValueError, match="unknown knob 'nesterv'.*known knobs: sync_every, outer_lr"):
        s.make_config({"nesterv": True})
    # the built optimizer really has Nesterov off
    m = torch.nn.Linear(2, 2)
    opt = s.build(torch.optim.SGD(m.parameters(), lr=0.1), lowcomm.connect(), m, nesterov="False")
    assert opt.units[0].outer.param_groups[0]["nesterov"] is False


def test_deprecated_spelling_warns_and_works():
    with pytest.warns(DeprecationWarning, match="outer_momentum"):
        c = get_strategy("noloco").make_config({"momentum": "0.25"})
    assert c.outer_momentum == 0.25
    m = torch.nn.Linear(2, 2)
    with pytest.warns(DeprecationWarning):
        opt = lowcomm.NoLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=lowcomm.connect(), momentum=0.25)
    assert opt.outer_momentum == 0.25


def test_train_and_sim_parse_knobs_alike():
    cfg = apply_overrides(TrainConfig(strategy="diloco"), ["knobs.nesterov=False", "knobs.sync_every=9"])
    assert cfg.knobs == {"nesterov": False, "sync_every": 9}
    assert cfg.setup().config.nesterov is False
    _, knobs = build_knobs("diloco", {"nesterov": "False"})
    assert knobs["nesterov"] is False and knobs["sync_every"] == 50  # the simulator's preset H
    for bad, match in ((["knobs.nesterov=maybe"], "nesterov takes bool"), (["knobs.bogus=1"], "unknown knob"),
                       (["amp=maybe"], "amp takes bool"), (["steps=x"], "steps takes int")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(TrainConfig(strategy="diloco"), bad)
    with pytest.raises(ValueError, match="nesterov takes bool"):
        build_knobs("diloco", {"nesterov": "maybe"})


def test_cli_prints_one_line_errors(tmp_path, capsys):
    recipe = tmp_path / "r.py"
    recipe.write_text("from lowcomm.train import TrainConfig\n\ndef config():\n    return TrainConfig()\n")
    for argv, match in ((["train", "--recipe", str(recipe), "--set", "knobs.nesterov=maybe"], "nesterov takes bool"),
                        (["train", "--recipe", str(recipe), "--set", "knobs.nesterv=1"], "known knobs"),
                        (["sim", "--strategies", "diloco", "--set", "nesterov=maybe", "--out", str(tmp_path)],
                         "nesterov takes bool"),
                        (["sim", "--strategies", "diloco", "--set", "nesterv=1", "--out", str(tmp_path)],
                         "known knobs")):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err and "Traceback" not in err


def test_inner_optimizer_factory():
    from lowcomm.loop import make_inner, resolve_strategy

    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_inner("adamw", p, 1e-3, weight_decay=0.0, betas=(0.8, 0.9))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="unknown inner optimizer 'adam'.*adamw"):
        make_inner("adam", p, 1e-3)
    with pytest.raises(ValueError, match="unknown inner optimizer"):
        resolve_strategy("diloco", inner="lion")
    assert resolve_strategy("demo").inner == "sgd" and resolve_strategy("diloco").inner == "adamw"
    with pytest.raises(ValueError, match="unknown inner optimizer"):
        TrainConfig(inner="adam").validate()


def test_legacy_registration_still_works():
    def build(inner, transport, model=None, *, alpha=0.5):
        return lowcomm.DiLoCo(inner, transport=transport, sync_every=2)

    s = register_strategy("test_legacy", build, {"alpha": 0.5, "inner": "sgd"}, "legacy", replace=True,
                          default_run=False)
    assert "test_legacy" in available() and s.config.inner == "sgd" and s.defaults == {"alpha": 0.5}
    assert s.make_config({"alpha": "0.25"}).alpha == 0.25
    m = torch.nn.Linear(2, 2)
    assert isinstance(s.build(torch.optim.SGD(m.parameters(), lr=0.1), lowcomm.connect(), m), lowcomm.DiLoCo)
