import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eenn
from eenn.objectives import EpochContext, HeadsOnly, Joint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "train_script.py"


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def small_net(exits=(2, 5), head="linear"):
    torch.manual_seed(0)
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=list(exits),
                               head=head, width=0.5)


def _run(args, **kw):
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src") + ":" + str(ROOT)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("objective", ["final", "joint"])
def test_objectives_train_on_digits(digits, objective):
    net = small_net()
    hist = eenn.fit(net, digits, objective, epochs=6, lr=0.05, batch_size=64, progress=False)
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    if objective == "joint":
        assert min(hist[-1]["val_acc"]) > 0.6  # every exit far above chance (0.1)
    else:
        assert hist[-1]["val_acc"][-1] > 0.9 and hist[-1]["train_exits"] == [2]


def test_heads_only_trains_exits_on_a_frozen_backbone(digits, tmp_path):
    # Exits deeper than in the other tests: a linear probe after the first blocks of a network
    # trained for its final exit alone is weak (about 45% here), which is SDN's point.
    base = small_net(exits=(4, 6))
    eenn.fit(base, digits, "final", epochs=5, lr=0.05, batch_size=64, progress=False)
    ckpt = eenn.save(base, tmp_path / "final.safetensors")
    net = small_net(exits=(4, 6))  # fresh exits; the backbone comes from the checkpoint
    hist = eenn.fit(net, digits, HeadsOnly(checkpoint=ckpt), epochs=6, lr=0.1, batch_size=64, progress=False)
    for k, v in base.backbone.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(v, net.backbone.state_dict()[k]), k
    assert hist[-1]["train_exits"] == [0, 1]
    assert min(hist[-1]["val_acc"]) > 0.6 and hist[-1]["val_acc"][-1] == pytest.approx(
        eenn.trainer.evaluate_exits(base, digits.val)["acc"][-1])


def test_heads_only_refuses_a_checkpoint_of_another_backbone(digits, tmp_path):
    other = eenn.create_network("resnet32", in_channels=1, num_classes=10, input_size=8, exits=[2])
    ckpt = eenn.save(other, tmp_path / "other.safetensors")
    with pytest.raises(eenn.CheckpointError, match="backbone in .* does not match.*unexpected"):
        eenn.Trainer(eenn.TrainConfig(epochs=1, progress=False)).fit(small_net(), digits, HeadsOnly(checkpoint=ckpt))


def test_trainer_fit_takes_net_data_objective_like_eenn_fit(digits):
    trainer = eenn.Trainer(eenn.TrainConfig(epochs=1, batch_size=64, progress=False))
    with pytest.raises(TypeError, match=r"\(net, data, objective\)"):
        trainer.fit(small_net(), "joint", digits)  # the old order
    hist = trainer.fit(objective="joint", data=digits, net=small_net())  # by keyword, in any order
    assert [h["epoch"] for h in hist] == [1]


def test_joint_from_a_trained_backbone_as_branchynet_trains(tmp_path):
    """BranchyNet's recipe: the main network first, then every exit jointly from it: ``joint``
    with ``checkpoint=`` loads the backbone's weights (the exits' heads stay as they are); a
    checkpoint of another backbone is refused."""
    main = small_net()
    with torch.no_grad():  # "trained": other weights than a fresh network's
        for p in main.parameters():
            p.add_(1.0)
    path = eenn.save(main, tmp_path / "main.safetensors")
    net = small_net()
    heads = {k: v.clone() for k, v in net.heads.state_dict().items()}
    assert not torch.equal(next(iter(net.backbone.parameters())), next(iter(main.backbone.parameters())))
    Joint(checkpoint=path).prepare(net)
    assert all(torch.equal(a, b) for a, b in zip(net.backbone.state_dict().values(), main.backbone.state_dict().values()))
    assert all(torch.equal(v, net.heads.state_dict()[k]) for k, v in heads.items())
    other = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=(8, 8), exits="all")
    with pytest.raises(eenn.checkpoint.CheckpointError, match="does not match this network's backbone"):
        Joint(checkpoint=path).prepare(other)
    assert eenn.create_objective("joint", checkpoint=str(path)).checkpoint == str(path)


