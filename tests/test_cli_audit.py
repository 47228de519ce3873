"""What a new user of the ``eenn`` command met: thresholds reused after the run was trained again,
a calibration split that overlaps training, flags that did nothing, confidences that were not
the answer's, and errors that were tracebacks or had the wrong exit status."""
import json
import shutil

import numpy as np
import pytest
import torch

import eenn
from eenn.cli import main
from eenn.io import read_json

FAST = ["--batch-sizes", "", "--curve-points", "2", "--deployments", "eager"]


def _train(out, *extra):
    return ["train", "--dataset", "digits", "--backbone", "mlp", "--exits", "all", "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def aep_run(tmp_path_factory):
    """An AEP run answered by its ensemble rule (linear weights), calibrated."""
    out = tmp_path_factory.mktemp("audit") / "aep"
    assert main(_train(out, "--epochs", "1", "--objective", "aep", "-O", "scheme=linear", "--policy", "ensemble",
                       "--set", "eval.policy_options={weights: linear}", "--no-report")) == 0
    assert main(["calibrate", str(out), "--max-drop", "0.05"]) == 0
    return out


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    return err[0]


def test_predict_refuses_report_thresholds_of_other_weights(tmp_path, capsys):
    """The report's thresholds, like calibration.json's, name the weights they were fitted on:
    after the run is trained again, predict (and export) refuse them until they are fitted again."""
    run = tmp_path / "run"
    assert main(_train(run, "--epochs", "1", *FAST)) == 0
    report = read_json(run / "report.json")
    assert report["weights_sha256"] == eenn.read_description(run / "best.safetensors")["sha256"]
    np.save(tmp_path / "x.npy", eenn.load_dataset("digits").test.x[0].numpy())
    predict = ["predict", str(run), str(tmp_path / "x.npy")]
    assert main(predict) == 0  # no calibration.json: the report's thresholds
    with pytest.warns(UserWarning, match="epochs: 1 -> 3"):
        assert main(_train(run, "--epochs", "3", "--no-report")) == 0
    assert eenn.read_description(run / "best.safetensors")["sha256"] != report["weights_sha256"]
    capsys.readouterr()
    assert main(predict) == 1
    _one_line(capsys, "report.json was calibrated on other weights", f"re-run `eenn evaluate {run}`")
    assert main(["export", str(run / "best.safetensors"), "--out", str(tmp_path / "exp"),
                 "--calibration", str(run / "report.json")]) == 1
    _one_line(capsys, "fitted on other weights")
    assert not (tmp_path / "exp").exists()
    assert main(["evaluate", str(run), *FAST]) == 0  # fitted again: taken
    assert main(predict) == 0
    old = read_json(run / "report.json")
    del old["weights_sha256"]  # a report written before reports named their weights: taken as it is
    (run / "report.json").write_text(json.dumps(old))
    assert main(predict) == 0


@pytest.mark.parametrize("flags, said", [
    (["--val-fraction", "0.3"], "val_fraction 0.3, seed 0"),
    (["--set", "train.seed=7"], "val_fraction 0.1, seed 7"),
])
@pytest.mark.parametrize("command", ["calibrate", "evaluate"])
def test_a_split_other_than_the_runs_is_refused(aep_run, tmp_path, capsys, command, flags, said):
    """Another seed or val_fraction would fit thresholds on samples the network trained on."""
    capsys.readouterr()
    assert main([command, str(aep_run), *flags, "--out", str(tmp_path / "out"), *(FAST if command == "evaluate" else [])]) == 2
    _one_line(capsys, "trained beside the validation split of val_fraction 0.1, seed 0", said, "leave out --val-fraction")
    assert not (tmp_path / "out").exists()


def test_a_split_recorded_only_in_the_checkpoint_is_kept(tmp_path, capsys):
    """A folder written by eenn.fit (no config.yaml): its checkpoint says the data set and the
    split, for the folder as for the file; another seed is refused there too."""
    data = eenn.load_dataset("digits", seed=3)
    torch.manual_seed(0)
    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8, exits="all")
    eenn.fit(net, data, epochs=1, lr=0.05, progress=False, out_dir=str(tmp_path / "run"), seed=3)
    got = []
    for target in (tmp_path / "run", tmp_path / "run" / "best.safetensors"):
        assert main(["calibrate", str(target), "--out", str(tmp_path / "cal.json")]) == 0, capsys.readouterr().err
        got.append(read_json(tmp_path / "cal.json")["policy"]["thresholds"])
    fitted = eenn.calibrate("max_prob", eenn.collect_outputs(net.eval(), data.val), net.cost(), {"max_drop": 0.01})
    assert got[0] == got[1] == pytest.approx(fitted.thresholds.tolist())
    assert main(["calibrate", str(tmp_path / "run"), "--set", "train.seed=0", "--out", str(tmp_path / "c2.json")]) == 2
    _one_line(capsys, "val_fraction 0.1, seed 3", "seed 0")


