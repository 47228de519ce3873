"""A vision transformer with exits on token states goes through everything a CNN does: every
training method, and split serving over HTTP with the engine's answers. (The engine == simulation,
export == engine and fused-graph tests run on a ViT too, in test_engine.py and test_export.py.)"""
import numpy as np
import pytest
import torch

import eenn
from _helpers import gap_thresholds, npy_bytes, post, spread_net
from eenn.engine import DynamicEngine
from eenn.exporter import export
from eenn.serve import LocalServer, TierPlan


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def _vit(head="linear", head_options=None):
    torch.manual_seed(0)
    return eenn.create_network("vit", in_channels=1, num_classes=10, input_size=8, dim=32, depth=4, heads=2,
                               exits=[0, 1, 2], head=head, head_options=head_options)


@pytest.fixture(scope="module")
def final_checkpoint(digits, tmp_path_factory):
    net = _vit()
    eenn.fit(net, digits, "final", epochs=4, lr=3e-3, batch_size=32, optimizer="adamw", progress=False)
    path = tmp_path_factory.mktemp("vit") / "final.safetensors"
    eenn.save(net, path)
    return path


# objective, its options, head, head options; "{final}" is a ViT trained for its final exit only.
# NACHOS' own head is a convolution stack for feature maps; on token states it takes a gated token head.
METHODS = [
    ("joint", {"weights": "sdn"}, "linear", {}),
    ("joint", {"weights": "pabee"}, "token", {}),
    ("branching", {}, "branching", {}),
    ("eenets", {"version": "v2"}, "eenets", {}),
    ("aep", {"scheme": "hybrid"}, "lgvit_local", {}),
    ("nachos", {"mmax": 0.5, "support_set": True}, "branching", {}),
    ("distill", {}, "lgvit_global", {}),
    ("heads_only", {"checkpoint": "{final}"}, "linear", {}),
    ("ztw_heads", {"checkpoint": "{final}"}, "linear", {"cascade": True}),
]


@pytest.mark.parametrize("objective, options, head, head_options", METHODS, ids=lambda v: str(v)[:24])
def test_every_training_method_trains_a_vit(digits, final_checkpoint, objective, options, head, head_options):
    net = _vit(head, head_options)
    options = {k: str(final_checkpoint) if v == "{final}" else v for k, v in options.items()}
    if objective == "nachos":
        options["mmax"] = options["mmax"] * net.cost().macs[-1]
    heads_before = [p.detach().clone() for p in net.heads.parameters()]
    hist = eenn.fit(net, digits, eenn.create_objective(objective, **options), epochs=6, lr=3e-3, batch_size=32,
                    optimizer="adamw", progress=False)
    assert all(np.isfinite(h["train_loss"]) for h in hist)
    # (not the loss: SDN's weights and NACHOS' penalties grow during training, and so may the loss)
    assert np.mean(hist[-1]["val_acc"]) > np.mean(hist[0]["val_acc"])
    # every exit head learned something, and the exits beat chance (10%) on validation
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, net.heads.parameters()))
    assert min(hist[-1]["val_acc"]) > 0.2, hist[-1]["val_acc"]


def test_split_serving_answers_as_the_engine_on_a_vit(tmp_path):
    net = spread_net("linear", "vit")
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.3,), (0.25,))
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        th = gap_thresholds(net(x).logits.softmax(-1).amax(-1)[:3]).tolist()
    export(net, tmp_path, policy="max_prob", thresholds=th)
    plan = TierPlan.from_dict({"model": str(tmp_path), "tiers": [{"name": "device", "segments": "0-1"},
                                                               {"name": "cloud", "segments": "rest"}]})
    eng = DynamicEngine(net, "max_prob", th)(x)
    assert 0 < (eng.exit < 2).sum() < 40  # both tiers answer
    srv = LocalServer(plan)
    url = srv.start()
    try:
        status, out = post(url, npy_bytes(x.numpy()), "application/x-npy")
    finally:
        srv.stop()
    assert status == 200, out
    rows = out["predictions"]
    assert [r["class"] for r in rows] == eng.prediction.tolist()
    assert [r["exit"] for r in rows] == eng.exit.tolist()
    assert [r["tier"] for r in rows] == ["device" if e < 2 else "cloud" for e in eng.exit.tolist()]
    assert out["hops"] and out["hops"][0]["bytes"] > 0  # token states [N, D] crossed to the cloud