def test_joint_weight_schemes():
    net = small_net()
    j = Joint("pabee")
    j.prepare(net)
    assert j.weights.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    s = Joint("sdn")
    s.prepare(net)
    frac = net.cost().fraction
    ctx = lambda e: EpochContext(e, 10, net, None, (0.0,), (1.0,), torch.device("cpu"), 0)  # noqa: E731
    # SDN's loop counts epochs from 1: tau_i(e) = min(C_i, 0.01 + e C_i / E) for e = 1..E
    s.begin_epoch(ctx(0))
    assert s.weights.tolist() == pytest.approx([0.01 + 0.1 * frac[0], 0.01 + 0.1 * frac[1], 1.0])
    s.begin_epoch(ctx(4))
    assert s.weights.tolist() == pytest.approx([min(frac[0], 0.01 + 0.5 * frac[0]), min(frac[1], 0.01 + 0.5 * frac[1]), 1.0])
    s.begin_epoch(ctx(9))  # the last epoch: C_i
    assert s.weights.tolist() == pytest.approx([frac[0], frac[1], 1.0])
    u = Joint([0.2, 0.3, 1.0])
    u.prepare(net)
    logits = torch.randn(3, 4, 10)
    y = torch.randint(0, 10, (4,))
    per = [torch.nn.functional.cross_entropy(logits[i], y) for i in range(3)]
    out = u(eenn.ExitOutputs(logits, None), y)
    assert out["loss"].item() == pytest.approx(0.2 * per[0].item() + 0.3 * per[1].item() + per[2].item(), rel=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: eenn.create_objective("jointt"), "unknown objective 'jointt'"),
    (lambda: Joint("growing"), "unknown weight scheme"),
    (lambda: Joint([1.0, 2.0]).prepare(small_net()), "got 2 weights for a network with 3 exits"),
    (lambda: eenn.create_objective("joint", wieghts="sdn"), "does not accept option"),
    (lambda: eenn.TrainConfig(optimizer="adam").validate(), "unknown optimizer"),
    (lambda: eenn.fit(small_net(), None, "joint", epochz=3), "unknown training option"),
])
def test_bad_settings_are_explained(make, message):
    with pytest.raises((ValueError, KeyError), match=message):
        make()


def test_options_early_stopping_and_outputs(digits, tmp_path):
    net = small_net()
    hist = eenn.fit(net, digits, "joint", epochs=30, lr=0.02, optimizer="adamw", schedule="onecycle",
                    label_smoothing=0.1, grad_clip=1.0, early_stopping=2, monitor="val_acc_mean",
                    out_dir=str(tmp_path), progress=True)
    assert len(hist) < 30  # stopped early
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, len(hist) + 1))
    assert {"lr", "train_loss", "train_exit_loss", "train_acc", "val_loss", "val_acc", "epoch_time"} <= set(lines[0])
    best = eenn.load(tmp_path / "best.safetensors")
    assert eenn.read_description(tmp_path / "best.safetensors")["extra"]["metrics"]["val_acc"]
    assert best.num_exits == 3


def test_step_schedule_and_sgd_lr(digits):
    obj = Joint()
    hist = eenn.fit(small_net(), digits, obj, epochs=3, lr=0.1, schedule="step", step_epochs=1, gamma=0.5,
                    label_smoothing=0.05, progress=False)
    assert obj.label_smoothing == 0.05
    # the rate is logged after the epoch's last step
    assert [h["lr"] for h in hist] == pytest.approx([0.05, 0.025, 0.0125])


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_resuming_with_more_epochs_follows_the_longer_schedule(digits, tmp_path, schedule):
    """Re-running a finished run with more epochs goes on under the schedule of the new length, from
    where the epochs done put it: as a run started with that length would have (a one-cycle
    schedule saved for fewer batches used to raise at its end; a cosine one to climb back up)."""
    kw = dict(lr=0.05, batch_size=64, schedule=schedule, out_dir=tmp_path / "run", progress=False)
    eenn.fit(small_net(), digits, "joint", epochs=1, **kw)
    with pytest.warns(UserWarning, match="epochs: 1 -> 3.*schedule is rebuilt for the new epochs"):
        resumed = eenn.fit(small_net(), digits, "joint", epochs=3, **kw)
    fresh = eenn.fit(small_net(), digits, "joint", epochs=3, **{**kw, "out_dir": None})
    assert [h["epoch"] for h in resumed] == [2, 3]
    assert [h["lr"] for h in resumed] == pytest.approx([h["lr"] for h in fresh[1:]])
    assert resumed[-1]["lr"] < 1e-3  # annealed to the end of the longer schedule, not back up


