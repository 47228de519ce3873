"""Training and evaluating on tensors of one's own (eenn.data.from_tensors): token ids through a
small text transformer, float features through a small MLP, uint8 pixels exactly as the
registered data sets; checkpoints, resume, and the errors of bad input."""
import json
import warnings

import numpy as np
import pytest
import torch

import eenn
from eenn.callbacks import Callback
from eenn.data import InputSpec, TensorDataset, TensorLoader, from_tensors, register_dataset

LENGTH, VOCAB = 8, 20


class TextNet(torch.nn.Module):
    """The README's TextNet, smaller: embeddings, two encoder layers, mean over tokens."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, 16)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, ids):
        return self.fc(self.blocks(self.tok(ids), src_key_padding_mask=ids == 0).mean(1))


class FeatureNet(torch.nn.Module):
    def __init__(self, width=10):
        super().__init__()
        self.l1 = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU())
        self.l2 = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.l2(self.l1(x)))


def token_task(n, seed):
    """Ids 1..VOCAB-1 without 7; the label is whether a 7 was written in (half the samples)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    x[x == 7] = 8
    y = torch.arange(n) % 2
    pos = torch.randint(0, LENGTH, (n,), generator=g)
    x[torch.arange(n)[y == 1], pos[y == 1]] = 7
    return x, y


