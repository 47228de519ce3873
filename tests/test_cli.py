import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eenn
from eenn.cli import main

from _helpers import mlp_compare_yaml

ROOT = Path(__file__).resolve().parent.parent


def test_train_command_writes_a_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    def args(epochs, *more):
        return ["train", "--dataset", "digits", "--backbone", "lenet5", "--exits", "1,2", "--epochs", str(epochs),
                "--lr", "0.05", "-O", "weights=pabee", "-B", "width=2", "--out", str(out), "--no-progress", *more]

    assert main(args(2, "--no-report")) == 0  # the report: tests run_dir and test_evaluate_calibrate_predict
    assert "validation accuracy per exit" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    net = eenn.load(out / "best.safetensors")
    assert net.num_exits == 3 and net.config["source"]["options"] == {"width": 2}
    # re-running with more epochs continues from last.safetensors
    with pytest.warns(UserWarning, match="changed settings.*epochs: 2 -> 3"):
        assert main(args(3, "--no-report")) == 0
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # another network or objective in the same directory is refused, not resumed into a mix
    before = (out / "metrics.jsonl").read_text()
    other = [a if a != "width=2" else "width=1" for a in args(4)]
    assert main(other) == 2  # a settings error, as for bad flags
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with other settings" in err[0] and "width: 2 -> 1" in err[0], err
    assert "another out_dir" in err[0]
    assert (out / "metrics.jsonl").read_text() == before and eenn.load(out / "last.safetensors").num_exits == 3


def test_exits_flag_takes_what_the_python_api_takes():
    from eenn.cli import _exits

    assert _exits("1,3") == [1, 3] and _exits("linear:3") == "linear:3" and _exits("none") == "none"
    names = _exits("block2.0, block3.0")
    assert names == ["block2.0", "block3.0"]
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=names)
    assert net.exit_names == ["exit0@block2.0", "exit1@block3.0", "final"]


