"""The dynamic engine makes, sample for sample, the decision the offline simulation makes on
cached outputs -- for every policy -- while really skipping computation."""
import pytest
import torch

import eenn
from _helpers import ARCHS, gap_thresholds, spread_net as _net
from eenn.engine import DynamicEngine
from eenn.outputs import CachedOutputs
from eenn.objectives.ztw import GeometricEnsemble
from eenn.policies import calibrate, decide



CASES = [
    ("max_prob", "linear", {}, {}),
    ("entropy", "linear", {}, {}),
    ("margin", "linear", {}, {}),
    ("patience", "linear", {}, {}),
    ("gate", "branching", {}, {}),
    ("cumulative", "branching", {}, {}),
    ("ensemble", "linear", {}, {"weights": torch.tensor([0.1, 0.2, 0.3, 0.4])}),
    ("ensemble", "linear", {}, {"ensemble": GeometricEnsemble(4, 10)}),
    ("max_prob", "sdn", {"head_options": {"cascade": True}}, {}),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("policy, head, net_opts, opts", CASES, ids=lambda c: str(c)[:20])
def test_engine_equals_simulation(policy, head, net_opts, opts, fallback, arch):
    net = _net(head, arch, **net_opts)
    x = torch.randn(64, 1, 8, 8)
    out = net(x)
    cache = CachedOutputs(out.logits, out.gates, torch.zeros(64, dtype=torch.long))
    # thresholds at the per-exit median score: about half the samples leave at each exit
    scores = eenn.policies.policy_scores(policy, cache, **opts)
    th = scores.score[:-1].median(1).values
    if policy == "patience":
        th = torch.tensor([1.0, 1.0, 2.0])
    sim = decide(policy, cache, th, fallback=fallback, **opts)
    res = DynamicEngine(net, policy, th, fallback=fallback, **opts)(x)
    assert torch.equal(res.exit, sim.exit) and torch.equal(res.depth, sim.depth)
    assert torch.equal(res.prediction, sim.prediction)
    assert torch.allclose(res.macs, torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)[sim.depth])
    if policy != "patience":  # random exits rarely agree, so patience keeps everyone here
        assert 0 < (res.depth < 3).sum() < 64  # some exit early, some do not
    # One sample at a time (the batch-1 path) and in micro-batches: the same answers. Other
    # batch sizes may pick other kernels (last-bit differences), so these thresholds sit
    # halfway between two samples' scores rather than on one.
    if policy != "patience":
        sc = scores.score[:-1].sort(1).values
        i = sc.shape[1] // 2
        th = (sc[:, i] + sc[:, i + 1]) / 2
    eng = DynamicEngine(net, policy, th, fallback=fallback, **opts)
    res = eng(x)
    ones = [eng(x[i:i + 1]) for i in range(16)]
    for field in ("prediction", "exit", "depth", "macs"):
        assert torch.equal(torch.cat([getattr(o, field) for o in ones]), getattr(res, field)[:16]), field
    micro = DynamicEngine(net, policy, th, fallback=fallback, micro_batch=7, **opts)(x)
    assert torch.equal(micro.prediction, res.prediction) and torch.equal(micro.exit, res.exit)
    assert torch.equal(micro.depth, res.depth)


def test_compaction_really_skips_work():
    net = _net()
    net.cost()  # measured once (at batch 1) before we start counting calls
    calls = []
    net.backbone.stages[-1].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randn(32, 1, 8, 8)
    res = DynamicEngine(net, "max_prob", 0.0)(x)  # every sample fires at exit 0
    assert (res.exit == 0).all() and calls == []
    DynamicEngine(net, "max_prob", [0.0, 2.0, 2.0])(x)
    assert calls == []
    DynamicEngine(net, "max_prob", 2.0)(x)  # nobody fires: all reach the last stage, at full batch
    assert calls == [32]


def test_batch_make_up_does_not_change_answers():
    net = _net()
    x = torch.randn(40, 1, 8, 8)
    eng = DynamicEngine(net, "max_prob", [0.3, 0.5, 0.7])
    whole = eng(x)
    parts = [eng(x[i:i + 1]) for i in range(40)]
    assert torch.equal(whole.prediction, torch.cat([p.prediction for p in parts]))
    assert torch.equal(whole.exit, torch.cat([p.exit for p in parts]))


