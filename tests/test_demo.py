import pytest

from eenn.demo import run_demo


def test_demo_trains_every_exit(capsys, tmp_path):
    res = run_demo(backbone="resnet20", exits=[3, 6], epochs=4, out=tmp_path, repeats=1)
    out = capsys.readouterr().out
    assert "per-exit test accuracy and cost" in out and "final" in out
    # calibrated on validation, the Table-2 line on test, the oracle, and the files
    assert "| resnet20 + max_prob |" in out and "| oracle |" in out and "ratio to the MAC saving" in out
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "curve.png", "exits.png"}
    assert res["report"]["validation"]["final_accuracy"] - res["report"]["validation"]["accuracy"] <= 0.01 + 1e-9
    assert len(res["test_accuracy"]) == 3 and min(res["test_accuracy"]) > 0.5
    assert res["macs"] == sorted(res["macs"])


def test_demo_does_not_report_over_a_training_run(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {backbone: mlp}\n")
    (tmp_path / "report.md").write_text("the run's own report")
    with pytest.raises(ValueError, match="is a run directory .*give another --out"):
        run_demo(epochs=1, out=tmp_path)
    assert (tmp_path / "report.md").read_text() == "the run's own report"