def feature_task(n, seed, width=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


@pytest.fixture(scope="module")
def tokens():
    return from_tensors(train=token_task(256, 0), val=token_task(128, 1), test=token_task(64, 2),
                        class_names=["no7", "has7"], name="has7")


def text_net(**kw):
    torch.manual_seed(0)
    return eenn.attach_exits(TextNet(), at=["blocks.layers.0"], input_shape=(LENGTH,), input_dtype=torch.long, **kw)


def feature_net():
    torch.manual_seed(0)
    return eenn.attach_exits(FeatureNet(), at=["l1"], input_shape=(10,))


FIT = dict(epochs=2, lr=1e-2, optimizer="adamw", batch_size=32, progress=False)


# ------------------------------------------------------------------------------------ training

def test_a_text_transformer_learns_from_token_ids(tokens):
    assert eenn.from_tensors is from_tensors
    assert tokens.info.kind == "tokens" and tokens.info.input_shape == (LENGTH,) and tokens.info.num_classes == 2
    net = text_net()
    history = eenn.fit(net, tokens, "joint", **FIT)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert min(history[-1]["val_acc"]) > 0.8 and len(history[-1]["val_acc"]) == 2  # every exit beats chance (0.5)
    assert net.input_spec == InputSpec((LENGTH,), class_names=("no7", "has7"), kind="tokens")
    x, y = next(iter(TensorLoader(tokens.train, 4, input_spec=net.input_spec)))
    assert x.dtype == torch.int64 and torch.equal(x, tokens.train.x[:4])  # ids go through as they are


@pytest.mark.parametrize("objective, kw", [
    ("final", {}), ("distill", {}), ("aep", {}), ("joint", {"weights": "pabee"}),
    ("branching", {}), ("eenets", {}), ("nachos", {})])
def test_every_objective_trains_on_token_ids(tokens, objective, kw):
    gated = objective in ("branching", "eenets", "nachos")
    net = text_net(head_options={"gate": True} if gated else None)
    if objective == "nachos":
        kw = {"mmax": net.cost().macs[-1], "support_set": True}  # drawn from the ids, not normalised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nachos' support set is noted as small
        history = eenn.fit(net, tokens, eenn.create_objective(objective, **kw), **FIT)
    assert history[-1]["val_acc"][-1] > 0.8


def test_deebert_two_stages_on_token_ids(tokens, tmp_path):
    """DeeBERT's recipe: the backbone first (final), then the exits on it frozen (heads_only)."""
    base = text_net()
    eenn.fit(base, tokens, "final", out_dir=str(tmp_path / "base"), **FIT)
    net = text_net()
    obj = eenn.create_objective("heads_only", checkpoint=str(tmp_path / "base" / "best.safetensors"))
    history = eenn.fit(net, tokens, obj, **FIT)
    for k, v in base.backbone.state_dict().items():  # frozen, as loaded
        assert torch.equal(net.backbone.state_dict()[k], v)
    assert history[-1]["val_acc"][0] > 0.8


def test_float_features_train_as_they_are():
    x, y = feature_task(256, 0)
    data = from_tensors((x.double().numpy(), y.numpy()), feature_task(128, 1), feature_task(64, 2))
    assert data.info.kind == "features" and data.train.x.dtype == torch.float32  # NumPy's float64, kept as float32
    net = feature_net()
    history = eenn.fit(net, data, "joint", **FIT)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_acc"][-1] > 0.85
    assert net.input_spec.kind == "features" and net.input_spec.shape == (10,)
    batch = next(iter(TensorLoader(data.val, 8, input_spec=net.input_spec)))[0]
    assert torch.equal(batch, data.val.x[:8])  # not normalised


def test_fit_refuses_data_the_network_does_not_take(tokens):
    feats = from_tensors(feature_task(64, 0), feature_task(32, 1))
    with pytest.raises(ValueError, match=r"network takes token ids.*holds float features \[B, 10\]"):
        eenn.fit(text_net(), feats, **FIT)
    with pytest.raises(ValueError, match=r"network takes float inputs.*holds token ids \[B, 8\]"):
        eenn.fit(feature_net(), tokens, **FIT)
    (x, y), (vx, vy) = token_task(64, 0), token_task(8, 1)
    short = from_tensors((x[:, :5], y), (vx[:, :5], vy))
    with pytest.raises(ValueError, match=r"inputs of shape \(8,\).*pad or cut"):
        eenn.fit(text_net(), short, **FIT)
    with pytest.raises(ValueError, match="augment=True crops and flips images.*token ids"):
        eenn.fit(text_net(), tokens, augment=True, **FIT)
    many = from_tensors(token_task(64, 0), token_task(32, 1), num_classes=5)
    net = text_net()
    eenn.fit(net, many, **FIT)  # 5 classes said, labels 0..1 there: they fit a 2-class network
    with pytest.raises(ValueError, match=r"train split's labels range over \[0, 4\], the network has 2 classes"):
        eenn.fit(text_net(), from_tensors((x, y * 4), (vx, vy)), **FIT)


def test_a_second_fit_on_another_kind_of_data_is_refused():
    """A network of float inputs trained on features, then given images of that very shape."""
    torch.manual_seed(0)
    net = eenn.create_network("mlp", in_channels=1, num_classes=2, input_size=4, exits="all")
    g = torch.Generator().manual_seed(0)
    feats = from_tensors((torch.randn(32, 1, 4, 4, generator=g), torch.arange(32) % 2),
                         (torch.randn(8, 1, 4, 4, generator=g), torch.arange(8) % 2))
    eenn.fit(net, feats, epochs=1, progress=False)
    pixels = from_tensors((torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(32) % 2),
                          (torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(8) % 2))
    with pytest.raises(ValueError, match=r"says it takes float features \[B, 1, 4, 4\].*holds uint8 pixels"):
        eenn.fit(net, pixels, epochs=1, progress=False)
    net.input_spec = None  # adopting the new data's description is allowed
    eenn.fit(net, pixels, epochs=1, progress=False)
    assert net.input_spec.kind == "pixels"


# ------------------------------------------------------------------------ checkpoints, resume

class _StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, trainer, metrics):
        trainer.should_stop = True