def test_predict_confidence_is_the_rules_answer(aep_run, tmp_path, capsys):
    """The printed class and confidence are the ensemble's, as the exit loop that serves answers
    them, not the softmax of the exit taken alone."""
    from eenn.policies import ExitPolicy
    from eenn.policies.loop import Answers, run_exits, start

    x = eenn.load_dataset("digits").test.x[:64]
    np.save(tmp_path / "x.npy", x.numpy())
    capsys.readouterr()
    assert main(["predict", str(aep_run), str(tmp_path / "x.npy"), "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    net = eenn.load(aep_run / "best.safetensors").eval()
    bound = ExitPolicy.load(aep_run / "calibration.json").bind(net.num_exits)
    assert bound.policy.name == "ensemble"
    answers = Answers()
    with torch.no_grad():
        run_exits(bound, start(net.preprocess(x)), net.forward_segment, answers, probs=True)
        alone = net(net.preprocess(x)).logits.softmax(-1)
    served = answers.ordered(len(x))
    assert [r["prediction"] for r in recs] == served["prediction"].tolist()
    assert [r["exit"] for r in recs] == served["exit"].tolist()
    want = served["probs"].max(-1).values
    assert [r["confidence"] for r in recs] == pytest.approx(want.tolist(), abs=1e-6)
    # the exit's own softmax differs: what predict printed before
    own = torch.tensor([float(alone[r["exit"], i, r["prediction"]]) for i, r in enumerate(recs)])
    assert (own - want).abs().max() > 1e-3


def test_another_rule_does_not_take_the_runs_policy_options(aep_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["calibrate", str(aep_run), "--policy", "max_prob", "--out", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note:") and "(weights)" in err[0] and "not carried over" in err[0], err
    assert read_json(tmp_path / "c.json")["policy"]["options"] == {}
    assert main(["evaluate", str(aep_run), "--policy", "entropy", "--out", str(tmp_path / "rep"), *FAST]) == 0
    assert read_json(tmp_path / "rep" / "report.json")["policy"]["rule"] == "entropy"


@pytest.mark.parametrize("flag", [["--split", "val"], ["--batch-sizes", "1"], ["--timing-samples", "4"],
                                  ["--repeats", "1"], ["--curve-points", "3"], ["--deployments", "eager"]])
def test_calibrate_offers_no_flag_it_would_ignore(flag, capsys):
    assert main(["calibrate", "runs/none", *flag]) == 2
    _one_line(capsys, "unrecognized arguments", flag[0])


def test_a_device_this_machine_lacks_is_one_line(aep_run, tmp_path, monkeypatch, capsys):
    """As for `eenn train`: evaluate and calibrate say CUDA is absent, in one line; a run trained
    on CUDA is still evaluated on a machine without it (where the network is), with a note."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    for command in (["evaluate", *FAST], ["calibrate"]):
        assert main([command[0], str(aep_run), "--device", "cuda", "--out", str(tmp_path / "o"), *command[1:]]) == 1
        _one_line(capsys, "device 'cuda' asked for, but CUDA is not available here")
    assert main(["calibrate", str(aep_run), "--device", "cpu", "--out", str(tmp_path / "c.json")]) == 0
    gpu_run = tmp_path / "gpu"
    shutil.copytree(aep_run, gpu_run)
    cfg = (gpu_run / "config.yaml").read_text()
    assert "device: null" in cfg
    (gpu_run / "config.yaml").write_text(cfg.replace("device: null", "device: cuda"))
    capsys.readouterr()
    assert main(["calibrate", str(gpu_run)]) == 0
    _one_line(capsys, "note:", "trained on 'cuda'")


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "nope", "--epochs", "1"], "unknown dataset 'nope'"),
    (["train", "--dataset", "digits", "-H", "widht=64", "--epochs", "1"], "does not accept option(s) 'widht'"),
    (["train", "--dataset", "digits", "--set", "model.head=[linear, linear]", "--set",
      "model.head_options=[{width: 8}, {wdth: 8}]", "--exits", "1", "--backbone", "mlp"], "'wdth'"),
    (["train", "--dataset", "digits", "--alpha", "0.1"], "--alpha guards a --max-drop goal"),
])
def test_settings_mistakes_exit_2(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    _one_line(capsys, needle)
    assert not (tmp_path / "r").exists()


def test_reports_name_the_split_they_report_on(aep_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(aep_run), "--split", "val", "--out", str(tmp_path / "rep"), *FAST]) == 0
    out = capsys.readouterr().out
    header = "| Architecture | Val. acc. | Inf. time (batch 1) | Speed-up | Exits |"
    assert header in out and header in (tmp_path / "rep" / "report.md").read_text() and "Test acc." not in out


def test_output_paths_that_cannot_be_written_are_one_line(aep_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "cmp.yaml").write_text("data: {name: digits}\nmethods:\n  A: {objective: {name: joint}}\n")
    (tmp_path / "search.yaml").write_text("data: {name: digits}\n")
    for argv in (_train("afile", "--epochs", "1"), _train("afile/run", "--epochs", "1"),
                 ["compare", "--config", "cmp.yaml", "--out", "afile"],
                 ["search", "--config", "search.yaml", "--out", "afile"]):
        assert main(argv) == 1, argv
        _one_line(capsys, "afile is a file, not a folder; give a folder path")
    assert (tmp_path / "afile").read_text() == "keep"
    assert main(["calibrate", str(aep_run), "--out", "missing/dir/c.json"]) == 1
    _one_line(capsys, "--out missing/dir/c.json: there is no folder missing/dir")
