"""The staged runner, the exporter and the in-process server take what the engine and the HTTP
server take, and refuse what they refuse: uint8 pixels normalised with the manifest's statistics
(bit for bit as net.preprocess), a rule without thresholds instead of another rule's, non-finite
inputs; export leaves the network's train/eval modes as they were and refuses class names that
its loader would; a local server takes a plan as a dict, a file or a checked TierPlan."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import eenn
from _helpers import spread_net
from eenn.engine import DynamicEngine
from eenn.exporter import ExportError, StagedRunner, export, load_manifest
from eenn.policies import ExitPolicy
from eenn.serve import TierPlan
from eenn.serve.app import local_front

TH = [0.35, 0.45, 0.55]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export of a pixel network (mean/std set), made while the network is in train mode
    except one head, to see that export puts every module back as it was."""
    net = spread_net()
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.3,), (0.25,))
    net.train()
    net.heads[0].eval()
    d = tmp_path_factory.mktemp("export")
    export(net, d, policy="max_prob", thresholds=TH)
    modes = {name: m.training for name, m in net.named_modules()}
    return net.eval(), d, modes


def _pixels(n=16):
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_runner_normalises_uint8_pixels_as_the_engine_and_the_server(exported):
    net, d, _ = exported
    px = _pixels()
    runner = StagedRunner(d)
    assert np.array_equal(runner._input(px.numpy()), net.preprocess(px).numpy())  # bit for bit
    got, floats = runner(px.numpy()), runner(net.preprocess(px).numpy())
    eng = DynamicEngine(net, "max_prob", TH)(px)
    for key in ("prediction", "exit"):
        assert np.array_equal(got[key], floats[key])
        assert np.array_equal(got[key], getattr(eng, key).numpy())
    assert np.array_equal(runner(px[:1].numpy())["prediction"], eng.prediction[:1].numpy())  # batch 1


def test_runner_refuses_pixels_it_cannot_normalise(exported):
    _, d, _ = exported
    m = load_manifest(d)
    with pytest.raises(ExportError, match="no \"preprocess\" mean/std.*send float model inputs"):
        StagedRunner({**m, "preprocess": None})(_pixels(2).numpy())
    with pytest.raises(ExportError, match="takes float model inputs or uint8 pixels, got an array of int64"):
        StagedRunner(d)(_pixels(2).numpy().astype(np.int64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [1, 3])
def test_runner_refuses_non_finite_inputs(exported, bad, n):
    _, d, _ = exported
    x = np.zeros((n, 1, 8, 8), np.float32)
    x[-1, 0, 3, 3] = bad
    with pytest.raises(ExportError, match="1 non-finite values"):
        StagedRunner(d)(x)
    with pytest.raises(ExportError, match="non-finite"):
        StagedRunner(d).start(x.astype(np.float64))
    with pytest.raises(ExportError, match="beyond float32's range"):  # float64 that float32 cannot hold
        StagedRunner(d)(np.full((n, 1, 8, 8), 1e300))


def test_another_rule_does_not_take_the_stored_thresholds_or_options(exported):
    _, d, _ = exported
    with pytest.raises(ExportError, match="policy 'entropy' has no thresholds.*for its 'max_prob' rule"):
        StagedRunner(d, policy="entropy")
    assert StagedRunner(d, policy="entropy", thresholds=0.3).thresholds.tolist() == pytest.approx([0.3] * 3)
    assert StagedRunner(d, policy="max_prob").thresholds.tolist() == pytest.approx(TH)  # the stored rule: kept
    w = [0.1, 0.2, 0.3, 0.4]
    m = {**load_manifest(d), "policy": ExitPolicy("ensemble", 0.5, weights=w).to_dict()}
    assert StagedRunner(m, policy="ensemble").policy.options["weights"].tolist() == pytest.approx(w)
    assert "weights" not in StagedRunner(m, policy="max_prob", thresholds=0.5).policy.options


def test_export_restores_each_modules_mode(exported):
    _, _, modes = exported
    assert modes[""] and modes["backbone"] and not modes["heads.0"] and modes["heads.1"]


def test_export_refuses_class_names_of_another_count_before_writing(tmp_path):
    net = spread_net()
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.3,), (0.25,), class_names=("a", "b", "c"))
    with pytest.raises(ExportError, match="names 3 classes, the network has 10.*class_names=None"):
        export(net, tmp_path / "out", thresholds=0.5)
    assert not (tmp_path / "out").exists()
    net.input_spec = dataclasses.replace(net.input_spec, class_names=None)  # what the message says to do
    assert net.input_spec.class_names is None and net.input_spec.mean == (0.3,)


def test_local_front_takes_a_dict_a_file_or_a_checked_plan(exported, tmp_path):
    _, d, _ = exported
    tiers = [{"name": "device", "segments": "0-1"}, {"name": "cloud", "segments": "rest"}]
    (tmp_path / "plan.json").write_text(json.dumps({"model": str(d), "tiers": tiers}))
    for plan in ({"model": str(d), "tiers": tiers}, tmp_path / "plan.json", str(tmp_path / "plan.json")):
        front = local_front(plan)
        try:
            assert [t.name for t in front.plan.tiers] == ["device", "cloud"]
        finally:
            front.close()
    with pytest.raises(ValueError, match="TierPlan tiers must be TierSpec.*or pass the plan as a dict"):
        local_front(TierPlan(str(d), [{"name": "a", "segments": "rest"}]))
    parsed = TierPlan.from_dict({"model": str(d), "tiers": tiers})
    gap = dataclasses.replace(parsed, tiers=[parsed.tiers[0], dataclasses.replace(parsed.tiers[1], start=3)])
    with pytest.raises(ValueError, match="tier 'cloud' with segments 3..3"):
        local_front(gap)
    short = dataclasses.replace(parsed, tiers=[parsed.tiers[0]])
    with pytest.raises(ValueError, match="cover segments 0..1 of the model's 0..3"):
        local_front(short)