def test_engine_with_calibrated_thresholds_on_digits():
    data = eenn.load_dataset("digits")
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5], width=0.5)
    eenn.fit(net, data, "joint", epochs=4, lr=0.1, progress=False)
    from eenn.outputs import collect_outputs

    val = collect_outputs(net, data.val)
    test = collect_outputs(net, data.test)
    policy = calibrate("max_prob", val, net.cost(), {"max_drop": 0.02})
    sim = decide(policy, test)
    x = next(iter(eenn.TensorLoader(data.test, len(data.test), mean=data.info.mean, std=data.info.std)))[0]
    with pytest.raises(RuntimeError, match=r"eval mode: net\.eval\(\)"):  # refused, not switched behind our back
        DynamicEngine(net, policy)
    assert net.training
    res = DynamicEngine(net.eval(), policy)(x)
    assert torch.equal(res.prediction, sim.prediction) and torch.equal(res.exit, sim.exit)
    with pytest.raises(RuntimeError, match="eval mode"):
        eng = DynamicEngine(net, policy)
        net.train()
        eng(x)


# --- streaming: the survivors of successive batches pooled into full batches at every exit ----

STREAM_SIZES = [23, 40, 7, 64, 31]


def _recording(eng, log):
    """Log ``("call", segment, samples)`` for every segment call of ``eng``."""
    seg = eng._segment

    def segment(k, state, prev):
        log.append(("call", k, (state[0] if isinstance(state, tuple) else state).shape[0]))
        return seg(k, state, prev)
    eng._segment = segment


def _feed(xs, log):
    """The batches, logging ``("read", i)`` as each is handed out and ``("end",)`` when exhausted."""
    for i, x in enumerate(xs):
        log.append(("read", i))
        yield x
    log.append(("end",))


def _assert_full_batches(log, size, num_exits):
    """Every segment call before the input ran out saw ``size`` samples; in the final flush each
    segment runs full batches too, but for its last call."""
    end = log.index(("end",))
    assert all(e[2] == size for e in log[:end] if e[0] == "call"), log
    for k in range(num_exits):
        flush = [e[2] for e in log[end:] if e[0] == "call" and e[1] == k]
        assert all(n == size for n in flush[:-1]) and all(0 < n <= size for n in flush[-1:]), (k, log)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("policy, head, net_opts, opts", CASES, ids=lambda c: str(c)[:20])
