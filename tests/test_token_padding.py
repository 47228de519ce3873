"""Exit heads on padded token sequences (``attach_exits(pad_id=...)``): the heads that pool leave
padded positions out, so an exit answers a sentence the same however far it is padded; the mask
crosses the cuts with the samples through the engine, the export, the fused graph and serving."""
import numpy as np

import pytest
import torch
from torch import nn

import eenn
from _helpers import gap_thresholds, npy_bytes, post
from eenn.engine import DynamicEngine
from eenn.exporter import StagedRunner, export
from eenn.outputs import CachedOutputs
from eenn.policies import decide, policy_scores


class PaddedText(nn.Module):
    """Token ids -> classes; the model itself masks padding (its attention and its own mean)."""

    def __init__(self, vocab=30, dim=16, depth=3, num_classes=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(32, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids):
        pad = ids == 0
        h = self.blocks(self.tok(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp(min=1))


HEADS = ["linear", "lgvit_global"]
AT = ["blocks.layers.0", "blocks.layers.1"]


def _net(model, length, **kw):
    return eenn.attach_exits(model, at=AT, input_shape=(length,), input_dtype=torch.long, head=HEADS, **kw).eval()


def _sentences(n, length, seed=0):
    """``n`` sentences of 2..length real tokens, padded with 0 to ``length``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, length), generator=g)
    for i in range(n):
        ids[i, 2 + i % (length - 2):] = 0
    return ids


def _pad_to(ids, length):
    return torch.cat([ids, ids.new_zeros(len(ids), length - ids.shape[1])], 1)


def test_an_exit_answers_a_sentence_the_same_however_far_it_is_padded():
    torch.manual_seed(0)
    model = PaddedText()
    short, long = _net(model, 8, pad_id=0), _net(model, 14, pad_id=0)
    long.load_state_dict(short.state_dict())
    ids = _sentences(10, 8)
    with torch.no_grad():
        a, b = short(ids).logits, long(_pad_to(ids, 14)).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # without the mask the pooling heads read the padded positions, so the answers move
        plain = _net(model, 14)
        plain.load_state_dict(short.state_dict())
        moved = (plain(_pad_to(ids, 14)).logits - b).abs().amax(dim=(1, 2))
    assert (moved[:-1] > 1e-3).all() and moved[-1] < 1e-5  # the model's own output masks already
    assert short.config["source"]["pad_id"] == 0 and "pad_id" not in plain.config["source"]


def _thresholds(net, ids):
    with torch.no_grad():
        out = net(ids)
    cache = CachedOutputs(out.logits, None, torch.zeros(len(ids), dtype=torch.long))
    return gap_thresholds(policy_scores("max_prob", cache).score[:-1]), cache


def test_the_mask_follows_the_samples_through_engine_export_and_serving(tmp_path):
    torch.manual_seed(1)
    net = _net(PaddedText(), 12, pad_id=0)
    ids = _sentences(24, 12, seed=1)
    th, cache = _thresholds(net, ids)
    sim = decide("max_prob", cache, th)
    assert len(set(sim.exit.tolist())) == 3  # samples leave at every exit: compaction is exercised
    for eng in (DynamicEngine(net, "max_prob", th), DynamicEngine(net, "max_prob", th, micro_batch=5),
                DynamicEngine(net, "max_prob", th, optimize=True)):
        res = eng(ids)
        assert torch.equal(res.exit, sim.exit) and torch.equal(res.prediction, sim.prediction)
    with torch.no_grad():
        state, _, _ = net.forward_segment(0, ids)
    assert state[-1].dtype == torch.bool and torch.equal(state[-1], ids != 0)

    m = export(net, tmp_path, policy="max_prob", thresholds=th)
    assert m["fused"]["file"] == "fused_batch1.onnx"
    runner = StagedRunner(tmp_path)
    for size in (24, 7, 1):  # batch 1 goes through the fused graph
        for i in range(0, len(ids), size):
            res = runner(ids[i:i + size].numpy())
            assert np.array_equal(res["exit"], sim.exit[i:i + size].numpy()), (size, i)
            assert np.array_equal(res["prediction"], sim.prediction[i:i + size].numpy()), (size, i)

    from eenn.serve import LocalServer, TierPlan
    plan = TierPlan.from_dict({"model": str(tmp_path), "float16": True,  # the mask crosses as it is
                               "tiers": [{"name": "device", "segments": "0"}, {"name": "edge", "segments": "1"},
                                         {"name": "cloud", "segments": "rest"}]})
    with LocalServer(plan) as url:
        status, out = post(url, npy_bytes(ids.numpy()))
    assert status == 200, out
    assert [p["exit"] for p in out["predictions"]] == sim.exit.tolist()


def test_pad_id_is_saved_and_a_truncated_network_keeps_masking(tmp_path):
    torch.manual_seed(2)
    net = _net(PaddedText(), 10, pad_id=0)
    ids = _sentences(6, 10)
    path = eenn.save(net, tmp_path / "text.eenn")
    again = eenn.load(path, model=PaddedText()).eval()
    assert again.backbone.carries_keep
    with torch.no_grad():
        assert torch.equal(again(ids).logits, net(ids).logits)
        short = net.truncate(0)  # exit 0 becomes the final classifier, still leaving the padding out
        assert torch.equal(short(ids).logits[-1], net(ids).logits[0])
        assert torch.equal(short.backbone(ids), net(ids).logits[0])


def test_pad_id_mistakes_say_what_to_do():
    model = PaddedText()
    with pytest.raises(ValueError, match=r"exit head 'eenets' \(exit 0\) cannot leave padded tokens out.*"
                                         r"'linear'.*pad_id=None"):
        eenn.attach_exits(model, at=AT, input_shape=(10,), input_dtype=torch.long, pad_id=0,
                          head="eenets", head_options={"pool": False})
    with pytest.raises(eenn.TraceError, match="pad_id applies to token ids"):
        eenn.attach_exits(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), at="1", input_shape=(4,),
                          pad_id=0)
    with pytest.raises(TypeError, match="pad_id must be a token id"):
        _net(model, 10, pad_id=True)


def test_hf_encoder_masks_its_exit_heads_with_its_pad_id():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=30,
        max_position_embeddings=32, num_labels=3)).eval()
    at = ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    nets = [eenn.attach_exits(eenn.hf.encoder(bert, pad_token_id=0), at=at, input_shape=(n,), input_dtype=torch.long,
                              head="linear").eval() for n in (8, 12)]
    assert all(n.backbone.carries_keep for n in nets)
    nets[1].load_state_dict(nets[0].state_dict())  # the same exit heads
    ids = _sentences(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(nets[0](ids).logits, nets[1](_pad_to(ids, 12)).logits, atol=1e-5, rtol=1e-5)
    unmasked = eenn.attach_exits(eenn.hf.encoder(bert, pad_token_id=0), at=at, input_shape=(12,),
                                 input_dtype=torch.long, head="linear", pad_id=None)
    assert not unmasked.backbone.carries_keep
