import json

import pytest
import torch
from torch import nn

import eenn
from eenn.callbacks import Callback
from tests.test_trace import ResCat


def _trained_like(net):
    """Perturb weights and BN statistics so that a load that silently used defaults would differ."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.eval()


def test_save_load_round_trip(tmp_path):
    net = _trained_like(
        eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits="fine:2",
                            head="eenets", head_options={"batch_norm": True}, width=0.5)
    )
    path = eenn.save(net, tmp_path / "m.safetensors", extra={"epoch": 3})
    loaded = eenn.load(path).eval()
    x = torch.randn(6, 1, 8, 8)
    a, b = net(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.gates, b.gates)
    assert loaded.exit_stages == net.exit_stages and loaded.head_names == ["eenets", "eenets"]
    desc = eenn.read_description(path)
    assert desc["extra"] == {"epoch": 3} and desc["eenn_version"] == eenn.__version__
    assert desc["network"]["source"]["name"] == "resnet20"
    assert not list(tmp_path.glob("*.tmp"))


def test_load_returns_eval_mode_ready_for_the_engine_and_fit_trains_it(tmp_path):
    """A loaded network is for inference first: eval mode, which the engine requires (it came
    back in training mode, and the engine refused it); eenn.fit switches it to training itself."""
    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8, exits="all").train()
    path = eenn.save(net, tmp_path / "m.safetensors")
    loaded = eenn.load(path)
    assert not any(m.training for m in loaded.modules())
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert eenn.DynamicEngine(loaded, "max_prob", 0.5)(torch.randn(4, 1, 8, 8)).prediction.shape == (4,)
    data = eenn.from_tensors(train=(x.repeat(8, 1, 1, 1), torch.arange(32) % 10), val=(x, torch.arange(4)))
    seen = []

    class Mode(Callback):
        def on_train_batch_end(self, trainer, batch, loss, exit_acc):
            seen.append(loaded.training)

    eenn.fit(loaded, data, "joint", [Mode()], epochs=1, batch_size=16, progress=False)
    assert seen and all(seen)


def test_traced_model_round_trip_needs_the_model(tmp_path):
    net = _trained_like(eenn.attach_exits(ResCat(), at=["relu", "cat"], input_shape=(3, 8, 8)))
    path = eenn.save(net, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="pass model=<a fresh instance"):
        eenn.load(path)
    loaded = eenn.load(path, model=ResCat()).eval()
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(net(x).logits, loaded(x).logits)
    with pytest.raises(eenn.CheckpointError, match="does not fit.*wrong shape"):
        eenn.load(path, model=_Wider())


class _Wider(ResCat):
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(8, 8, 3, padding=1)  # same graph, different weight shape


def test_truncated_file_is_refused(tmp_path):
    net = eenn.create_network("lenet5", in_channels=1, num_classes=10, input_size=8, exits="all")
    path = eenn.save(net, tmp_path / "m.safetensors")
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(eenn.CheckpointError, match="truncated or corrupted"):
            eenn.load(bad)


def test_corrupted_weights_fail_the_checksum(tmp_path):
    net = eenn.create_network("lenet5", in_channels=1, num_classes=10, input_size=8, exits="all")
    path = eenn.save(net, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(eenn.CheckpointError, match="checksum"):
        eenn.load(path)


def test_foreign_and_missing_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(eenn.CheckpointError, match="not an eenn checkpoint"):
        eenn.load(tmp_path / "plain.safetensors")
    with pytest.raises(eenn.CheckpointError, match="no checkpoint at"):
        eenn.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a checkpoint at all")
    with pytest.raises(eenn.CheckpointError, match="truncated or corrupted"):
        eenn.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "future.safetensors",
              metadata={"eenn": json.dumps({"format": "eenn.multi_exit_network", "format_version": 99, "eenn_version": "9"})})
    with pytest.raises(eenn.CheckpointError, match="newer eenn"):
        eenn.load(tmp_path / "future.safetensors")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8, exits="all")
    path = eenn.save(net, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        eenn.save(net, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_shared_weights_are_saved_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(6, 6)
            self.l2 = self.l1  # the same module called twice
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.relu(self.l2(torch.relu(self.l1(x)))))

    net = eenn.attach_exits(Tied(), at=["relu"], input_shape=(6,))
    p = eenn.save(net, tmp_path / "tied.safetensors")
    assert eenn.read_description(p)["aliases"]
    loaded = eenn.load(p, model=Tied())
    x = torch.randn(2, 6)
    assert torch.equal(net(x).logits, loaded(x).logits)


def test_training_state_round_trip(tmp_path):
    import random

    import numpy as np

    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8, exits="all")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    net(torch.randn(4, 1, 8, 8)).logits.sum().backward()
    opt.step(), sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate(), "numpy_rng": np.random.get_state(), "epoch": 3}
    path = eenn.save(net, tmp_path / "last.safetensors", extra={"epoch": 3}, state=state)
    extra, back = eenn.checkpoint.load_state(path)
    assert extra == {"epoch": 3} and back["epoch"] == 3
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert back["scheduler"] == sched.state_dict()
    assert torch.equal(back["torch_rng"], torch.get_rng_state())
    random.setstate(back["python_rng"])
    np.random.set_state(back["numpy_rng"])
    # the network itself still loads alone, ignoring the training state
    eenn.load(path)


def _edited(tmp_path, edit):
    """A checkpoint whose stored description ``edit(desc)`` changed, as a hand edit would."""
    from safetensors.torch import save_file

    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8)
    path = eenn.save(net, tmp_path / "m.safetensors")
    desc, tensors = eenn.checkpoint.read_checkpoint(path)
    edit(desc)
    save_file(tensors, tmp_path / "edited.safetensors", metadata={"eenn": json.dumps(desc)})
    return tmp_path / "edited.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["network"].update(num_classes="ten"), r"network\.num_classes must be an int >= 2, got 'ten'"),
    (lambda d: d["network"]["source"].update(num_classes="ten"), r"network\.source\.num_classes must be an int >= 2"),
    (lambda d: d.pop("network"), r"the description has no 'network' mapping"),
    (lambda d: d["network"].pop("exits"), r"the network description lacks the field 'exits'"),
    (lambda d: d["network"]["source"]["options"].update(width="abc"), r"option 'width' must be a number, got 'abc'"),
    # the real reason, not "lacks the field"
    (lambda d: d["network"].update(head=["nope", "linear"]), r"does not rebuild: unknown exit head 'nope'"),
    (lambda d: d["network"]["source"].update(name="nope"), r"does not rebuild: unknown backbone 'nope'"),
    # sizes that are not the stored weights' are refused before anything is allocated
    (lambda d: (d["network"].update(num_classes=10**12), d["network"]["source"].update(num_classes=10**12)),
     r"the network description does not match the stored weights \(wrong shape: .*weight"),
    (lambda d: d["network"]["source"]["options"].update(width=1e9), r"the network description does not rebuild"),
    (lambda d: d["network"]["source"]["options"].update(hidden=[10**7, 10**7, 10**7]),
     r"the network description does not match the stored weights"),
    (lambda d: d["network"].update(input_shape=[1, 10**6, 10**6]), r"network\.input_shape must be a list of ints >= 1, at most"),
    (lambda d: d.update(format_version="abc"), r"format_version must be a whole number, got 'abc'"),
])
def test_hand_edited_description_names_file_and_field(tmp_path, edit, message):
    with pytest.raises(eenn.CheckpointError, match=r"edited\.safetensors: .*" + message) as err:
        eenn.load(_edited(tmp_path, edit))
    assert "\n" not in str(err.value)


def test_damaged_training_state_references_are_refused(tmp_path):
    def edit(d):
        d["state"] = {"optimizer": {"__tensor__": "_state/root/nowhere"}}

    with pytest.raises(eenn.CheckpointError, match=r"edited\.safetensors: the training state refers to the tensor "
                                                   r"'_state/root/nowhere'"):
        eenn.checkpoint.load_state(_edited(tmp_path, edit))


def test_saves_clear_what_killed_saves_left_and_follow_the_umask(tmp_path):
    """A save killed mid-write leaves a hidden full-size temporary: the next save of that file
    removes it (and only eenn's temporaries of that name); checkpoints get the umask's
    permissions, like the run's other files."""
    import os

    net = eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8)
    stale = tmp_path / ".m.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"x" * 1000)
    others = [tmp_path / ".other.safetensors.k1ll3d.tmp", tmp_path / "m.safetensors.tmp", tmp_path / "notes.txt"]
    for p in others:
        p.write_text("keep")
    old = os.umask(0o022)
    try:
        path = eenn.save(net, tmp_path / "m.safetensors")
        (tmp_path / "beside.txt").write_text("a run file")
    finally:
        os.umask(old)
    assert not stale.exists() and all(p.exists() for p in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", "beside.txt", *(p.name for p in others)])
    assert path.stat().st_mode & 0o777 == (tmp_path / "beside.txt").stat().st_mode & 0o777 == 0o644
