"""`eenn export` / `eenn plan` through their parsers (served by `python -m eenn.serve.cli` until the
main command wires them in)."""
import json

import pytest
import torch

import eenn
from eenn.exporter import load_manifest
from eenn.serve import TierPlan
from eenn.serve.cli import _main


def test_export_then_plan(tmp_path, capsys):
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5], width=0.5)
    ckpt = eenn.save(net, tmp_path / "m.safetensors")
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "a"), "--thresholds", "0.9,0.8,0.7"]) == 0
    assert load_manifest(tmp_path / "a")["policy"]["thresholds"] == pytest.approx([0.9, 0.8, 0.7])
    # one value for every exit, as the help says, in any spelling a number has
    for text, want in ((".9", 0.9), ("inf", float("inf")), ("[0.5]", None)):
        assert _main(["export", str(ckpt), "--out", str(tmp_path / "one"), "--thresholds", text]) == (0 if want else 1)
        if want:
            assert load_manifest(tmp_path / "one")["policy"]["thresholds"] == pytest.approx([want] * 3)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # NaN would never let an exit fire: refused as a usage error
        _main(["export", str(ckpt), "--out", str(tmp_path / "nan"), "--thresholds", "nan,nan,nan"])
    assert "a NaN threshold never lets an exit fire" in capsys.readouterr().err
    # calibrated on the digits validation split: normalisation and exit distribution recorded
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--dataset", "digits", "--max-drop", "0.05",
                  "--policy", "entropy"]) == 0
    m = load_manifest(tmp_path / "b")
    assert m["policy"]["rule"] == "entropy" and m["preprocess"]["mean"] and len(m["validation"]["depth_distribution"]) == 4
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"policy": "margin", "thresholds": 0.5, "validation": m["validation"]}))
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "c"), "--calibration", str(calib)]) == 0
    assert load_manifest(tmp_path / "c")["policy"]["rule"] == "margin"
    out = tmp_path / "plan.yaml"
    assert _main(["plan", str(tmp_path / "c"), "--tier", "device=1e6", "--tier", "edge=1e8", "--tier", "cloud=1e10",
                  "--link", "1e6,0.001", "--link", "1e7,0.01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expected latency" in printed and "exported 4 segments" in printed
    plan = TierPlan.load(out)
    assert plan.tiers[0].start == 0 and plan.tiers[-1].stop == 4
    # the first tier runs in the HTTP front's replicas unless told otherwise (--no-with-front)
    assert [t.with_front for t in plan.tiers] == [True] + [False] * (len(plan.tiers) - 1)
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "d")]) == 1  # no thresholds: a clear error
    assert "no thresholds" in capsys.readouterr().err


def test_serve_reports_an_unreadable_plan_in_one_line(tmp_path, capsys):
    for text, message in [("", "is empty"), ("tiers: [{name: a\n", "not valid YAML at line 2, column 1"),
                          ("model: export\ntiers: [{name: a, segments: rest}]\n",
                           f"no exported model at {tmp_path / 'export'} (missing manifest.json)")]:
        plan = tmp_path / "plan.yaml"
        plan.write_text(text)
        assert _main(["serve", "--plan", str(plan), "--local"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("eenn: error: ") and message in err and err.count("\n") == 1, err


def _checkpoint(tmp_path, exits=(1, 3, 5)):
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=list(exits), width=0.5)
    return eenn.save(net, tmp_path / f"m{len(exits)}.safetensors")


def test_export_leaves_out_a_calibration_distribution_its_flags_change(tmp_path, capsys):
    """The record's exit distribution is that of its own policy: exported with other thresholds,
    another fallback or another rule, it would make `eenn plan` weigh latencies with the wrong
    shares, so it is left out (and plan asks for one); another rule has no thresholds to take."""
    ckpt = _checkpoint(tmp_path)
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "cal"), "--dataset", "digits", "--max-drop", "0.05"]) == 0
    m = load_manifest(tmp_path / "cal")
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"policy": m["policy"], "validation": m["validation"]}))
    capsys.readouterr()
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "same"), "--calibration", str(calib)]) == 0
    assert load_manifest(tmp_path / "same")["validation"] == m["validation"]
    assert "note:" not in capsys.readouterr().err
    for flags in (["--thresholds", "0.5"], ["--fallback", "most_confident"]):
        out = tmp_path / flags[0].strip("-")
        assert _main(["export", str(ckpt), "--out", str(out), "--calibration", str(calib), *flags]) == 0
        assert load_manifest(out)["validation"] is None
        assert "validation exit distribution does not describe this export" in capsys.readouterr().err
        assert _main(["plan", str(out), "--tier", "device=1e6", "--tier", "cloud=1e10", "--link", "1e6,0.001"]) == 1
        assert "no validation exit distribution" in capsys.readouterr().err
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "ent"), "--calibration", str(calib),
                  "--policy", "entropy"]) == 1
    err = capsys.readouterr().err
    assert "--policy entropy is not the rule 'max_prob'" in err and "eenn calibrate RUN --policy entropy" in err
    assert err.count("\n") == 1 and "note:" not in err


def test_a_plan_written_elsewhere_finds_its_export_and_bad_tiers_are_usage_errors(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    assert _main(["export", str(ckpt), "--out", str(tmp_path / "exp"), "--dataset", "digits"]) == 0
    out = tmp_path / "plans" / "deep" / "p.yaml"
    out.parent.mkdir(parents=True)
    assert _main(["plan", str(tmp_path / "exp"), "--tier", "device=2e7", "--tier", "edge=5e8", "--link", "2.5e5,0.005",
                  "--out", str(out)]) == 0
    plan = TierPlan.load(out)  # the model's path is read relative to the plan
    assert load_manifest(plan.model)["num_exits"] == 4
    capsys.readouterr()
    for bad in (["--tier", "device=abc"], ["--tier", "device=measure:x"], ["--tier", "device=1e6", "--link", "1,2,3"]):
        with pytest.raises(SystemExit) as e:
            _main(["plan", str(tmp_path / "exp"), *bad])
        assert e.value.code == 2
        assert "eenn plan: error: argument --" in capsys.readouterr().err


def test_an_export_over_a_deeper_one_removes_its_stale_graphs(tmp_path):
    deep, shallow = _checkpoint(tmp_path), _checkpoint(tmp_path, exits=(2,))
    out = tmp_path / "exp"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    assert _main(["export", str(deep), "--out", str(out), "--thresholds", "0.9"]) == 0
    assert (out / "segment_3.onnx").is_file() and (out / "fused_batch1.onnx").is_file()
    assert _main(["export", str(shallow), "--out", str(out), "--thresholds", "0.9", "--policy", "patience"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "segment_0.onnx", "segment_1.onnx",
                                                     "static.onnx"]
