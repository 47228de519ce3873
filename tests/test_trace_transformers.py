"""attach_exits on transformer encoders: torch.nn encoders (nn.TransformerEncoder, a list of
encoder layers), values without a batch dimension and attention masks across the cuts, token-id
inputs, and Hugging Face encoders built from a config (where `transformers` is installed)."""
import warnings

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eenn
from _helpers import gap_thresholds
from eenn.cost import count_macs
from eenn.engine import DynamicEngine
from eenn.exporter import StagedRunner, export
from eenn.outputs import CachedOutputs
from eenn.policies import decide, policy_scores


def _layer(dim):
    return nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.1, batch_first=True)


class ViT(nn.Module):
    """A 4-block ViT for 1x16x16 images: 16 patches and a class token; the blocks are an
    nn.TransformerEncoder or a ModuleList of encoder layers."""

    def __init__(self, dim=16, depth=4, encoder=True, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        if encoder:
            self.blocks = nn.TransformerEncoder(_layer(dim), depth, enable_nested_tensor=False)
        else:
            self.blocks = nn.ModuleList(_layer(dim) for _ in range(depth))
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        if isinstance(self.blocks, nn.ModuleList):
            for b in self.blocks:
                t = b(t)
        else:
            t = self.blocks(t)
        return self.fc(self.norm(t)[:, 0])


def _thresholds(net, x, policy="max_prob"):
    """Per exit, across the widest score gap of the middle half (see _helpers.gap_thresholds)."""
    with torch.no_grad():
        out = net(x)
    return gap_thresholds(policy_scores(policy, CachedOutputs(out.logits, out.gates,
                                                              torch.zeros(len(x), dtype=torch.long))).score[:-1])


def _engine_equals_simulation(net, x, th):
    with torch.no_grad():
        out = net(x)
    sim = decide("max_prob", CachedOutputs(out.logits, None, torch.zeros(len(x), dtype=torch.long)), th)
    for eng in (DynamicEngine(net, "max_prob", th), DynamicEngine(net, "max_prob", th, micro_batch=5)):
        res = eng(x)
        assert torch.equal(res.exit, sim.exit) and torch.equal(res.prediction, sim.prediction)
    assert 0 < int((sim.exit < net.num_exits - 1).sum()) < len(x)  # compaction is exercised
    return sim


@pytest.mark.parametrize("encoder", [True, False], ids=["TransformerEncoder", "ModuleList"])
def test_vit_with_encoder_layers_end_to_end(encoder, tmp_path):
    torch.manual_seed(0)
    model = ViT(encoder=encoder)
    prefix = "blocks.layers" if encoder else "blocks"
    net = eenn.attach_exits(model, at=[f"{prefix}.{i}" for i in range(3)], num_classes=10, input_shape=(1, 16, 16))
    assert [s.shape for s in net.backbone.stage_info] == [(17, 16)] * 3 + [(10,)]
    x = torch.randn(24, 1, 16, 16)
    model.eval(), net.eval()
    with torch.no_grad():  # eval: the layers' fused fast path, in the model and in the segments
        out = net(x)
        assert torch.allclose(out.logits[-1], model(x), atol=1e-5)
    # cost: the same as the model's own, attention included (the fast path's kernel is counted)
    cost = net.cost()
    stage_macs = [b - a for a, b in zip((0,) + cost.backbone_macs[:-1], cost.backbone_macs)]
    n, d = 17, 16
    block = n * (4 * d * d + 2 * d * 2 * d) + 2 * n * n * d  # projections, MLP, QK^T and AV
    assert stage_macs[1] == stage_macs[2] == block
    assert cost.backbone_macs[-1] + cost.head_macs[-1] == count_macs(model, torch.zeros(1, 1, 16, 16))
    # a training step reaches every parameter (training mode: the layers' decomposed path, dropout on)
    net.train()
    out = net(x[:8])
    sum(F.cross_entropy(lg, torch.arange(8) % 10) for lg in out.logits).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    th = _thresholds(net, x)
    _engine_equals_simulation(net, x, th)
    # save and load on a fresh model
    eenn.save(net, tmp_path / "vit.eenn")
    again = eenn.load(tmp_path / "vit.eenn", model=ViT(encoder=encoder)).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, net(x).logits)
    # ONNX: the runner answers as the engine (the fast path is turned off while exporting)
    export(net, tmp_path / "onnx", policy="max_prob", thresholds=th)
    res = StagedRunner(tmp_path / "onnx")(x.numpy())
    eng = DynamicEngine(net, "max_prob", th)(x)
    assert np.array_equal(res["exit"], eng.exit.numpy()) and np.array_equal(res["prediction"], eng.prediction.numpy())