def test_stream_equals_engine_per_batch(policy, head, net_opts, opts, fallback, arch):
    net = _net(head, arch, **net_opts)
    torch.manual_seed(1)
    xs = [torch.randn(n, 1, 8, 8) for n in STREAM_SIZES]
    x = torch.cat(xs)
    out = net(x)
    cache = CachedOutputs(out.logits, out.gates, torch.zeros(len(x), dtype=torch.long))
    if policy == "patience":
        th = torch.tensor([1.0, 1.0, 2.0])
    else:
        th = gap_thresholds(eenn.policies.policy_scores(policy, cache, **opts).score[:-1])
    eng = DynamicEngine(net, policy, th, fallback=fallback, **opts)
    expected = [eng(xb) for xb in xs]
    log = []
    _recording(eng, log)
    got = list(eng.stream(_feed(xs, log), batch_size=32))
    assert len(got) == len(xs)
    for b, (g, e) in enumerate(zip(got, expected)):  # in input order, row for row
        for field in ("prediction", "exit", "depth", "macs"):
            assert torch.equal(getattr(g, field), getattr(e, field)), (b, field)
    depth = torch.cat([e.depth for e in expected])
    if policy != "patience":
        assert 0 < (depth < 3).sum() < len(x)  # some exit early, some do not
    assert any(e[0] == "call" and e[1] == 3 for e in log)  # pooled survivors reached the end
    _assert_full_batches(log, 32, net.num_exits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy, head, net_opts, opts", CASES, ids=lambda c: str(c)[:20])
def test_stream_with_the_decision_in_the_graphs_equals_engine_per_batch(policy, head, net_opts, opts, arch):
    """Re-batching on the graphed exit loop (buckets; the GPU's path, run eagerly here): the
    per-batch answers of the general engine, and segments run at the stream's batch size."""
    net = _net(head, arch, **net_opts)
    torch.manual_seed(1)
    xs = [torch.randn(n, 1, 8, 8) for n in STREAM_SIZES]
    with torch.no_grad():
        th = _midpoints(net, torch.cat(xs), policy, opts)
    ref = DynamicEngine(net, policy, th, **opts)
    eng = DynamicEngine(net, policy, th, buckets=(8, 32), **opts)
    got = list(eng.stream(iter(xs), batch_size=32))
    assert len(got) == len(xs)
    for b, (g, xb) in enumerate(zip(got, xs)):
        e = ref(xb)
        for field in ("prediction", "exit", "depth", "macs"):
            assert torch.equal(getattr(g, field), getattr(e, field)), (b, field)
    assert set(eng.graphed.calls) <= {(k, b) for k in range(4) for b in (8, 32)}
    assert any(k == 3 for k, _ in eng.graphed.calls)  # survivors reached the last segment
    # two streams interleaved and the engine called in between (each stream its own graph copies)
    one, two = eng.stream(iter(xs), batch_size=32), eng.stream(iter(xs[::-1]), batch_size=8)
    for xb, yb, a, b in zip(xs, xs[::-1], one, two, strict=True):
        assert torch.equal(a.exit, ref(xb).exit) and torch.equal(b.prediction, ref(yb).prediction)
        assert torch.equal(eng(xb).exit, a.exit)
    assert not eng.graphed._pairs
    assert any(eng.graphed.calls[(k, 32)] for k in (1, 2, 3))  # pooled into a full batch past the first exit


def test_stream_yields_each_batch_as_soon_as_it_is_answered():
    net = _net()
    torch.manual_seed(1)
    xs = [torch.randn(n, 1, 8, 8) for n in STREAM_SIZES]
    eng = DynamicEngine(net, "max_prob", 0.0)  # everyone exits at exit 0
    log = []
    _recording(eng, log)
    loader = ((x, torch.zeros(len(x), dtype=torch.long)) for x in _feed(xs, log))  # (x, y) as a TensorLoader's
    got = []
    for j, r in enumerate(eng.stream(loader, batch_size=32)):
        log.append(("yield", j))
        got.append(r)
    # batches of samples 0-22 | 23-62 | 63-69 | 70-133 | 134-164; exit 0 runs 0-31 once batch 1
    # is read, 32-63 after batch 2, 64-95 and 96-127 after batch 3, 128-159 after batch 4, and
    # 160-164 in the flush; each batch is yielded by the run that answers its last sample
    events = [e[:2] if e[0] != "call" else ("call",) for e in log]
    assert events == [("read", 0), ("read", 1), ("call",), ("yield", 0), ("read", 2), ("call",), ("yield", 1),
                      ("read", 3), ("call",), ("yield", 2), ("call",), ("read", 4), ("call",), ("yield", 3),
                      ("end",), ("call",), ("yield", 4)]
    assert [e[1:] for e in log if e[0] == "call"] == [(0, 32)] * 5 + [(0, 5)]
    for r, x in zip(got, xs, strict=True):
        assert torch.equal(r.prediction, eng(x).prediction) and (r.exit == 0).all()


def test_stream_where_nobody_exits_early():
    net = _net()
    torch.manual_seed(1)
    xs = [torch.randn(n, 1, 8, 8) for n in STREAM_SIZES]
    eng = DynamicEngine(net, "max_prob", 2.0)
    log = []
    _recording(eng, log)
    got = list(eng.stream(_feed(xs, log), batch_size=32))
    eng._segment = DynamicEngine(net, "max_prob", 2.0)._segment
    for g, x in zip(got, xs, strict=True):
        e = eng(x)
        assert (g.exit == 3).all() and all(torch.equal(getattr(g, f), getattr(e, f)) for f in g._fields)
    _assert_full_batches(log, 32, net.num_exits)
    calls = [e[1:] for e in log if e[0] == "call"]
    assert sorted(calls) == sorted([(k, 32) for k in range(4)] * 5 + [(k, 5) for k in range(4)])


def test_stream_edge_cases():
    net = _net()
    eng = DynamicEngine(net, "max_prob", [0.3, 0.5, 0.7])
    assert list(eng.stream([])) == []
    with pytest.raises(ValueError, match="batch_size"):
        eng.stream([torch.randn(4, 1, 8, 8)], batch_size=0)
    # the default batch size is the first batch's; an empty batch gives an empty answer in its place
    xs = [torch.randn(10, 1, 8, 8), torch.randn(0, 1, 8, 8), torch.randn(25, 1, 8, 8)]
    got = list(eng.stream(xs))
    assert [len(g.prediction) for g in got] == [10, 0, 25]
    assert torch.equal(got[2].exit, eng(xs[2]).exit)
    # micro-batches apply to the pooled segments as to any (results do not depend on them)
    micro = list(DynamicEngine(net, "max_prob", [0.3, 0.5, 0.7], micro_batch=7).stream(xs, batch_size=16))
    for m, g in zip(micro, got, strict=True):
        assert torch.equal(m.prediction, g.prediction) and torch.equal(m.exit, g.exit)
    # the graphed loop (buckets): the same, empty batches and an empty stream included
    graphed = DynamicEngine(net, "max_prob", [0.3, 0.5, 0.7], buckets=(4, 16))
    assert list(graphed.stream([])) == [] and not graphed.graphed._pairs
    for m, g in zip(graphed.stream(xs, batch_size=16), got, strict=True):
        assert torch.equal(m.prediction, g.prediction) and torch.equal(m.exit, g.exit)
    assert len(graphed(xs[1]).exit) == 0


def _midpoints(net, x, policy, opts):
    out = net(x)
    cache = CachedOutputs(out.logits, out.gates, torch.zeros(len(x), dtype=torch.long))
    if policy == "patience":
        return torch.tensor([1.0, 1.0, 2.0])
    return gap_thresholds(eenn.policies.policy_scores(policy, cache, **opts).score[:-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("policy, head, net_opts, opts", CASES, ids=lambda c: str(c)[:20])
def test_bucketed_segments_give_the_engines_answers(policy, head, net_opts, opts, fallback, arch):
    """Segments run only at bucket sizes (survivors padded up; CUDA graphs on a GPU): the same
    answers as the eager engine, sample for sample."""
    net = _net(head, arch, **net_opts)
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        th = _midpoints(net, x, policy, opts)
    ref = DynamicEngine(net, policy, th, fallback=fallback, **opts)
    eng = DynamicEngine(net, policy, th, fallback=fallback, buckets=(1, 4, 16), **opts)
    for xb in (x, x[:3], x[:1]):  # more than the largest bucket (pieces), padded, exactly a bucket
        a, b = ref(xb), eng(xb)
        for field in ("prediction", "exit", "depth", "macs"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert {b for _, b in eng.graphed.calls} <= {1, 4, 16} and (0, 16) in eng.graphed.calls
    for i in range(12):  # single samples: the whole loop as one chain of levels (conditional nodes on a GPU)
        a, b = ref(x[i:i + 1]), eng(x[i:i + 1])
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("prediction", "exit", "depth", "macs")), i
    assert eng.graphed.chains == (13 if fallback == "final" else 0)
    with torch.no_grad():
        assert torch.allclose(eng.static(x[:5]), net.backbone(x[:5]), atol=1e-5)


def test_bucketed_segments_refuse_what_they_cannot_do():
    net = _net("linear")
    with pytest.raises(ValueError, match="alternatives"):
        DynamicEngine(net, "max_prob", 0.5, optimize=True, buckets=(1, 8))
    with pytest.raises(ValueError, match="positive batch sizes"):
        DynamicEngine(net, "max_prob", 0.5, buckets=(0, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy, head, net_opts, opts", CASES, ids=lambda c: str(c)[:20])
def test_cuda_graphs_give_the_eager_answers(policy, head, net_opts, opts, arch):
    net = _net(head, arch, **net_opts).cuda()
    x = torch.randn(300, 1, 8, 8, device="cuda")
    with torch.no_grad():
        th = _midpoints(net, x, policy, opts)
    ref = DynamicEngine(net, policy, th, **opts)
    eng = DynamicEngine(net, policy, th, buckets=(1, 16, 64, 256), **opts)
    for xb in (x, x[:50], x[:1], x[:50]):  # the second x[:50] replays the graphs captured by the first
        a, b = ref(xb), eng(xb)
        assert torch.equal(a.exit, b.exit) and torch.equal(a.prediction, b.prediction)
    assert eng.graphed._graphs  # captured, not run eagerly
    for i in range(20):  # single samples: one graph, deeper segments behind conditional nodes
        a, b = ref(x[i:i + 1]), eng(x[i:i + 1])
        assert torch.equal(a.exit, b.exit) and torch.equal(a.prediction, b.prediction), i
    assert eng.graphed.chains >= 20 or not eng.graphed.step_in_graph  # the chain ran (a rule whose step is not captured: per exit)
    pieces = x.split(40)  # re-batched on the GPU: survivors of successive batches pooled, graphs replayed
    for a, b in zip((ref(p) for p in pieces), eng.stream(pieces, batch_size=64), strict=True):
        assert torch.equal(a.exit, b.exit) and torch.equal(a.prediction, b.prediction)
    # Pipelined streams interleaved, and the engine called in between: each replays its own graphs
    for a, b, c in zip((ref(p) for p in pieces), eng.stream(pieces, batch_size=64), eng.stream(pieces[::-1], batch_size=16)):
        d = eng(x[:50])
        assert torch.equal(a.exit, b.exit) and torch.equal(a.prediction, b.prediction)
        assert torch.equal(d.exit, ref(x[:50]).exit)
    assert not eng.graphed._pairs  # both streams gave their graph copies back
    with torch.no_grad():
        assert torch.allclose(eng.static(x[:64]), net.backbone(x[:64]), atol=1e-4)


def test_reduced_precision_and_channels_last_are_checked_on_validation():
    """autocast=bf16 really computes the segments in bf16; channels_last keeps the answers; the
    check compares either with the float32 engine on a validation split."""
    from eenn.deployments import check_precision

    net = _net("linear")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    with torch.no_grad():
        th = _midpoints(net, x, "max_prob", {})
        policy = eenn.ExitPolicy("max_prob", th)
        low = DynamicEngine(net, policy, autocast=torch.bfloat16)
        assert low.forward_segment(0, x[:4], None)[1].dtype == torch.bfloat16
        assert DynamicEngine(net, policy).forward_segment(0, x[:4], None)[1].dtype == torch.float32
    r = check_precision(net, policy, (x, y), autocast=None, channels_last=True)
    assert r["agreement"] == 1.0 and r["held"] and r["accuracy"] == r["float32_accuracy"]
    r = check_precision(net, policy, (x, y), autocast=torch.bfloat16, max_drop=-1.0)  # an impossible goal
    assert not r["held"] and 0.5 < r["agreement"] <= 1.0 and r["autocast"] == "bfloat16"
    assert next(net.parameters()).is_contiguous()  # the check works on a copy: the network is as it was


def test_inputs_are_checked_up_front():
    from torch import nn

    net = _net()  # 1x8x8, no input_spec: the backbone's shape is known
    eng = DynamicEngine(net, "max_prob", [0.3, 0.5, 0.7])
    want = r"DynamicEngine: expected inputs \[B, 1, 8, 8\] \(float model inputs, or uint8 pixels"
    for bad, got in [(torch.randn(4, 3, 8, 8), r"float32 \[4, 3, 8, 8\]"),
                     (torch.randn(4, 1, 28, 28), r"float32 \[4, 1, 28, 28\]"),
                     (torch.zeros(4, 1, 8, 8, dtype=torch.long), r"int64 \[4, 1, 8, 8\]")]:
        with pytest.raises(ValueError, match=want + ".*got " + got):
            eng(bad)
    with pytest.raises(ValueError, match=r"net\(x\): expected inputs \[B, 1, 8, 8\].*preprocess\(x\) first.*got uint8"):
        net(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(eng(x.double().numpy()).exit, eng(x).exit)  # numpy: converted, float64 to the model's float32
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.5,), (0.25,))
    px = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(eng(px.numpy()).exit, eng(px).exit)  # raw pixels, also as a numpy array

    class Tokens(nn.Module):  # token ids of the traced length; floats and other lengths refused
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.out = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, ids):
            return self.out(torch.relu(self.fc(self.emb(ids).mean(1))))

    text = eenn.attach_exits(Tokens(), at="fc", input_shape=(6,), input_dtype=torch.long).eval()
    eng = DynamicEngine(text, "max_prob", 0.5)
    assert len(eng(torch.randint(0, 50, (4, 6))).exit) == 4
    # the sizes of a cut graph are the traced ones (the batch size aside): another length is refused
    with pytest.raises(ValueError, match=r"expected inputs \[B, 6\] \(token ids \(torch.int64\), padded or cut .*got int64 \[2, 9\]"):
        eng(torch.randint(0, 50, (2, 9)))
    with pytest.raises(ValueError, match=r"expected inputs \[B, 6\] \(token ids \(torch.int64\).*got float32"):
        eng(torch.randn(2, 6))
