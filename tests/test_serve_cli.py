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
