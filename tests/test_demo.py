from eenn.demo import run_demo


def test_demo_trains_every_exit(capsys):
    res = run_demo(backbone="resnet20", exits=[3, 6], epochs=4)
    out = capsys.readouterr().out
    assert "per-exit test accuracy and cost" in out and "final" in out
    assert len(res["test_accuracy"]) == 3 and min(res["test_accuracy"]) > 0.5
    assert res["macs"] == sorted(res["macs"])