def test_checkpoints_keep_the_input_description_and_resume_exactly(tokens, tmp_path):
    cfg = dict(FIT, deterministic=True, device="cpu")  # bit-exact resumes are promised on the CPU
    whole = text_net()
    eenn.fit(whole, tokens, "joint", out_dir=str(tmp_path / "whole"), **cfg)
    cut = text_net()
    eenn.fit(cut, tokens, "joint", callbacks=[_StopAfterFirstEpoch()], out_dir=str(tmp_path / "cut"), **cfg)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    again = text_net()  # a fresh process, as it were: re-running goes on from last.safetensors
    history = eenn.fit(again, tokens, "joint", out_dir=str(tmp_path / "cut"), **cfg)
    assert [m["epoch"] for m in history] == [2]
    for a, b in zip(whole.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    desc = eenn.read_description(tmp_path / "cut" / "best.safetensors")  # the JSON header; nothing pickled
    assert desc["network"]["input_spec"] == {"kind": "tokens", "shape": [LENGTH], "class_names": ["no7", "has7"]}
    back = eenn.load(tmp_path / "cut" / "last.safetensors", model=TextNet())
    assert back.input_spec == again.input_spec and back.input_spec.kind == "tokens"
    ids = tokens.test.x[:5]
    assert torch.equal(back.eval()(ids).logits, again.eval()(ids).logits)
    assert torch.equal(back.preprocess(ids), ids)


def test_resume_refuses_data_of_another_kind(tmp_path):
    """A run directory of a network of float inputs, re-run on images of the same shape."""
    g = torch.Generator().manual_seed(0)
    feats = from_tensors((torch.randn(32, 1, 4, 4, generator=g), torch.arange(32) % 2),
                         (torch.randn(8, 1, 4, 4, generator=g), torch.arange(8) % 2))
    pixels = from_tensors((torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(32) % 2),
                          (torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(8) % 2))

    def mlp():
        torch.manual_seed(0)
        return eenn.create_network("mlp", in_channels=1, num_classes=2, input_size=4, exits="all")

    eenn.fit(mlp(), feats, epochs=1, progress=False, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"last.safetensors was trained on float features \[B, 1, 4, 4\], this run's "
                                         r"data hold uint8 pixels"):
        eenn.fit(mlp(), pixels, epochs=2, progress=False, out_dir=str(tmp_path))


# ---------------------------------------------------------------------------------- evaluation

def test_evaluation_paths_take_token_ids(tokens, tmp_path, capsys):
    net = text_net()
    eenn.fit(net, tokens, "joint", **FIT)
    val, test = eenn.collect_outputs(net, tokens.val), eenn.collect_outputs(net, tokens.test)
    assert val.logits.shape == (2, 128, 2) and torch.equal(test.targets, tokens.test.y)
    policy = eenn.calibrate("max_prob", val, net.cost(), {"max_drop": 0.05})
    result = eenn.DynamicEngine(net.eval(), policy)(tokens.test.x)
    assert (result.prediction == tokens.test.y).double().mean() > 0.8
    report = eenn.evaluate(net, tokens, batch_sizes=(4,), timing_samples=8, repeats=1, deployments="eager",
                           curve_points=2, goal={"max_drop": 0.05})
    assert report.data["timing"][0]["batch_size"] == 4
    assert report.data["dataset"] == {"name": "has7", "split": "test", "samples": 64}
    assert report.data["result"]["accuracy"] > 0.8
    manifest = eenn.export(net, tmp_path / "export", policy=policy)
    assert manifest["preprocess"] is None and manifest["class_names"] == ["no7", "has7"]  # ids are not pixels
    pruned = eenn.aep_prune(net, [1.0, 1.0], tokens.val, latency_batch_size=None)
    assert len(pruned.val_acc) == 2
    # eenn predict reads a JSON array as token ids (it used to cast them to floats and fail)
    from eenn.cli import main

    eenn.save(net, tmp_path / "tok.safetensors", policy=policy)
    (tmp_path / "ids.json").write_text(json.dumps(tokens.test.x[:5].tolist()))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "tok.safetensors"), str(tmp_path / "ids.json"),
                 "--model", "tests.test_tensor_data:TextNet", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prediction"], r["exit"]) for r in rows] == list(zip(result.prediction[:5].tolist(),
                                                                      result.exit[:5].tolist()))
    assert {r["class"] for r in rows} <= {"no7", "has7"}