def test_a_module_returning_a_tuple_is_cut_at_element_0():
    class Attn(nn.Module):
        def __init__(self, dim=8):
            super().__init__()
            self.emb, self.attn, self.fc = nn.Linear(4, dim), nn.MultiheadAttention(dim, 2, batch_first=True), nn.Linear(dim, 3)

        def forward(self, x):
            h = self.emb(x)
            a, _ = self.attn(h, h, h)  # a leaf returning (output, weights)
            return self.fc((a + h).mean(1))

    model = Attn().eval()
    net = eenn.attach_exits(model, at=["attn"], input_shape=(5, 4)).eval()
    assert net.backbone.stage_info[0].name == "getitem" and net.backbone.stage_info[0].shape == (5, 8)
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        assert torch.allclose(net(x).logits[-1], model(x), atol=1e-6)


class TokenModel(nn.Module):
    """Token ids -> a padded-sequence classifier. Position ids [1, L] and a causal-free
    additive bias [1, 1, L, L]... carried across the cuts without a batch dimension; the key
    padding mask [B, L] (ids == pad) with one."""

    def __init__(self, vocab=20, dim=16, depth=3, num_classes=4, pad=0):
        super().__init__()
        self.pad = pad
        self.tok, self.posemb = nn.Embedding(vocab, dim), nn.Embedding(32, dim)
        self.layers = nn.ModuleList(_layer(dim) for _ in range(depth))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids):
        pad = ids == self.pad  # [B, L]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # [1, L], from the input's shape
        length = ids.shape[1]
        h = self.tok(ids) + self.posemb(pos)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad) + 0.01 * self.posemb(pos)[:, :length]
        keep = (~pad).unsqueeze(-1).float()
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def test_masks_and_position_ids_cross_cuts_and_follow_compaction(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().eval()
    net = eenn.attach_exits(model, at=["layers.0", "layers.1"], input_shape=(12,), input_dtype=torch.long).eval()
    assert net.backbone.input_dtype == torch.long
    # what crosses cut 0: the state, the mask [B, L] as it is, the position ids with a batch in front
    ids = torch.randint(1, 20, (16, 12))
    for i in range(16):
        ids[i, 12 - i % 7:] = 0  # every sample its own amount of padding
    with torch.no_grad():
        state, _, _ = net.forward_segment(0, ids)
        shapes = [tuple(t.shape) for t in state]
        assert shapes[0] == (16, 12, 16) and (16, 12) in shapes and (16, 1, 12) in shapes
        assert torch.allclose(net(ids).logits[-1], model(ids), atol=1e-5)
    th = _thresholds(net, ids)
    sim = _engine_equals_simulation(net, ids, th)
    assert len(set(sim.exit.tolist())) == 3  # samples leave at every exit
    one_by_one = [DynamicEngine(net, "max_prob", th)(ids[i:i + 1]) for i in range(16)]
    assert torch.equal(torch.cat([r.exit for r in one_by_one]), sim.exit)
    assert torch.equal(torch.cat([r.prediction for r in one_by_one]), sim.prediction)
    # cost and export take integer inputs
    assert net.cost().macs[-1] > 0
    m = export(net, tmp_path, policy="max_prob", thresholds=th)
    assert m["input_dtype"] == "int64"
    res = StagedRunner(tmp_path)(ids.numpy())
    assert np.array_equal(res["exit"], sim.exit.numpy()) and np.array_equal(res["prediction"], sim.prediction.numpy())
    # served over HTTP: token ids as JSON integers or an int64 .npy answer as the engine does
    import json

    from _helpers import npy_bytes, post
    from eenn.serve import LocalServer, TierPlan

    plan = TierPlan.from_dict({"model": str(tmp_path), "tiers": [{"name": "device", "segments": "0-1"},
                                                                  {"name": "cloud", "segments": "rest"}]})
    with LocalServer(plan) as url:
        status, out = post(url, npy_bytes(ids.numpy()))
        assert status == 200, out
        assert [(p["class"], p["exit"]) for p in out["predictions"]] == list(zip(sim.prediction.tolist(),
                                                                                  sim.exit.tolist()))
        status, one = post(url, json.dumps(ids[3].tolist()).encode(), "application/json")
        assert status == 200 and (one["class"], one["exit"]) == (sim.prediction[3], sim.exit[3])
        status, bad = post(url, json.dumps([0.5] * 12).encode(), "application/json")
        assert status == 422 and "token ids" in bad["error"]
    again = eenn.load(eenn.save(net, tmp_path / "tok.eenn"), model=TokenModel()).eval()
    assert again.backbone.input_dtype == torch.long


def test_token_ids_are_calibrated_from_a_pair_of_tensors(tmp_path):
    """Token-id networks have no pixels to normalise: collect_outputs takes (ids, labels) as
    they are, and the policy calibrated on them exports and answers as the engine does."""
    torch.manual_seed(0)
    net = eenn.attach_exits(TokenModel().eval(), at=["layers.0", "layers.1"], input_shape=(12,),
                            input_dtype=torch.long).eval()
    ids, labels = torch.randint(1, 20, (80, 12)), torch.randint(0, 4, (80,))
    ids[::3, 8:] = 0
    cache = eenn.collect_outputs(net, (ids, labels), batch_size=32)
    with torch.no_grad():
        torch.testing.assert_close(cache.logits, net(ids).logits)
    assert torch.equal(cache.targets, labels)
    policy = eenn.calibrate("max_prob", cache, net.cost(), {"max_drop": 0.05})
    export(net, tmp_path, policy=policy)
    # compared on other ids: calibrated thresholds sit on calibration samples' scores, where a last
    # bit of another processor's arithmetic could decide
    fresh = torch.randint(1, 20, (40, 12))
    res, sim = StagedRunner(tmp_path)(fresh.numpy()), DynamicEngine(net, policy)(fresh)
    assert np.array_equal(res["exit"], sim.exit.numpy()) and np.array_equal(res["prediction"], sim.prediction.numpy())
    with pytest.raises(ValueError, match="a pair \\(inputs, labels\\) of tensors of one length"):
        eenn.collect_outputs(net, (ids, labels[:5]))


def test_constant_and_batch_size_values_cross_a_cut():
    class Shaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            shape = x.shape  # torch.Size: batch size and fixed sizes together
            h = torch.relu(self.a(x))
            return self.b(h.reshape(shape[0], shape[1], 6).mean(1))

    torch.manual_seed(0)
    model = Shaped().eval()
    net = eenn.attach_exits(model, at=["relu"], input_shape=(4, 6)).eval()
    x = torch.randn(9, 4, 6)
    with torch.no_grad():
        assert torch.allclose(net(x).logits[-1], model(x), atol=1e-6)
    th = _thresholds(net, x)
    res = DynamicEngine(net, "max_prob", th)(x)
    late = res.exit == 1
    assert 0 < int(late.sum()) < 9
    with torch.no_grad():
        assert torch.equal(res.prediction[late], model(x[late]).argmax(1))


class CausalModel(nn.Module):
    """nn.TransformerEncoder under PyTorch's own causal mask (additive, -inf above the diagonal),
    which crosses the cuts with the states."""

    def __init__(self, dim=16, nhead=2, norm_first=True):
        super().__init__()
        self.tok = nn.Embedding(20, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead, 2 * dim, batch_first=True, norm_first=norm_first)
        self.blocks = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, 4)

    def forward(self, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.size(1))
        return self.fc(self.blocks(self.tok(ids), mask=mask, is_causal=True)[:, -1])


