"""The evaluation report: calibrated on validation, reported on test, with measured timing,
the accuracy-MACs curve, the oracle, JSON / Markdown / PNG output."""
import json

import pytest
import torch

import eenn
from eenn.outputs import collect_outputs
from eenn.policies import ExitPolicy, evaluate_policy
from eenn.report import Report, evaluate


@pytest.fixture(scope="module")
def trained():
    data = eenn.load_dataset("synthetic", num_samples=600, noise=70.0)
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 4],
                              width=0.5)
    eenn.fit(net, data, "joint", epochs=2, lr=0.05, batch_size=64, progress=False)
    return net.eval(), data


@pytest.fixture(scope="module")
def report(trained):
    net, data = trained
    return evaluate(net, data, goal={"max_drop": 0.02}, batch_sizes=(1, 32), timing_samples=(8, 64),
                    repeats=1, curve_points=5)


def test_report_figures_match_the_caches(trained, report):
    net, data = trained
    cost = net.cost()
    test = collect_outputs(net, data.test)
    r = report["result"]
    again = evaluate_policy(ExitPolicy.from_dict(report["policy"]), test, cost)
    assert r["accuracy"] == pytest.approx(again["accuracy"]) and r["expected_macs"] == pytest.approx(again["expected_macs"])
    assert sum(r["exit_distribution"]) == pytest.approx(1.0)
    per_exit = (test.logits.argmax(-1) == test.targets).double().mean(1).tolist()
    assert [e["accuracy"] for e in report["exits"]] == pytest.approx(per_exit)
    assert [e["dynamic_macs"] for e in report["exits"]] == list(cost.dynamic_macs)
    # the goal was fitted on validation: it holds there by construction
    v = report["validation"]
    assert v["final_accuracy"] - v["accuracy"] <= 0.02 + 1e-9
    # the oracle is an upper bound on accuracy among exit choices and costs no more than the full net
    assert report["oracle"]["accuracy"] >= max(per_exit) - 1e-9
    assert report["oracle"]["expected_macs"] <= cost.dynamic_macs[-1]
    assert report["dataset"] == {"name": "synthetic", "split": "test", "samples": len(data.test)}


def test_report_timing_and_curve(report):
    timing = report["timing"]
    assert [t["batch_size"] for t in timing] == [1, 32] and [t["samples"] for t in timing] == [8, 64]
    for t in timing:
        assert t["static_ms_per_sample"] > 0 and t["engine_ms_per_sample"] > 0
        assert t["ratio"] == pytest.approx(t["measured_speedup"] / t["mac_speedup"])
        best = report["model"]["full_macs"] / report["exits"][0]["dynamic_macs"]  # all leave at the first exit
        worst = report["model"]["full_macs"] / report["exits"][-1]["dynamic_macs"]  # nobody leaves early
        assert worst - 1e-9 <= t["mac_speedup"] <= best + 1e-9
    curve = report["curve"]
    assert 1 <= len(curve) <= 5
    macs = [c["expected_macs"] for c in curve]
    assert macs == sorted(macs)
    for c in curve:  # each point was fitted to its budget on validation
        assert c["val_macs"] <= c["budget"] * (1 + 1e-9)
        assert 0 <= c["accuracy"] <= 1


def test_report_writes_json_markdown_and_plots(report, tmp_path):
    paths = report.save(tmp_path)
    assert sorted(p.name for p in paths) == ["curve.png", "exits.png", "report.json", "report.md"]
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    back = Report.load(tmp_path / "report.json")
    assert back["result"]["accuracy"] == report["result"]["accuracy"]
    assert back["policy"]["thresholds"] == report["policy"]["thresholds"]
    json.loads((tmp_path / "report.json").read_text())  # strict JSON (no Infinity)
    md = (tmp_path / "report.md").read_text()
    assert "| Architecture | Test acc. | Inf. time (batch 1) | Speed-up | Exits |" in md
    assert "oracle" in md and "measured" in md


def test_report_without_timing_or_curve(trained):
    net, data = trained
    r = evaluate(net, data, batch_sizes=(), curve_points=0, split="val")
    assert r["timing"] == [] and r["curve"] == [] and r["dataset"]["split"] == "val"
    assert "Wall-clock" not in r.to_markdown()
    with pytest.raises(ValueError, match="split"):
        evaluate(net, data, split="dev")


def test_gated_network_reports_both_inference_options_of_the_paper():
    # Option 1, the soft output f~_1, as an accuracy; option 2 at the fixed 0.5, beside the fitted rule.
    from eenn.objectives.branching import soft_output

    data = eenn.load_dataset("synthetic", num_samples=300, noise=70.0)
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 4], width=0.5,
                              head="branching")
    eenn.fit(net, data, "branching", epochs=1, lr=0.05, batch_size=64, progress=False)
    r = evaluate(net.eval(), data, policy="gate", batch_sizes=(), curve_points=0)
    test = collect_outputs(net, data.test)
    soft = (soft_output(test).argmax(-1) == test.targets).double().mean().item()
    fixed = evaluate_policy(ExitPolicy("gate", 0.5), test, net.cost())
    assert r["gated"]["soft_output_accuracy"] == pytest.approx(soft)
    assert r["gated"]["fixed_rule"]["accuracy"] == pytest.approx(fixed["accuracy"])
    assert r["gated"]["fixed_rule"]["speedup"] == pytest.approx(fixed["speedup"])
    assert "soft output f~_1" in r.to_markdown()
    assert "gated" not in evaluate(*_joint(), batch_sizes=(), curve_points=0).data  # no gates, no section


def test_eenets_v3_run_reports_its_own_fixed_rule():
    """After EENets' v3 loss the paper's rule is 1/N (N early exits), not 0.5: a run reports it."""
    from eenn.config import config_from_dict
    from eenn.run import evaluate_run

    data = eenn.load_dataset("synthetic", num_samples=300, noise=70.0)
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5], width=0.5,
                              head="eenets")
    eenn.fit(net, data, eenn.create_objective("eenets", version="v3"), epochs=1, lr=0.05, batch_size=64, progress=False)
    cfg = config_from_dict({"objective": {"name": "eenets", "options": {"version": "v3"}},
                            "eval": {"policy": "gate", "batch_sizes": [], "curve_points": 0}})
    r = evaluate_run(net.eval(), data, cfg, None)
    fixed = evaluate_policy(ExitPolicy("gate", 1 / 3), collect_outputs(net, data.test), net.cost())
    assert r["gated"]["fixed_rule"]["threshold"] == pytest.approx(1 / 3)
    assert r["gated"]["fixed_rule"]["accuracy"] == pytest.approx(fixed["accuracy"])
    assert "fixed gate >= 0.333" in r.to_markdown()
    v2 = config_from_dict({"objective": {"name": "eenets"}, "eval": {"policy": "gate", "batch_sizes": [], "curve_points": 0}})
    assert evaluate_run(net.eval(), data, v2, None)["gated"]["fixed_rule"]["threshold"] == 0.5


def _joint():
    data = eenn.load_dataset("synthetic", num_samples=200, noise=70.0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 4], width=0.5)
    net.input_spec = eenn.InputSpec.from_info(data.info)  # built without fit
    return net.eval(), data
