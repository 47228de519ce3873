import json
import subprocess
import sys
from pathlib import Path

import pytest

import eenn
from eenn.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_train_command_writes_a_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    def args(epochs):
        return ["train", "--dataset", "digits", "--backbone", "lenet5", "--exits", "1,2", "--epochs", str(epochs),
                "--lr", "0.05", "-O", "weights=pabee", "-B", "width=2", "--out", str(out), "--no-progress"]

    assert main(args(2)) == 0
    assert "validation accuracy per exit" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    net = eenn.load(out / "best.safetensors")
    assert net.num_exits == 3 and net.config["source"]["options"] == {"width": 2}
    # re-running with more epochs continues from last.safetensors
    with pytest.warns(UserWarning, match="changed settings.*epochs: 2 -> 3"):
        assert main(args(3)) == 0
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_bad_command_lines_give_one_clear_line(capsys):
    assert main(["train", "--objective", "nope", "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown objective 'nope'" in err[0]
    assert main(["train", "-O", "weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KEY=VALUE" in err[0]
    assert main(["train", "--optimizer", "adam"]) == 1
    assert "unknown optimizer" in capsys.readouterr().err


def test_list_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "eenn", "list"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    assert "resnet110" in r.stdout and "heads_only" in r.stdout and "fashion_mnist" in r.stdout
