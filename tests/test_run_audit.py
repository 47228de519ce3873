"""Run directories as a new user meets them: a resume held to the data, split and objective its
checkpoint records (with or without config.yaml), a re-run that trains nothing keeping the run's
record, run.json's history and git state, refused runs leaving no directory behind, and exits
given through --set as through --exits."""
import json
import subprocess

import pytest
import torch

import eenn
from eenn.cli import main

from _helpers import MLP_TRAIN as B, dir_files as _files, mlp_compare_yaml as _compare_yaml, mlp_net as _net


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


# ------------------------------------------------------------------ A2: the resume check without config.yaml
@pytest.fixture(scope="module")
def py_run(tmp_path_factory, digits):
    """A directory as the README's eenn.fit(..., out_dir=) writes it: no config.yaml."""
    out = tmp_path_factory.mktemp("py") / "run"
    eenn.fit(_net(), digits, "joint", epochs=1, out_dir=out, progress=False)
    assert not (out / "config.yaml").exists()
    return out


@pytest.mark.parametrize("flags, named", [
    (["--objective", "distill"], ["objective 'joint' -> 'distill'"]),
    (["--seed", "5", "--val-fraction", "0.3"], ["data.seed: 0 -> 5", "data.val_fraction: 0.1 -> 0.3"]),
    (["--limit", "500"], ["data.limit: None -> 500"]),
    (["-O", "weights=pabee"], ["objective option weights: 'uniform' -> 'pabee'"]),
])
def test_the_cli_refuses_to_resume_a_python_run_on_other_data_or_objective(py_run, tmp_path, capsys, flags, named):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(py_run, out)
    before = _files(out)
    capsys.readouterr()
    assert main([*B, "--exits", "all", "--epochs", "2", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with other data or another objective" in err[0], err
    assert all(n in err[0] for n in named) and "choose another out_dir" in err[0], err
    assert _files(out) == before


def test_the_python_api_refuses_another_split_or_objective_before_anything_is_written(py_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(py_run, out)
    before = _files(out)
    other = eenn.load_dataset("digits", seed=5, val_fraction=0.3)
    with pytest.raises(ValueError, match=r"data\.seed: 0 -> 5; data\.val_fraction: 0\.1 -> 0\.3"):
        eenn.fit(_net(), other, "joint", epochs=2, out_dir=out, progress=False)
    with pytest.raises(ValueError, match="objective 'joint' -> 'distill'"):
        eenn.fit(_net(), eenn.load_dataset("digits", seed=0), "distill", epochs=2, out_dir=out, progress=False)
    assert _files(out) == before
    # a default given explicitly is the same objective: it resumes
    same = eenn.create_objective("joint", weights="uniform")
    with pytest.warns(UserWarning, match="epochs: 1 -> 2"):
        eenn.fit(_net(), eenn.load_dataset("digits", seed=0), same, epochs=2, out_dir=out, progress=False)


def test_a_cli_run_without_its_config_yaml_is_still_held_to_its_objective(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*B, "--epochs", "1", "--out", str(out)]) == 0
    (out / "config.yaml").unlink()
    before = _files(out)
    capsys.readouterr()
    assert main([*B, "--epochs", "2", "--out", str(out), "--objective", "distill"]) == 2
    assert "objective 'joint' -> 'distill'" in capsys.readouterr().err
    assert _files(out) == before


# ------------------------------------------------------------------ A8: the record of a run
def test_a_rerun_that_trains_nothing_keeps_the_record_and_says_what_did_not_apply(tmp_path, capsys):
    out = tmp_path / "a"
    assert main([*B, "--epochs", "1", "--out", str(out)]) == 0
    record = {k: v for k, v in _files(out).items() if k in ("config.yaml", "run.json")}
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"is finished .*label_smoothing: 0\.0 -> 0\.1.* do not apply to its "
                                         r"weights, and the run's record keeps its own"):
        assert main([*B, "--epochs", "1", "--out", str(out), "--label-smoothing", "0.1"]) == 0
    assert "done: 1 epochs (0 trained now)" in capsys.readouterr().out
    assert {k: v for k, v in _files(out).items() if k in ("config.yaml", "run.json")} == record


def test_a_rerun_that_trains_nothing_records_only_the_eval_settings_of_its_new_report(tmp_path):
    out = tmp_path / "a"
    cmd = [*B[:-1], "--deployments", "eager", "--batch-sizes", "", "--curve-points", "3", "--epochs", "1",
           "--out", str(out)]
    assert main(cmd) == 0
    run_json = (out / "run.json").read_bytes()
    with pytest.warns(UserWarning, match=r"lr: 0\.05 -> 0\.5"):
        assert main([*cmd, "--max-drop", "0.05", "--lr", "0.5"]) == 0
    config = eenn.config.load_config(out / "config.yaml")
    assert config.eval.goal == {"max_drop": 0.05} and config.train.lr == 0.05
    assert json.loads((out / "report.json").read_text())["policy"]["goal"] == {"max_drop": 0.05}
    assert (out / "run.json").read_bytes() == run_json


def test_a_resume_that_trains_keeps_the_first_command_and_appends_its_own(tmp_path):
    out = tmp_path / "a"
    assert main([*B, "--epochs", "1", "--out", str(out)]) == 0
    first = json.loads((out / "run.json").read_text())
    with pytest.warns(UserWarning, match="epochs: 1 -> 2"):
        assert main([*B, "--epochs", "2", "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == first["command"] and "--epochs 1" in info["command"]
    [resumed] = info["resumed"]
    assert resumed["from_epoch"] == 1 and "--epochs 2" in resumed["command"]
    assert set(resumed) >= {"date", "git_commit", "git_dirty", "argv"}
    assert eenn.config.load_config(out / "config.yaml").train.epochs == 2  # the settings it went on under


def test_run_json_says_whether_the_checkout_was_dirty(tmp_path):
    from eenn.run import _git_state

    assert _git_state(tmp_path) == (None, None)  # not a checkout: said as unknown, nothing fails
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    (tmp_path / "untracked.txt").write_text("run outputs do not make it dirty\n")
    commit, dirty = _git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "f.py").write_text("a = 2\n")
    assert _git_state(tmp_path) == (commit, True)
    assert "git_dirty" in eenn.run.run_info([])


# ------------------------------------------------------------------ D: refused runs leave no directory
@pytest.mark.parametrize("flags", [
    ["--objective", "branching"],                                   # no gated heads
    ["--objective", "heads_only", "-O", "checkpoint={missing}"],
    ["--objective", "heads_only", "-O", "checkpoint={corrupt}"],
    ["--objective", "joint", "-O", "checkpoint={corrupt}"],
])
def test_a_refused_run_leaves_no_run_directory(tmp_path, capsys, flags):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    flags = [f.format(missing=tmp_path / "missing.safetensors", corrupt=corrupt) for f in flags]
    out = tmp_path / "runs" / "r"
    assert main([*B, "--epochs", "1", "--out", str(out), *flags]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ C6: exits through --set
@pytest.mark.parametrize("value, want", [("1,3", [1, 3]), ("block2.0", ["block2.0"]), ("3", [3]),
                                         ("[1, 3]", [1, 3]), ("linear:3", "linear:3"), ("none", "none")])
def test_exits_set_in_the_config_read_as_the_flag_reads_them(value, want):
    from eenn.config import load_config

    assert load_config(None, [f"model.exits={value}"]).model.exits == want


@pytest.mark.parametrize("value, message", [
    ("foo:2", "distribution of linear, golden, pareto, fine"),
    ("linear:x", "<distribution>:<number of exits>"),
    ("1,1", "names a stage twice"),
    ("1,,3", "names no stage"),
])
def test_a_bad_exits_value_is_a_config_error(tmp_path, capsys, value, message):
    assert main([*B, "--epochs", "1", "--out", str(tmp_path / "r"), "--set", f"model.exits={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.exits" in err[0] and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_exits_by_stage_name_through_set_build_and_train(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--dataset", "digits", "--backbone", "resnet20", "-B", "width=0.25", "--no-progress",
                 "--no-report", "--epochs", "1", "--limit", "200", "--out", str(out),
                 "--set", "model.exits=block2.0"]) == 0
    net = eenn.load(out / "last.safetensors")
    assert net.num_exits == 2


# ------------------------------------------------------------------ C4: compare --methods keeps the others
def test_compare_methods_keeps_the_other_methods_under_new_eval_settings(tmp_path, capsys):
    cfg = _compare_yaml(tmp_path, "  Baseline: {objective: {name: final}}\n  B-NET: {objective: {name: joint}}\n"
                        "  Later: {objective: {name: distill}}\n", eval=", deployments: eager")
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--methods", "Baseline,B-NET"]) == 0
    metrics = (out / "Baseline" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--methods", "B-NET",
                 "--set", "eval.goal={max_drop: 0.05}"]) == 0
    said = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    # Baseline: finished, evaluated again under the new goal (not trained again); Later: never run, said so
    assert "| data set | Baseline | B-NET |" in md
    assert "Baseline: not in --methods; evaluated again under the new eval settings (no training)" in said
    assert (out / "Baseline" / "metrics.jsonl").read_text() == metrics
    assert json.loads((out / "Baseline" / "report.json").read_text())["policy"]["goal"] == {"max_drop": 0.05}
    assert "Left out of the tables" in md and "- Later: not trained yet" in md
    assert "Later: left out of the tables (not trained yet" in said
    assert json.loads((out / "compare.json").read_text())["left_out"].keys() == {"Later"}


def test_compare_tables_name_the_split_they_report_on(tmp_path):
    cfg = _compare_yaml(tmp_path, "  B-NET: {objective: {name: joint}}\n", eval=", deployments: eager, split: val")
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| Method | Val. acc. |" in md and "Table 1: val accuracy" in md and ", val split." in md
    assert "Test acc." not in md and "test split" not in md


def test_compare_reports_again_when_the_weights_changed_since_the_report(tmp_path, capsys):
    """A method's report.json names the weights it was made on; where the run's checkpoint holds
    other weights (trained again by hand, copied over), compare evaluates it again (no training)
    rather than tabling the stale report."""
    cfg = _compare_yaml(tmp_path, "  B-NET: {objective: {name: joint}}\n", eval=", deployments: eager")
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    run = out / "B-NET"
    first = json.loads((run / "report.json").read_text())
    metrics = (run / "metrics.jsonl").read_text()
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0  # unchanged: the report is reused
    assert json.loads((run / "report.json").read_text()) == first
    other = eenn.load(run / "best.safetensors")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    eenn.save(other, run / "best.safetensors")
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["weights_sha256"] == eenn.checkpoint.read_description(run / "best.safetensors")["sha256"]
    assert again["weights_sha256"] != first["weights_sha256"]
    assert (run / "metrics.jsonl").read_text() == metrics  # evaluated again, not trained