def test_a_causal_mask_exports_and_the_length_is_the_traced_one(tmp_path):
    torch.manual_seed(0)
    net = eenn.attach_exits(CausalModel().eval(), at=["blocks.layers.0", "blocks.layers.1"], input_shape=(12,),
                            input_dtype=torch.long).eval()
    ids = torch.randint(1, 20, (24, 12))
    th = _thresholds(net, ids)
    sim = _engine_equals_simulation(net, ids, th)
    export(net, tmp_path, policy="max_prob", thresholds=th)  # the -inf of the mask agree with PyTorch's
    res = StagedRunner(tmp_path)(ids.numpy())
    assert np.array_equal(res["exit"], sim.exit.numpy()) and np.array_equal(res["prediction"], sim.prediction.numpy())
    # the sequence length is a constant of the cut graph: another one is refused, not answered wrongly
    for length in (8, 16):
        with pytest.raises(ValueError, match=r"expected inputs \[B, 12\] \(token ids .*padded or cut to the length"):
            net(torch.randint(1, 20, (2, length)))


def test_export_checks_token_models_on_ids_they_take(tmp_path):
    """A one-row embedding table (a segment table of size 1, as RoBERTa's token types) does not
    bound the check ids to 0, the padding id, which would mask every token."""
    class WithSegment(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.seg = nn.Embedding(20, 16), nn.Embedding(1, 16)
            self.blocks = nn.TransformerEncoder(_layer(16), 2, enable_nested_tensor=False)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            h = self.tok(ids) + self.seg(torch.zeros_like(ids))
            return self.fc(self.blocks(h, src_key_padding_mask=ids == 0).mean(1))

    torch.manual_seed(0)
    net = eenn.attach_exits(WithSegment(), at=["blocks.layers.0"], input_shape=(8,), input_dtype=torch.long).eval()
    export(net, tmp_path, thresholds=0.9)
    ids = torch.randint(1, 20, (6, 8))
    res, sim = StagedRunner(tmp_path)(ids.numpy()), DynamicEngine(net, "max_prob", 0.9)(ids)
    assert np.array_equal(res["exit"], sim.exit.numpy()) and np.array_equal(res["prediction"], sim.prediction.numpy())


def test_loading_into_a_model_configured_otherwise_warns(tmp_path):
    """nn.TransformerEncoderLayer is called whole: its heads and norm_first are not in the cut
    graph's code, so they are recorded beside it and checked when loading."""
    torch.manual_seed(0)
    net = eenn.attach_exits(CausalModel(), at=["blocks.layers.0"], input_shape=(8,), input_dtype=torch.long)
    path = eenn.save(net, tmp_path / "c.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eenn.load(path, model=CausalModel())
    for other in (CausalModel(nhead=4), CausalModel(norm_first=False)):
        with pytest.warns(UserWarning, match="traces to another graph"):
            eenn.load(path, model=other)


def test_sequence_first_layers_say_to_use_batch_first():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(20, 16)
            self.blocks = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(self.blocks(self.tok(ids).transpose(0, 1)).mean(0))

    with pytest.raises(eenn.TraceError, match="batch_first=False.*Build the layers with batch_first=True"):
        eenn.attach_exits(SeqFirst(), at=["blocks.layers.0"], input_shape=(8,), input_dtype=torch.long)


def test_export_tracer_names_the_first_encoder_layer():
    """torch.export shares a size computed in layer 0 (batch x heads) with the layers after it:
    layer 0 still hands on one value, its output, and can be named as a cut point."""
    torch.manual_seed(0)
    model = TokenModel().eval()
    net = eenn.attach_exits(model, at=["layers.0", "layers.1"], input_shape=(12,), input_dtype=torch.long,
                            tracer="export").eval()
    ids = torch.randint(1, 20, (5, 12))
    ids[:, 9:] = 0
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits[-1], model(ids), atol=1e-5, rtol=1e-5)
    direct = eenn.attach_exits(CausalModel().eval(), at=["blocks.layers.0"], input_shape=(8,), input_dtype=torch.long,
                               tracer="export")
    assert direct.num_exits == 2


def test_a_nested_tensor_encoder_with_a_padding_mask_warns():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(20, 16)
            self.blocks = nn.TransformerEncoder(_layer(16), 2)  # enable_nested_tensor defaults to True
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(self.blocks(self.tok(ids), src_key_padding_mask=ids == 0).mean(1))

    with pytest.warns(UserWarning, match="enable_nested_tensor=True leaves padded positions as zeros") as w:
        eenn.attach_exits(Nested(), at=["blocks.layers.0"], input_shape=(8,), input_dtype=torch.long)
    assert [r.filename for r in w if "nested_tensor" in str(r.message)] == [__file__]  # the model's line


def test_bad_input_dtype_and_tracer_say_what_to_do():
    with pytest.raises(TypeError, match="torch.dtype such as torch.long"):
        eenn.attach_exits(TokenModel(), at=["layers.0"], input_shape=(8,), input_dtype="long")
    with pytest.raises(eenn.TraceError, match="tracer must be 'fx' or 'export'"):
        eenn.attach_exits(TokenModel(), at=["layers.0"], input_shape=(8,), input_dtype=torch.long, tracer="jit")
    with pytest.raises(eenn.TraceError, match="torch.long for token ids"):
        eenn.attach_exits(TokenModel(), at=["layers.0"], input_shape=(8,))  # float ids into an embedding


# ----------------------------------------------------------------------------- Hugging Face
def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_hf_bert_with_exits_end_to_end(tmp_path):
    bert = _bert()
    at = [f"bert.encoder.layer.{i}" for i in range(3)]
    net = eenn.attach_exits(eenn.hf.encoder(bert, pad_token_id=0), at=at, input_shape=(12,),
                            input_dtype=torch.long, head="token").eval()
    assert [s.shape for s in net.backbone.stage_info] == [(12, 32)] * 3 + [(3,)]
    torch.manual_seed(1)
    ids = torch.randint(1, 100, (24, 12))
    for i in range(24):
        ids[i, 12 - i % 6:] = 0  # padded: the attention mask crosses every cut with the state
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=(ids != 0).long()).logits
        assert torch.allclose(net(ids).logits[-1], ref, atol=1e-5)
    # a layer's cost: projections, MLP and attention (QK^T, AV) for 12 tokens of width 32
    cost = net.cost()
    assert cost.backbone_macs[2] - cost.backbone_macs[1] == 12 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 12 * 12 * 32
    th = _thresholds(net, ids)
    sim = _engine_equals_simulation(net, ids, th)
    alone = [DynamicEngine(net, "max_prob", th)(ids[i:i + 1]) for i in range(24)]
    assert torch.equal(torch.cat([r.exit for r in alone]), sim.exit)
    assert torch.equal(torch.cat([r.prediction for r in alone]), sim.prediction)
    # dropout follows train()/eval() (the graph was taken in eval mode); a step reaches the exits
    net.train()
    out = net(ids[:6])
    assert not torch.equal(out.logits[-1], net(ids[:6]).logits[-1])
    sum(F.cross_entropy(lg, torch.arange(6) % 3) for lg in out.logits).backward()
    assert all(h.weight.grad is not None for h in net.modules() if isinstance(h, nn.Linear))
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model built as when saved: nothing to say
        again = eenn.load(eenn.save(net, tmp_path / "bert.eenn"), model=eenn.hf.encoder(_bert(), pad_token_id=0)).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, net(ids).logits)
    # built with another pad id (a constant in the traced graph, not a weight): the load says so
    with pytest.warns(UserWarning, match=r"traces to another graph .*\(another constant, such as a pad id"):
        eenn.load(tmp_path / "bert.eenn", model=eenn.hf.encoder(_bert(), pad_token_id=1))