def test_evaluation_refuses_tensors_without_a_test_split():
    data = from_tensors(token_task(32, 0), token_task(16, 1))
    assert len(data.test) == 0 and data.test.x.shape == (0, LENGTH)
    net = text_net()
    eenn.fit(net, data, epochs=1, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        eenn.collect_outputs(net, data.test)
    with pytest.raises(ValueError, match=r"test split of 'tensors' holds no samples.*give it test=\(x, y\)"):
        eenn.evaluate(net, data, batch_sizes=())


# -------------------------------------------------------------------------------------- pixels

def test_pixels_through_from_tensors_match_the_registered_data_set():
    reg = eenn.load_dataset("digits", seed=0)
    mine = from_tensors((reg.train.x, reg.train.y), (reg.val.x, reg.val.y), (reg.test.x, reg.test.y),
                        class_names=reg.info.class_names, name="digits")
    assert mine.info.kind == "pixels" and (mine.info.in_channels, mine.info.input_size) == (1, (8, 8))
    assert (mine.info.mean, mine.info.std) == (reg.info.mean, reg.info.std)
    assert InputSpec.from_info(mine.info) == InputSpec.from_info(reg.info)
    spec = InputSpec.from_info(reg.info)
    a = next(iter(TensorLoader(mine.train, 64, input_spec=spec, shuffle=True, augment=True, seed=3)))
    b = next(iter(TensorLoader(reg.train, 64, input_spec=spec, shuffle=True, augment=True, seed=3)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -------------------------------------------------------------------------------- bad input

_x, _y = token_task(16, 0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(train=(_x, _y[:10]), val=(_x, _y)), ValueError, "train has 16 samples but 10 labels"),
    (dict(train=(_x, _y.float()), val=(_x, _y)), TypeError, "train y is float32; labels must be integer"),
    (dict(train=(_x, _y), val=(_x[:0], _y[:0])), ValueError, "the val split is empty"),
    (dict(train=(_x, _y), val=(_x, _y), test=(_x[:0], _y[:0])), ValueError, "test split is empty.*test=None"),
    (dict(train=(_x, _y), val=(_x, _y), num_classes=1), ValueError, "num_classes must be an int >= 2"),
    (dict(train=(_x, _y * 3), val=(_x, _y), num_classes=2), ValueError, r"labels range over \[0, 3\].*\[0, 1\]"),
    (dict(train=(_x, _y - 1), val=(_x, _y)), ValueError, r"labels range over \[-1, 1\]"),
    (dict(train=(_x, _y * 0), val=(_x, _y * 0)), ValueError, "every label is 0; a classifier needs at least 2"),
    (dict(train=(_x, _y), val=(_x, _y), class_names=["a", "b", "c"], num_classes=2), ValueError,
     "3 class_names for num_classes=2"),
    (dict(train=(_x, _y), val=(_x[:, :4], _y)), ValueError,
     r"val split holds token ids \[B, 4\], the train split token ids \[B, 8\]"),
    (dict(train=(_x, _y), val=(_x.float(), _y)), ValueError, "val split holds float features"),
    (dict(train=(_x.float().masked_fill(_x == 7, float("nan")), _y), val=(_x.float(), _y)), ValueError,
     "train x holds 8 NaN or infinite value"),
    (dict(train=(_x - 5, _y), val=(_x, _y)), ValueError, "negative token ids"),
    (dict(train=(_x.to(torch.uint8), _y), val=(_x, _y)), ValueError, r"uint8 samples are pixels \[N, C, H, W\]"),
    (dict(train=(_x.bool(), _y), val=(_x, _y)), TypeError, "train x is bool"),
    (dict(train=(_x[:, 0], _y), val=(_x, _y)), ValueError, r"x\[:, None\]"),
    (dict(train=(_x, _y[:, None]), val=(_x, _y)), ValueError, "labels must be \\[N\\]"),
    (dict(train=_x, val=(_x, _y)), TypeError, "train must be a pair"),
    (dict(train=(_x.tolist(), _y), val=(_x, _y)), TypeError, "train x must be a torch.Tensor or a NumPy array"),
])
def test_from_tensors_says_what_is_wrong(kwargs, error, match):
    with pytest.raises(error, match=match):
        from_tensors(**kwargs)


def test_the_loader_and_input_spec_keep_model_inputs_as_they_are():
    ids32 = TensorDataset(_x.int(), _y)
    assert ids32.kind == "tokens"
    spec = InputSpec((LENGTH,), kind="tokens")
    x, _ = next(iter(TensorLoader(ids32, 4, input_spec=spec)))
    assert x.dtype == torch.int32 and torch.equal(x, _x[:4].int())
    with pytest.raises(ValueError, match="mean/std normalise uint8 pixels.*token ids"):
        TensorLoader(ids32, 4, mean=0.5, std=0.5)
    with pytest.raises(ValueError, match=r"holds token ids \[B, 8\], the input_spec says the network takes float"):
        TensorLoader(ids32, 4, input_spec=InputSpec((LENGTH,), kind="features"))
    with pytest.raises(ValueError, match="augment"):
        TensorLoader(ids32, 4, augment=True)
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.to_dict() == {"kind": "tokens", "shape": [LENGTH], "class_names": None}
    assert torch.equal(spec.normalize(_x), _x)
    with pytest.raises(ValueError, match=r"do not fit this network, which takes token ids \[B, 8\]"):
        spec.normalize(_x.float())
    with pytest.raises(ValueError, match="not normalised; leave mean out"):
        InputSpec((LENGTH,), (0.5,), kind="tokens")
    with pytest.raises(ValueError, match="kind must be one of pixels, tokens, features"):
        InputSpec((LENGTH,), kind="text")
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        TensorDataset(np.zeros((4, 3), np.float32), np.zeros(4, np.float32))


# ------------------------------------------------------------------------ registered data sets

@pytest.fixture
def registered():
    """Register builders for the test and take them out again afterwards."""
    from eenn.data import datasets as ds_mod

    names = []

    def add(name, build):
        register_dataset(name)(build)
        names.append(name)

    yield add
    for name in names:
        ds_mod.DATASETS._items.pop(name)


def test_a_registered_data_set_of_token_ids_or_features_loads_and_trains(registered):
    """load_dataset used to read every registered set as pixels (mean/std of uint8 [N, C, H, W]):
    one of token ids or features failed; it is now read as from_tensors reads tensors."""
    from eenn.data import TrainTest

    def has7(*, data_dir=None, download=False, seed=0):
        (x, y), (xt, yt) = token_task(320, 0), token_task(64, 2)
        return TrainTest(TensorDataset(x, y), TensorDataset(xt, yt), ("no7", "has7"))

    def sums(*, data_dir=None, download=False, seed=0):
        (x, y), (xt, yt) = feature_task(200, 0), feature_task(40, 1)
        return TrainTest(TensorDataset(x.double(), y), TensorDataset(xt.double(), yt), ("neg", "pos"))

    registered("has7_test", has7)
    registered("sums_test", sums)
    data = eenn.load_dataset("has7_test", val_fraction=0.2, limit=200)
    assert data.info.kind == "tokens" and data.info.input_shape == (LENGTH,) and data.info.mean == ()
    assert data.info.split == {"seed": 0, "val_fraction": 0.2, "limit": 200}
    assert (len(data.train), len(data.val), len(data.test)) == (200, 64, 64) and data.train.x.dtype == torch.int64
    net = text_net()
    history = eenn.fit(net, data, "joint", **FIT)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert net.input_spec == InputSpec((LENGTH,), class_names=("no7", "has7"), kind="tokens")
    feats = eenn.load_dataset("sums_test")
    assert feats.info.kind == "features" and feats.info.input_shape == (10,)
    assert {ds.x.dtype for ds in (feats.train, feats.val, feats.test)} == {torch.float32}
    eenn.fit(feature_net(), feats, "joint", **FIT)


def test_a_registered_data_set_with_mixed_or_bad_samples_is_refused(registered):
    from eenn.data import TrainTest

    def mixed(*, data_dir=None, download=False, seed=0):
        x, y = token_task(40, 0)
        return TrainTest(TensorDataset(x, y), TensorDataset(x.float(), y), ("a", "b"))

    def negative(*, data_dir=None, download=False, seed=0):
        x, y = token_task(40, 0)
        return TrainTest(TensorDataset(x - 5, y), TensorDataset(x, y), ("a", "b"))

    registered("mixed_test", mixed)
    registered("negative_test", negative)
    with pytest.raises(ValueError, match="data set 'mixed_test': its test samples are features"):
        eenn.load_dataset("mixed_test")
    with pytest.raises(ValueError, match="data set 'negative_test': train x holds negative token ids"):
        eenn.load_dataset("negative_test")
