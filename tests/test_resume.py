"""Resuming a run: what a finished, interrupted, re-configured or damaged run directory does."""
import json
import warnings

import pytest
import torch

import eenn
from eenn.callbacks import monitored_value
from eenn.cli import main

from _helpers import MLP_TRAIN as B, dir_files as _files, mlp_net as _net


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def _state(path):
    return eenn.checkpoint.load_state(path)[1]


def test_a_run_that_stopped_early_is_finished(tmp_path, capsys):
    """Re-running it trains nothing and says so; the done line counts the run's epochs, not this
    invocation's; compare takes it as trained."""
    from eenn.compare import _finished
    from eenn.config import load_config

    out = tmp_path / "es"
    args = [*B, "--epochs", "30", "--early-stopping", "1", "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    epochs = len((out / "metrics.jsonl").read_text().splitlines())
    assert epochs < 30 and f"done: {epochs} epochs (stopped early); validation accuracy" in first
    before = _files(out)
    with pytest.warns(UserWarning, match=f"nothing to train: .*last.safetensors records a run that stopped early "
                                         f"after epoch {epochs}") as caught:
        assert main(args) == 0
    assert f"done: {epochs} epochs (0 trained now, stopped early)" in capsys.readouterr().out
    assert {k: v for k, v in _files(out).items() if k not in ("config.yaml", "run.json")} == \
        {k: v for k, v in before.items() if k not in ("config.yaml", "run.json")}
    assert all(w.filename == __file__ for w in caught)  # the caller outside eenn, not trainer.py
    assert _finished(out, load_config(out / "config.yaml")) == "trained"  # compare reuses it (reports it again)


def test_the_done_line_counts_the_runs_epochs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*B, "--epochs", "1", "--out", str(out)]) == 0
    assert "done: 1 epochs; validation" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="epochs: 1 -> 3"):
        assert main([*B, "--epochs", "3", "--out", str(out)]) == 0
    assert "done: 3 epochs (2 trained now); validation" in capsys.readouterr().out


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_kill_between_the_two_checkpoints_leaves_them_consistent(digits, tmp_path, monkeypatch, kill_at):
    """Whatever save a kill interrupts, best.safetensors is at least as good as the best that
    last.safetensors' state compares new epochs with (else a better epoch is lost for good)."""
    import eenn.checkpoint as ck

    save, calls = ck.save, []

    def killed_save(*a, **kw):
        calls.append(a[1])
        if len(calls) == kill_at:
            raise _Killed
        return save(*a, **kw)

    monkeypatch.setattr(ck, "save", killed_save)
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        eenn.fit(_net(), digits, "joint", epochs=3, lr=0.05, monitor="val_loss", out_dir=out, progress=False)
    if (out / "last.safetensors").exists():
        recorded = _state(out / "last.safetensors")["callbacks"]["Checkpointer"]["best"]
        best = eenn.read_description(out / "best.safetensors")["extra"]["metrics"]
        assert monitored_value(best, "val_loss") >= recorded


def test_another_monitor_on_resume_compares_anew(digits, tmp_path):
    kw = dict(lr=0.05, out_dir=tmp_path / "run", progress=False, early_stopping=5)
    eenn.fit(_net(), digits, "joint", epochs=2, **kw)
    assert _state(tmp_path / "run" / "last.safetensors")["callbacks"]["Checkpointer"]["monitor"] == "val_acc_final"
    with pytest.warns(UserWarning, match="monitor: 'val_acc_final' -> 'val_loss'.*best.safetensors and early "
                                         "stopping compare anew under val_loss"):
        eenn.fit(_net(), digits, "joint", epochs=3, monitor="val_loss", **kw)
    # the first epoch under val_loss is the best so far by it (accuracies are not losses)
    assert eenn.read_description(tmp_path / "run" / "best.safetensors")["extra"]["epoch"] == 3
    callbacks = _state(tmp_path / "run" / "last.safetensors")["callbacks"]
    assert callbacks["EarlyStopping"] == {"best": pytest.approx(callbacks["Checkpointer"]["best"]), "bad_epochs": 0,
                                          "monitor": "val_loss"}


