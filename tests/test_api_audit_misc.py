"""Defects a Python-API audit found: AEP pruning of a token-id network and out-of-range exit
indices, BatchNorm at batch size 1, class names that are not the network's, saving a policy
that does not fit, loading onto CUDA without CUDA, collect_outputs on all splits, and
attach_exits' input_shape and cuts at the model's output."""
import pytest
import torch
from torch import nn

import eenn
from eenn.checkpoint import read_description
from eenn.prune import EnsembleClassifier, aep_prune, measure_latency, prune_at
from eenn.trace import TraceError
from eenn.train_state import claim_input_spec


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.body(self.tok(ids)).mean(1))


def token_data():
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 50, (40, 6), generator=g), torch.randint(0, 3, (40,), generator=g)
    return eenn.from_tensors(train=(ids[:30], y[:30]), val=(ids[30:], y[30:]), num_classes=3)


def token_net(data):
    net = eenn.attach_exits(TokenNet(), at=["tok", "body"], input_shape=(6,), input_dtype=torch.long)
    claim_input_spec(net, data.info)  # as fit does
    return net.eval()


def mlp(num_classes=3):
    return eenn.create_network("mlp", in_channels=1, num_classes=num_classes, input_size=8, exits="all")


def pixels(n, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % classes


# ---------------------------------------------------------------- 1. AEP pruning

def test_aep_prune_times_a_token_id_network_on_ids():
    data = token_data()
    net = token_net(data)
    res = aep_prune(net, "uniform", data.val, latency_batch_size=4, latency_repeats=1)
    assert res.before.latency_ms > 0 and res.after.latency_ms > 0
    # without a batch given, a random one of the network's kind: ids in range, not floats
    assert measure_latency(EnsembleClassifier(net, [1.0, 1.0, 1.0]), net.input_shape, 2, repeats=1) > 0


@pytest.mark.parametrize("k", [3, 7, -4, 1.5, True, "1"])
def test_prune_at_refuses_an_exit_index_out_of_range(k):
    net = mlp()
    with pytest.raises(ValueError, match="k must be an exit index"):
        prune_at(net, [1.0] * net.num_exits, k)


def test_prune_at_counts_a_negative_index_from_the_end():
    net = mlp()
    assert prune_at(net, [1.0] * net.num_exits, -1).net.num_exits == net.num_exits
    assert prune_at(net, [1.0] * net.num_exits, -net.num_exits).net.num_exits == 1


@pytest.mark.parametrize("exits", [[3], [0, 7], [-4], [1.5], [True]])
def test_forward_refuses_an_exit_index_out_of_range(exits):
    """net(x, exits=[3]) on a 3-exit network ran exit 0 (the index wrapped); it is refused."""
    net = mlp().eval()
    with pytest.raises(ValueError, match=r"forward\(exits=...\) must be an exit index"):
        net(pixels(2)[0], exits=exits)


def test_forward_counts_a_negative_exit_from_the_end():
    net = mlp().eval()
    x = pixels(2)[0]
    with torch.no_grad():
        full = net(x).logits
        last = net(x, exits=[-1]).logits
        first_two = net(x, exits=[1, -3]).logits
    assert len(last) == 1 and torch.equal(last[0], full[-1])
    assert len(first_two) == 2 and torch.equal(first_two[0], full[0]) and torch.equal(first_two[1], full[1])


# ---------------------------------------------------------------- 2. BatchNorm and batches of one

def test_batch_size_1_with_batchnorm_is_refused_before_training():
    data = eenn.from_tensors(train=pixels(4), val=pixels(2, seed=1), num_classes=3)
    with pytest.raises(ValueError, match=r"batch_size=1 .*BatchNorm.*batch_size >= 2"):
        eenn.fit(mlp(), data, "joint", epochs=1, batch_size=1, progress=False)


def test_a_one_sample_training_split_with_batchnorm_is_refused():
    data = eenn.from_tensors(train=pixels(1), val=pixels(2, seed=1), num_classes=3)
    with pytest.raises(ValueError, match="training split holds 1 sample"):
        eenn.fit(mlp(), data, "joint", epochs=1, batch_size=4, progress=False)


def test_a_trailing_batch_of_one_is_dropped_with_batchnorm():
    data = eenn.from_tensors(train=pixels(3), val=pixels(2, seed=1), num_classes=3)
    hist = eenn.fit(mlp(), data, "joint", epochs=1, batch_size=2, progress=False)
    assert len(hist) == 1


# ---------------------------------------------------------------- 3. class names

def test_fewer_class_names_than_the_network_has_classes_are_refused():
    data = eenn.from_tensors(train=pixels(6), val=pixels(3, seed=1))  # labels 0..2: 3 names
    net = mlp(num_classes=10)
    with pytest.raises(ValueError, match="names 3 classes, the network has 10: give num_classes=10"):
        eenn.fit(net, data, "joint", epochs=1, batch_size=2, progress=False)
    assert net.input_spec is None
    data = eenn.from_tensors(train=pixels(6), val=pixels(3, seed=1), num_classes=10)
    claim_input_spec(net, data.info)
    assert net.input_spec.class_names == tuple(str(i) for i in range(10))


def test_data_of_more_classes_give_the_network_its_own_classes_names():
    """Labels that fit (checked apart): the network names its own classes, label i class i."""
    data = eenn.from_tensors(train=pixels(6), val=pixels(3, seed=1), class_names=[f"c{i}" for i in range(5)])
    net = mlp()
    claim_input_spec(net, data.info)
    assert net.input_spec.class_names == ("c0", "c1", "c2")


# ---------------------------------------------------------------- 4. save(policy=)

@pytest.mark.parametrize("policy, error, match", [
    (eenn.ExitPolicy("max_prob", [0.5]), ValueError, r"does not fit this network \(3 exits\)"),
    (eenn.ExitPolicy("max_prob"), ValueError, "no thresholds"),
    (eenn.ExitPolicy("gate", [0.5]), ValueError, "needs gated exit heads"),
    ("max_prob", TypeError, "rule name without thresholds"),
    (0.5, TypeError, "policy must be an eenn.ExitPolicy"),
])
def test_save_refuses_a_policy_that_does_not_fit_before_writing(tmp_path, policy, error, match):
    net = mlp()
    assert net.num_exits == 3
    path = tmp_path / "m.safetensors"
    with pytest.raises(error, match=match):
        eenn.save(net, path, policy=policy)
    assert not path.exists()


def test_save_keeps_a_policy_that_fits(tmp_path):
    path = eenn.save(mlp(), tmp_path / "m.safetensors", policy=eenn.ExitPolicy("max_prob", 0.5))
    assert read_description(path)["policy"]["rule"] == "max_prob"
    assert eenn.ExitPolicy.load(path).name == "max_prob"


# ---------------------------------------------------------------- 5. load onto CUDA without CUDA

def test_load_onto_cuda_without_cuda_is_one_line(tmp_path, monkeypatch):
    path = eenn.save(mlp(), tmp_path / "m.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="map_location 'cuda' asked for, but CUDA is not available here"):
        eenn.load(path, map_location="cuda")
    with pytest.raises(ValueError, match="map_location 'gpu' is not a device"):
        eenn.load(path, map_location="gpu")
    assert eenn.load(path).num_exits == 3


# ---------------------------------------------------------------- 6. collect_outputs(net, data)

def test_collect_outputs_on_all_splits_says_pass_one():
    data = eenn.from_tensors(train=pixels(4), val=pixels(2, seed=1), num_classes=3)
    net = mlp()
    claim_input_spec(net, data.info)
    with pytest.raises(TypeError, match="pass data.val"):
        eenn.collect_outputs(net, data)
    assert eenn.collect_outputs(net, data.val).logits.shape == (3, 2, 3)


# ---------------------------------------------------------------- 7. attach_exits

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_attach_exits_takes_an_int_input_shape():
    net = eenn.attach_exits(Plain(), at="body", input_shape=16)
    assert tuple(net.input_shape) == (16,)
    assert net(torch.randn(2, 16)).logits.shape == (2, 2, 4)


@pytest.mark.parametrize("at", [["head"], ["body", "head"]])
def test_attach_exits_refuses_a_cut_at_the_models_output(at):
    with pytest.raises(TraceError, match="cut before the model's output; the final exit is the model's own"):
        eenn.attach_exits(Plain(), at=at, input_shape=(16,))