def test_bad_command_lines_give_one_clear_line(capsys):
    assert main(["train", "--objective", "nope", "--epochs", "1"]) == 2  # found by the config check
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown objective 'nope'" in err[0]
    assert main(["train", "-O", "weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KEY=VALUE" in err[0]


def test_list_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "eenn", "list"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    assert "resnet110" in r.stdout and "heads_only" in r.stdout and "fashion_mnist" in r.stdout


FAST_EVAL = ["--batch-sizes", "1,16", "--timing-samples", "4,32", "--repeats", "1", "--curve-points", "3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny run made from a YAML config with command-line overrides."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "run.yaml"
    cfg.write_text("data: {name: digits}\nmodel: {backbone: lenet5, exits: [1, 2], backbone_options: {width: 2}}\n"
                   "objective: {name: joint}\ntrain: {epochs: 1, lr: 0.05, progress: false}\n"
                   "eval: {policy: max_prob, goal: {max_drop: 0.02}}\n")
    out = root / "run"
    assert main(["train", "--config", str(cfg), "--set", "train.epochs=2", "--out", str(out), *FAST_EVAL]) == 0
    return out


def test_run_directory_holds_everything(run_dir):
    from eenn.config import load_config

    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "run.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "report.json",
            "report.md", "curve.png", "exits.png"} <= names
    cfg = load_config(run_dir / "config.yaml")  # the resolved config: file + --set + flags
    assert cfg.train.epochs == 2 and cfg.model.backbone_options == {"width": 2} and cfg.eval.batch_sizes == [1, 16]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["argv"][:3] == ["train", "--config", str(run_dir.parent / "run.yaml")]
    assert info["versions"]["torch"] and info["versions"]["python"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert "| Architecture |" in (run_dir / "report.md").read_text()


def test_evaluate_calibrate_predict(run_dir, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "entropy"
    assert main(["evaluate", str(run_dir), "--policy", "entropy", "--budget", "200000", "--out", str(out), "--deployments", "all",
                 *FAST_EVAL]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["policy"]["name"] == "entropy" and rep["policy"]["goal"] == {"budget": 200000.0}
    # every path this machine offers, the static and the early-exit network on each, the best of each named
    rows = rep["deployments"]["rows"]
    assert len(rep["timing"]) == len(rows) == 2
    assert {"PyTorch eager", "PyTorch optimised", "onnxruntime, 1 thread"} <= set(rows[0]["paths"])
    for r, t in zip(rows, rep["timing"]):
        assert t["static_ms_per_sample"] == min(v["static_ms"] for v in r["paths"].values())
        assert t["engine_ms_per_sample"] == min(v["early_ms"] for v in r["paths"].values())
        assert r["ratio"] == pytest.approx(r["speedup"] / r["mac_speedup"])
    assert rep["deployments"]["worst_ratio"] == min(r["ratio"] for r in rows)
    assert "worst ratio over the best static:" in (out / "report.md").read_text()
    assert rep["validation"]["expected_macs"] <= 200000
    assert main(["calibrate", str(run_dir), "--max-drop", "0.01"]) == 0
    from eenn.io import read_json

    cal = read_json(run_dir / "calibration.json")
    assert cal["policy"]["rule"] == "max_prob" and len(cal["policy"]["thresholds"]) == 2 and "goal_held" in cal["test"]
    # the record is what `eenn export --calibration` reads (infinite thresholds included)
    assert main(["export", str(run_dir / "best.safetensors"), "--out", str(tmp_path / "exp"),
                 "--calibration", str(run_dir / "calibration.json")]) == 0
    from eenn.exporter import load_manifest

    manifest = load_manifest(tmp_path / "exp")
    assert manifest["policy"]["thresholds"] == pytest.approx(cal["policy"]["thresholds"])
    capsys.readouterr()
    # predict: a uint8 image-like .npy, a batch of float inputs, a PNG, and a bad file
    from PIL import Image

    data = eenn.load_dataset("digits")
    x = data.test.x[:3]
    np.save(tmp_path / "one.npy", x[0].numpy())
    Image.fromarray(x[1, 0].numpy()).save(tmp_path / "two.png")
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    code = main(["predict", str(run_dir), str(tmp_path / "one.npy"), str(tmp_path / "two.png"),
                 str(tmp_path / "bad.npy"), "--json"])
    io = capsys.readouterr()
    assert code == 1  # one input failed; the others were answered
    recs = [json.loads(line) for line in io.out.splitlines()]
    assert [r["input"] for r in recs] == [str(tmp_path / "one.npy"), str(tmp_path / "two.png")]
    # the answers equal the engine's on the evaluation pipeline's own inputs
    from eenn.engine import DynamicEngine

    net = eenn.load(run_dir / "best.safetensors")
    xb = next(iter(eenn.TensorLoader(data.test.subset(torch.arange(2)), 2, mean=data.info.mean, std=data.info.std)))[0]
    ref = DynamicEngine(net.eval(), eenn.policies.ExitPolicy.from_dict(cal))(xb)
    assert [r["prediction"] for r in recs] == ref.prediction.tolist() and [r["exit"] for r in recs] == ref.exit.tolist()
    err = io.err.strip().splitlines()
    assert len(err) == 1 and "bad.npy" in err[0]


def test_a_refused_resume_writes_nothing(run_dir, tmp_path, capsys):
    """Checkpoints without their config.yaml, resumed as another network: refused when the weights
    do not fit, and the folder keeps what it held (no config.yaml or run.json of the refused run)."""
    import shutil

    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(run_dir / "last.safetensors", d / "last.safetensors")
    assert main(["train", "--dataset", "digits", "--backbone", "mlp", "--epochs", "1", "--out", str(d),
                 "--no-progress", "--no-report"]) == 1
    assert sorted(p.name for p in d.iterdir()) == ["last.safetensors"], capsys.readouterr().err


def test_a_diverging_run_stops_in_one_line_and_saves_no_broken_epoch(tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(["train", "--dataset", "digits", "--backbone", "mlp", "--exits", "all", "--epochs", "3", "--lr", "1e30",
                 "--limit", "300", "--batch-size", "1024", "--out", str(out), "--no-progress", "--no-report"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "became [nan" in err[0] and "lower the learning rate" in err[0], err
    assert not (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()


@pytest.mark.parametrize("methods, message", [
    ("  B NET: {objective: {name: joint}}\n  B-NET: {objective: {name: final}}\n",
     "methods 'B NET' and 'B-NET' would share the run directory 'B-NET'"),
    ("  A: {objective: {name: joint}}\n  X: {objective: {name: joint, options: {wieghts: sdn}}}\n",
     "methods.X: objective: objective 'joint' does not accept option(s) 'wieghts'"),
    ("  AEP: {objective: {name: aep}, prune: true}\n", "methods.AEP.prune: pruning keeps the best truncation"),
])
def test_compare_files_are_checked_whole_before_anything_trains(tmp_path, methods, message):
    """Every method's mistakes are found when the file is read, not when its turn comes after
    the others trained; labels map to distinct folders inside --out ('..' included)."""
    from eenn.compare import _slug, load_compare
    from eenn.config import ConfigError

    cfg = tmp_path / "cmp.yaml"
    cfg.write_text("data: {name: digits}\nmethods:\n" + methods)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_compare(cfg)
    assert _slug("..") == "method" and _slug("./x") == "x"


def test_a_method_that_fails_does_not_stop_the_others(tmp_path, capsys):
    cfg = mlp_compare_yaml(tmp_path, "  Diverges: {train: {lr: 1.0e+30}}\n  B-NET: {objective: {name: joint}}\n",
                           train=", batch_size: 1024, optimizer: sgd")
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp")]) == 1
    err = capsys.readouterr().err
    assert "1 method(s) failed, the tables hold the others: Diverges: FloatingPointError" in err
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| data set | B-NET |" in md and "- Diverges: FloatingPointError" in md
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["failed"].keys() == {"Diverges"}


def test_compare_two_methods(tmp_path, capsys):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text("data: {name: digits}\nmodel: {backbone: lenet5, exits: [1, 2], backbone_options: {width: 2}}\n"
                   "train: {epochs: 1, lr: 0.05, progress: false}\n"
                   "eval: {batch_sizes: [1], timing_samples: [4], repeats: 1, curve_points: 3, deployments: eager}\n"
                   "methods:\n  Baseline: {objective: {name: final}}\n  B-NET: {objective: {name: joint}}\n"
                   "  AEP: {objective: {name: aep, options: {scheme: linear}}, prune: true,\n"
                   "        eval: {policy: ensemble, policy_options: {weights: linear}}}\n")
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| data set | Baseline | B-NET | AEP |" in md and "| B-NET (max_prob) |" in md
    assert "| AEP (ensemble) |" in md and "AEP pruned (AEP): k* =" in md
    prune = json.loads((tmp_path / "cmp" / "AEP" / "prune.json").read_text())
    assert prune["macs"][1] <= prune["macs"][0] and 0 <= prune["k"] <= 2
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 5000
    assert {p.name for p in (tmp_path / "cmp").iterdir()} >= {"Baseline", "B-NET", "compare.json"}
    # re-running reuses the finished runs (no training: the metrics files keep one line)
    before = (tmp_path / "cmp" / "B-NET" / "metrics.jsonl").read_text()
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp"), "--methods", "B-NET"]) == 0
    assert (tmp_path / "cmp" / "B-NET" / "metrics.jsonl").read_text() == before
    # the tables still hold the other finished methods, not B-NET alone
    assert "| data set | Baseline | B-NET | AEP |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "AEP pruned (AEP): k* =" in (tmp_path / "cmp" / "compare.md").read_text()
    # --retrain trains the method again from its start (it used to resume the finished run: no training)
    last = tmp_path / "cmp" / "Baseline" / "last.safetensors"
    written = last.stat().st_mtime_ns
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp"), "--methods", "Baseline",
                 "--retrain"]) == 0
    assert last.stat().st_mtime_ns > written  # the checkpoint was written again
    assert len((tmp_path / "cmp" / "Baseline" / "metrics.jsonl").read_text().splitlines()) == 1
    # other evaluation settings: reported again with them, still no training
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp"), "--methods", "B-NET",
                 "--set", "eval.goal={max_drop: 0.2}"]) == 0
    assert (tmp_path / "cmp" / "B-NET" / "metrics.jsonl").read_text() == before
    rep = json.loads((tmp_path / "cmp" / "B-NET" / "report.json").read_text())
    assert rep["policy"]["goal"] == {"max_drop": 0.2} and rep["result"]["goal"]["max_drop"] == 0.2


@pytest.mark.parametrize("argv, code, needle", [
    (["train", "--epochs", "x"], 2, "invalid int value"),
    (["train", "--set", "train.epoch=3"], 2, "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    (["train", "--set", "train.epochs=many"], 2, "train.epochs: expected int"),
    (["evaluate", "/nonexistent/run"], 1, "neither a run directory nor a checkpoint"),
    (["train", "--dataset", "cifar10", "--epochs", "1"], 1, "files not found. Looked for one of these sets of files:"),
    (["train", "--dataset", "cifar10", "--epochs", "1"], 1, "in these places, in order: 1. data_dir (not given)"),
    (["train", "--data-dir", "no-such-dir", "--epochs", "1"], 1, "data_dir 'no-such-dir' is not a folder"),
    (["train", "--optimizer", "adam"], 2, "train: unknown optimizer 'adam'"),
    (["train", "--val-fraction", "0"], 2, "data.val_fraction: 0 must lie in (0, 1)"),
    (["calibrate", "run", "--out", "run/best.safetensors"], 1, "is a checkpoint (safetensors): writing a calibration"),
    (["train", "--set", "train.seed=99999999999999999999"], 2, "train: seed must be in [0, 2**32 - 1]"),
    (["predict", "run", "x.npy", "--calibration", "typo.json"], 1, "--calibration typo.json: no such file"),
    (["compare", "--config", "/nonexistent.yaml"], 2, "not found"),
    (["predict"], 2, "the following arguments are required"),
    (["compare", "--config", "c.yaml", "--methods", ","], 2, "expected one or more method labels"),
])
def test_bad_input_is_one_line(argv, code, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-data").mkdir()  # an empty $EENN_DATA_DIR: the user's own is not searched
    monkeypatch.setenv("EENN_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


_USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.b(self.a(x)), 1)) * self.scale


def make():
    return Net()


def make_scaled():
    return Net(scale=2.0)


def not_a_model():
    return 42
'''


def test_cli_loads_a_network_made_by_attach_exits_with_model(tmp_path, monkeypatch, capsys):
    """A network cut from a user model stores no code: the commands that load a checkpoint take
    --model MODULE:FUNCTION (a module on the path or a .py file), and without it say so in one
    line; eenn.load takes the same string as ``model=``."""
    import numpy as np

    (tmp_path / "usermodels.py").write_text(_USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usermodels

    torch.manual_seed(0)
    net = eenn.attach_exits(usermodels.make(), at=["a"], input_shape=(1, 8, 8)).eval()
    ckpt = eenn.save(net, tmp_path / "cut.safetensors", policy=eenn.ExitPolicy("max_prob", [0.5]))
    x = torch.randn(5, 1, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        want = eenn.DynamicEngine(net, eenn.ExitPolicy("max_prob", [0.5]))(x)

    assert main(["predict", str(ckpt), str(tmp_path / "x.npy"), "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attach_exits on a user model (usermodels.Net)" in err[0] and "--model MODULE:FUNCTION" in err[0]
    with pytest.raises(eenn.checkpoint.ModelRequired, match=r"pass model="):
        eenn.load(ckpt)
    monkeypatch.chdir(tmp_path)  # a module name is looked for in the current folder
    for spec in ("usermodels:make", str(tmp_path / "usermodels.py") + ":Net"):
        assert main(["predict", str(ckpt), str(tmp_path / "x.npy"), "--json", "--model", spec]) == 0, spec
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["prediction"], r["exit"]) for r in rows] == list(zip(want.prediction.tolist(), want.exit.tolist()))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "exp"), "--model", "usermodels:make"]) == 0
    assert (tmp_path / "exp" / "manifest.json").exists()
    again = eenn.load(ckpt, model="usermodels.py:make")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    with pytest.warns(UserWarning, match="traces to another graph"):  # same weights, another constant
        eenn.load(ckpt, model="usermodels:make_scaled")
    bad = {"usermodels": "expected MODULE:FUNCTION", "nosuchmodule:make": "cannot import 'nosuchmodule'",
           "usermodels:missing": "has no function or class 'missing'", "nofile.py:make": "no file nofile.py",
           "usermodels:not_a_model": "returned int, not a torch.nn.Module"}
    for spec, says in bad.items():
        assert main(["predict", str(ckpt), str(tmp_path / "x.npy"), "--model", spec]) == 1, spec
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (spec, err)


def test_a_settings_error_under_torchrun_is_said_once(tmp_path, monkeypatch, capsys):
    """Every torchrun rank reads the same settings: a settings error is printed by rank 0 only
    (each rank still exits 2)."""
    args = ["train", "--dataset", "digits", "--backbone", "lenet5", "--lr", "-1", "--out", str(tmp_path / "r")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(args) == 2
        said.append(capsys.readouterr().err.strip().splitlines())
    assert len(said[0]) == 1 and "lr" in said[0][0] and said[1] == []
    assert not (tmp_path / "r").exists()


def test_export_and_calibrate_use_the_training_split(tmp_path, capsys):
    """`--dataset` calibration takes the validation split the network was trained beside (its
    run's config, else what its checkpoint records), never silently samples it was trained on."""
    import shutil

    data = eenn.load_dataset("digits", seed=3)
    torch.manual_seed(0)
    net = eenn.create_network("lenet5", in_channels=1, num_classes=10, input_size=8, exits=[1], width=2)
    eenn.fit(net, data, epochs=1, lr=0.05, progress=False, out_dir=str(tmp_path / "run"), seed=3)
    bare = tmp_path / "bare.safetensors"  # no run config beside it: the checkpoint says
    shutil.copy(tmp_path / "run" / "best.safetensors", bare)
    capsys.readouterr()
    assert main(["export", str(bare), "--dataset", "digits", "--out", str(tmp_path / "exp")]) == 0
    out, err = capsys.readouterr()
    assert "digits validation (144 samples, seed 3, val_fraction 0.1" in out and "note:" not in err
    assert main(["calibrate", str(bare), "--out", str(tmp_path / "cal.json")]) == 0
    from eenn.io import read_json

    fitted = eenn.calibrate("max_prob", eenn.collect_outputs(net.eval(), data.val), net.cost(), {"max_drop": 0.01})
    assert read_json(tmp_path / "cal.json")["policy"]["thresholds"] == pytest.approx(fitted.thresholds.tolist())
    # a checkpoint that does not say: the default split, and a note that says so
    plain = tmp_path / "plain.safetensors"
    eenn.save(net, plain)
    capsys.readouterr()
    assert main(["export", str(plain), "--dataset", "digits", "--out", str(tmp_path / "exp2")]) == 0
    out, err = capsys.readouterr()
    assert "seed 0" in out and err.startswith("note:") and "eenn calibrate RUN" in err


def test_evaluate_refuses_an_out_that_is_a_file_before_evaluating(run_dir, capsys):
    before = (run_dir / "best.safetensors").read_bytes()
    assert main(["evaluate", str(run_dir), "--out", str(run_dir / "best.safetensors")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "best.safetensors is a file" in err, err
    assert (run_dir / "best.safetensors").read_bytes() == before


def test_predict_refuses_a_calibration_of_other_weights(tmp_path, capsys):
    """A run trained again after `eenn calibrate` has other weights: its calibration.json is
    refused (one line: re-run eenn calibrate) rather than silently used; records that do not say
    which weights they were fitted on (older ones) still work."""
    import numpy as np

    from eenn.io import read_json, write_json

    run = tmp_path / "run"
    train = ["train", "--dataset", "digits", "--backbone", "mlp", "--no-progress", "--no-report", "--out", str(run)]
    assert main([*train, "--epochs", "1"]) == 0
    assert main(["calibrate", str(run), "--max-drop", "0.05"]) == 0
    record = read_json(run / "calibration.json")
    assert record["weights_sha256"] == eenn.read_description(run / "best.safetensors")["sha256"]
    np.save(tmp_path / "x.npy", eenn.load_dataset("digits").test.x[0].numpy())
    predict = ["predict", str(run), str(tmp_path / "x.npy")]
    assert main(predict) == 0
    with pytest.warns(UserWarning, match="epochs: 1 -> 2"):
        assert main([*train, "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(predict) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json was calibrated on other weights" in err[0], err
    assert f"re-run `eenn calibrate {run}`" in err[0]
    # also when named with --calibration (re-run with --out to that file)
    write_json(record, tmp_path / "cal.json")
    assert main([*predict, "--calibration", str(tmp_path / "cal.json")]) == 1
    assert f"re-run `eenn calibrate {run} --out {tmp_path / 'cal.json'}`" in capsys.readouterr().err
    # and by eenn export, which would put the stale thresholds into the deployment
    assert main(["export", str(run / "best.safetensors"), "--out", str(tmp_path / "exp"),
                 "--calibration", str(tmp_path / "cal.json")]) == 1
    assert "was fitted on other weights" in capsys.readouterr().err and not (tmp_path / "exp").exists()
    del record["weights_sha256"]  # an older record: taken as it is
    write_json(record, run / "calibration.json")
    assert main(predict) == 0


def test_predict_says_what_is_wrong_with_a_damaged_policy_in_the_checkpoint(tmp_path, capsys):
    import numpy as np
    from safetensors.torch import save_file

    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8, exits="all")
    path = eenn.save(net, tmp_path / "m.safetensors", policy=eenn.policies.ExitPolicy("max_prob", 0.9))
    desc, tensors = eenn.checkpoint.read_checkpoint(path)
    desc["policy"]["rule"] = "nope"
    save_file(tensors, path, metadata={"eenn": json.dumps(desc)})
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), dtype=np.float32))
    assert main(["predict", str(path), str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and str(path) in err[0] and "no thresholds" not in err[0], err