@pytest.mark.parametrize("flags, changed", [
    (["--seed", "1"], "train.seed: 0 -> 1"),
    (["--optimizer", "adamw"], "train.optimizer: 'sgd' -> 'adamw'"),
])
def test_a_resume_with_another_seed_or_optimizer_is_refused(tmp_path, capsys, flags, changed):
    """The seed picks the validation split; the optimiser's saved state fits no other one."""
    out = tmp_path / "r"
    assert main([*B, "--epochs", "1", "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main([*B, "--epochs", "2", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with other settings" in err[0] and changed in err[0], err
    assert _files(out) == before


def test_the_trainer_refuses_another_optimizer_before_anything_is_written(digits, tmp_path):
    out = tmp_path / "r"
    eenn.fit(_net(), digits, "joint", epochs=1, out_dir=out, progress=False)
    before = _files(out)
    with pytest.raises(ValueError, match="was trained with optimizer 'sgd', whose state cannot go on in 'adamw'"):
        eenn.fit(_net(), digits, "joint", epochs=2, optimizer="adamw", out_dir=out, progress=False)
    assert _files(out) == before


def test_a_momentum_onecycle_does_not_use_is_said_once(digits):
    with pytest.warns(UserWarning, match=r"momentum 0\.5 is not used: the onecycle schedule cycles the momentum "
                                         r"between 0\.85 and 0\.95") as caught:
        eenn.fit(_net(), digits, "joint", epochs=1, schedule="onecycle", momentum=0.5, progress=False)
    said = [w for w in caught if "momentum" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default momentum: nothing to say
        eenn.fit(_net(), digits, "joint", epochs=1, schedule="onecycle", progress=False)


def test_the_resume_warning_names_the_callers_line(digits, tmp_path):
    kw = dict(out_dir=tmp_path / "r", progress=False)
    eenn.fit(_net(), digits, "joint", epochs=1, **kw)
    with pytest.warns(UserWarning, match="changed settings") as caught:
        eenn.fit(_net(), digits, "joint", epochs=2, **kw)
    assert [w.filename for w in caught if "changed settings" in str(w.message)] == [__file__]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "base"
    assert main([*B, "--epochs", "2", "--out", str(out)]) == 0
    return out


def _momentum(state):
    return state["optimizer"]["state"]["__items__"][0][1]["momentum_buffer"]


def _tamper(state, tensors, how):
    if how == "buffer shape":
        tensors[_momentum(state)["__tensor__"]] = torch.zeros(3)
    else:
        field, value = how
        node = state
        *parents, last = field.split(".")
        for key in parents:
            node = node[key]
        node[last] = value


@pytest.mark.parametrize("how, message", [
    (("epoch", 1e12), r"the training state's epoch must be the number of epochs done, from 0 to 2, got 1000000000000\.0"),
    (("epoch", 10**12), r"the training state's epoch must be the number of epochs done, from 0 to 2"),
    (("epoch", -3), r"the training state's epoch must be .* got -3"),
    (("epoch", "abc"), r"the training state's epoch must be .* got 'abc'"),
    (("rng", {}), r"the training state's rng cannot be restored \(KeyError: torch\)"),
    (("rng", []), r"the training state's rng must be a mapping"),
    (("callbacks.Checkpointer.best", "abc"), r"the training state's callbacks\.Checkpointer cannot be restored .*best"),
    (("scheduler", "abc"), r"the training state's scheduler must be a schedule state"),
    (("optimizer.param_groups", []), r"the training state's optimizer cannot be restored"),
    ("buffer shape", r"the training state's optimizer cannot be restored .*momentum_buffer of shape \(3,\)"),
])
def test_a_damaged_training_state_is_refused_before_anything_is_written(trained, tmp_path, capsys, how, message):
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    desc, tensors = eenn.checkpoint.read_checkpoint(out / "last.safetensors")
    _tamper(desc["state"], tensors, how)
    desc["sha256"] = eenn.checkpoint._digest(tensors)  # a consistent file, its state edited
    save_file(tensors, out / "last.safetensors", metadata={"eenn": json.dumps(desc)})
    before = _files(out)
    capsys.readouterr()
    assert main([*B, "--epochs", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eenn: error: {out / 'last.safetensors'}: "), err
    assert __import__("re").search(message, err[0]), err
    assert _files(out) == before


def test_a_resume_applies_the_new_weight_decay_and_momentum(digits, tmp_path):
    """The saved optimiser state holds the settings it was made with; a resume with others (said
    in the warning) trains with the new ones."""
    kw = dict(out_dir=tmp_path / "r", progress=False, optimizer="sgd", schedule="cosine")
    eenn.fit(_net(), digits, "joint", epochs=1, weight_decay=5e-4, momentum=0.9, **kw)
    seen = []

    class Spy(eenn.callbacks.Callback):
        def on_epoch_end(self, trainer, metrics):
            seen.append({(g["weight_decay"], g["momentum"]) for g in trainer.optimizer.param_groups})

    with pytest.warns(UserWarning, match="weight_decay: 0.0005 -> 0.01.*with the new weight decay and momentum"):
        eenn.fit(_net(), digits, "joint", epochs=2, weight_decay=0.01, momentum=0.5, callbacks=[Spy()], **kw)
    assert seen == [{(0.01, 0.5)}]