def test_resume_after_kill_is_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run([str(SCRIPT), str(full), "--epochs", "3"]).returncode == 0
    r = _run([str(SCRIPT), str(killed), "--epochs", "3", "--kill-at", "1", "3"])
    assert r.returncode == -9, r.stderr  # SIGKILL in the middle of the second epoch
    assert eenn.read_description(killed / "last.safetensors")["extra"]["epoch"] == 1
    r = _run([str(SCRIPT), str(killed), "--epochs", "3"])
    assert r.returncode == 0, r.stderr
    a = eenn.load(full / "last.safetensors").state_dict()
    b = eenn.load(killed / "last.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(l)["epoch"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def _torchrun(nproc, out, *args):
    return _run(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", str(SCRIPT), str(out),
                 *args])


def _why(r):
    """A failed run's output: the first error is near the top, torchrun's summary at the end."""
    err = r.stderr if len(r.stderr) < 6000 else r.stderr[:3000] + "\n[...]\n" + r.stderr[-3000:]
    return f"exit code {r.returncode}\n{r.stdout[-1000:]}\n{err}"


def _lines(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def _single_process_eval(path, batch_size):
    """What one process measures on the saved file (one thread, like each rank of the run)."""
    net = eenn.load(path)
    data = eenn.load_dataset("digits", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return eenn.trainer.evaluate_exits(net, data.val, batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("nproc, epochs", [(2, 6), (3, 3)])
def test_ddp_validation_is_the_checkpoints_own(tmp_path, nproc, epochs):
    # Small validation batches, so that every rank scores some of them: with one rank scoring
    # everything, its own BatchNorm statistics would be the saved ones and nothing would be tested.
    out = tmp_path / "ddp"
    r = _torchrun(nproc, out, "--epochs", str(epochs), "--lr", "0.2", "--head", "branching",
                  "--eval-batch-size", "32", "--keep-epochs")
    assert r.returncode == 0, _why(r)
    lines = _lines(out / "metrics.jsonl")
    assert [l["epoch"] for l in lines] == list(range(1, epochs + 1))  # rank 0 alone wrote the log
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    if nproc == 2:
        assert lines[-1]["val_acc"][-1] > 0.85
    for line in lines:  # every epoch's reduced figures are its checkpoint's, exactly
        mine = _single_process_eval(out / f"epoch{line['epoch']}.safetensors", 32)
        assert mine["acc"] == line["val_acc"] and mine["loss"] == line["val_loss"], line["epoch"]
    best = eenn.read_description(out / "best.safetensors")["extra"]["metrics"]
    assert _single_process_eval(out / "best.safetensors", 32)["acc"] == best["val_acc"]
    # the BatchNorm statistics were made one: rank 0 alone would not give the same buffers
    net = eenn.load(out / f"epoch{epochs}.safetensors")
    assert any(b.is_floating_point() for b in net.buffers())


def test_ddp_resume_restores_each_ranks_rng(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ("--epochs", "3", "--record-rng")
    r = _torchrun(2, full, *args)
    assert r.returncode == 0, _why(r)
    r = _torchrun(2, killed, *args, "--kill-at", "1", "3")  # every rank SIGKILLs itself mid epoch 2
    assert r.returncode != 0
    assert eenn.read_description(killed / "last.safetensors")["extra"]["epoch"] == 1
    r = _torchrun(2, killed, *args)
    assert r.returncode == 0, _why(r)
    for rank in (0, 1):
        a = {l["epoch"]: l["draw"] for l in _lines(full / f"rng-{rank}.jsonl")}
        b = {l["epoch"]: l["draw"] for l in _lines(killed / f"rng-{rank}.jsonl")}  # the resumed epoch's last
        assert a == b and sorted(a) == [1, 2, 3], rank
    assert _lines(full / "rng-0.jsonl")[1]["draw"] != _lines(full / "rng-1.jsonl")[1]["draw"]  # streams differ
    a = eenn.load(full / "last.safetensors").state_dict()
    b = eenn.load(killed / "last.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_rank_that_stops_answering_ends_the_job_with_a_clear_error(tmp_path):
    r = _torchrun(2, tmp_path / "hang", "--epochs", "2", "--hang-rank", "1", "--dist-timeout", "3")
    assert r.returncode != 0
    assert "rank 0 of 2 gave up waiting on the other ranks during training step 1 of epoch 1" in r.stderr, \
        r.stderr[-3000:]