def test_hf_vit_with_exits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, intermediate_size=64, num_labels=10)
    vit = transformers.ViTForImageClassification(cfg).eval()
    net = eenn.attach_exits(eenn.hf.encoder(vit), at=["vit.layers.0", "vit.layers.1"],
                            input_shape=(1, 28, 28)).eval()
    assert net.backbone.stage_info[0].shape == (17, 32)  # 16 patches and the class token
    x = torch.randn(12, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net(x).logits[-1], vit(pixel_values=x).logits, atol=1e-5)
    _engine_equals_simulation(net, x, _thresholds(net, x))


def _runner_answers_as_the_engine(net, out, x, th, batches):
    """The staged runner on ``x`` cut into batches of each size answers as the engine on the same
    batches: the graphs run at batch sizes other than those of the trace (3) and of the export's
    check (5); batches of one go through the fused graph where the export has one."""
    runner = StagedRunner(out)
    for size in batches:
        for i in range(0, len(x), size):
            part = x[i:i + size]
            res, eng = runner(part.numpy()), DynamicEngine(net, "max_prob", th)(part)
            assert np.array_equal(res["exit"], eng.exit.numpy()), (size, i)
            assert np.array_equal(res["prediction"], eng.prediction.numpy()), (size, i)


def _padded_ids(n, length=12):
    ids = torch.randint(1, 100, (n, length), generator=torch.Generator().manual_seed(1))
    for i in range(n):
        ids[i, length - i % 6:] = 0  # every sample its own amount of padding
    return ids


def test_hf_bert_exports_with_a_dynamic_batch(tmp_path):
    net = eenn.attach_exits(eenn.hf.encoder(_bert(), pad_token_id=0), input_shape=(12,), input_dtype=torch.long,
                            at=["bert.encoder.layer.0", "bert.encoder.layer.2"], head="token").eval()
    ids = _padded_ids(24)
    th = _thresholds(net, ids)
    m = export(net, tmp_path, policy="max_prob", thresholds=th)
    assert m["input_dtype"] == "int64" and m["input_shape"] == [12]
    assert m["fused"]["file"] == "fused_batch1.onnx" and m["static"]["file"] == "static.onnx"
    assert [s["inputs"][0]["shape"][0] for s in m["segments"]] == [None] * 3  # the batch is a dynamic dimension
    sim = _engine_equals_simulation(net, ids, th)
    assert len(set(sim.exit.tolist())) == 3  # samples leave at every exit
    _runner_answers_as_the_engine(net, tmp_path, ids, th, [24, 7, 1])
    # the static graph too, at a batch size of its own
    import onnxruntime as ort
    static = ort.InferenceSession(str(tmp_path / "static.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net(ids[:9]).logits[-1].numpy()
    assert np.allclose(static.run(None, {"input": ids[:9].numpy()})[0], want, atol=1e-5)
    # The sequence length is the traced one (input_shape), as in PyTorch: shorter inputs are padded.
    with pytest.raises(eenn.exporter.ExportError, match=r"inputs of shape \[batch, 12\], got \[24, 8\]; pad"):
        StagedRunner(tmp_path)(ids[:, :8].numpy())


def test_hf_vit_exports_with_a_dynamic_batch(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    vit = transformers.ViTForImageClassification(cfg).eval()
    net = eenn.attach_exits(eenn.hf.encoder(vit), at=["vit.layers.0", "vit.layers.1"], input_shape=(1, 16, 16)).eval()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    th = _thresholds(net, x)
    export(net, tmp_path, policy="max_prob", thresholds=th)
    _runner_answers_as_the_engine(net, tmp_path, x, th, [16, 6, 1])


def test_hf_export_refuses_graphs_that_keep_the_batch_size(tmp_path, monkeypatch):
    """Without the rewrite of ATen operators that take the batch size (view, expand, ...), the
    ONNX exporter writes the traced batch size into the graphs; the export's check at a second
    batch size says so instead of writing graphs that answer wrongly."""
    import importlib

    monkeypatch.setattr(importlib.import_module("eenn.trace_export"), "_size_traceable", lambda g, n: None)
    net = eenn.attach_exits(eenn.hf.encoder(_bert(), pad_token_id=0), at=["bert.encoder.layer.0"],
                            input_shape=(8,), input_dtype=torch.long, head="token")
    with pytest.raises(eenn.exporter.ExportError,
                       match=r"segment 0: the ONNX graph exported at batch 5 does not run at batch 2 .*DynamicEngine"):
        export(net, tmp_path / "out", policy="max_prob", thresholds=0.5)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_hf_model_traced_with_fx_says_what_to_do():
    bert = _bert()
    with pytest.raises(eenn.TraceError, match=r"cannot trace HFEncoder.*tracer=\"export\""):
        eenn.attach_exits(eenn.hf.encoder(bert), at=["bert.encoder.layer.0"], input_shape=(8,),
                          input_dtype=torch.long, tracer="fx")
    with pytest.raises(ValueError, match="pad_token_id applies to token-id models"):
        transformers = pytest.importorskip("transformers")
        vit = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
            intermediate_size=8))
        eenn.hf.encoder(vit, pad_token_id=0)


def test_hf_attention_dropout_follows_train_and_eval():
    """The export is traced in eval mode, where Hugging Face's attention passes dropout_p = 0; the
    cut model gives its attention dropout back while training."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5))
    net = eenn.attach_exits(eenn.hf.encoder(bert, pad_token_id=0), at=["bert.encoder.layer.0"], input_shape=(8,),
                            input_dtype=torch.long)
    ids = torch.randint(1, 100, (4, 8))
    net.train()
    assert not torch.equal(net(ids).logits[-1], net(ids).logits[-1])  # attention dropout only: it is there
    bert.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits[-1], bert(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
