"""Staged ONNX export: the onnxruntime runner answers as the PyTorch dynamic engine does, sample for
sample, for every policy, fallback and head kind; tuple states of fx-cut models cross the cuts as
several named tensors."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eenn
from eenn.engine import DynamicEngine
from eenn.outputs import CachedOutputs
from eenn.exporter import EXPORT_TOLERANCE, ExportError, StagedRunner, export, load_manifest
from eenn.objectives.ztw import GeometricEnsemble
from eenn.policies import policy_scores
from _helpers import ARCHS, Skip2, gap_thresholds, spread_net


def _net(head="linear", arch="resnet20", **opts):
    return spread_net(head, arch, **opts)


def _midpoint_thresholds(net, x, policy, **opts):
    """Per-exit thresholds across the widest gap between neighbouring sample scores in the middle
    half (_helpers.gap_thresholds), so that no score lies near a threshold, where a 1e-6 difference
    between ONNX and PyTorch could legitimately flip a decision."""
    out = net(x)
    s = policy_scores(policy, CachedOutputs(out.logits, out.gates, torch.zeros(len(x), dtype=torch.long)), **opts)
    if policy == "patience":
        return torch.tensor([0.5, 0.5, 1.5])
    return gap_thresholds(s.score[:-1])


def _assert_same(res, eng):
    assert np.array_equal(res["exit"], eng.exit.numpy())
    assert np.array_equal(res["depth"], eng.depth.numpy())
    assert np.array_equal(res["prediction"], eng.prediction.numpy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export per network and head kind, reused by the policy cases (the runner overrides
    the policy)."""
    out = {}
    for arch in ARCHS:
        for head, opts in [("linear", {}), ("branching", {}), ("sdn", {"head_options": {"cascade": True}})]:
            net = _net(head, arch, **opts)
            d = tmp_path_factory.mktemp(f"{arch}-{head}")
            export(net, d, policy="max_prob", thresholds=0.5)
            out[arch, head] = (net, d)
    return out


CASES = [
    ("max_prob", "linear"), ("entropy", "linear"), ("margin", "linear"), ("patience", "linear"),
    ("gate", "branching"), ("cumulative", "branching"), ("max_prob", "sdn"), ("entropy", "sdn"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("policy, head", CASES)
def test_runner_equals_engine(exported, policy, head, fallback, arch):
    net, d = exported[arch, head]
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        th = _midpoint_thresholds(net, x, policy)
    eng = DynamicEngine(net, policy, th, fallback=fallback)(x)
    res = StagedRunner(d, policy=policy, thresholds=th, fallback=fallback)(x.numpy())
    _assert_same(res, eng)
    if policy != "patience":
        assert 0 < (res["depth"] < 3).sum() < 64  # the case exercises compaction
    # the probabilities are the answering exit's softmax
    with torch.no_grad():
        p = F.softmax(net(x).logits, -1)[torch.as_tensor(res["exit"]), torch.arange(64)]
    assert np.allclose(res["probs"], p.numpy(), atol=1e-5)
    assert not res["degraded"].any()


def test_manifest_and_logit_agreement(exported):
    net, d = exported["resnet20", "linear"]
    m = load_manifest(d)
    assert m["num_exits"] == 4 and m["num_classes"] == 10 and m["input_shape"] == [1, 8, 8]
    assert m["policy"] == {"rule": "max_prob", "thresholds": [0.5] * 3, "fallback": "final", "options": {}}
    assert sum(s["macs"] for s in m["segments"]) == net.cost().dynamic_macs[-1]
    assert [s["cumulative_macs"] for s in m["segments"]] == list(net.cost().dynamic_macs)
    assert m["check"]["max_abs_logit_diff"] <= EXPORT_TOLERANCE
    assert m["segments"][1]["inputs"][0]["shape"] == [None, *net.backbone.stage_info[1].shape]
    # every exit's logits from the chained graphs match PyTorch (nobody exits: threshold above 1)
    x = torch.randn(16, 1, 8, 8)
    r = StagedRunner(d, thresholds=2.0)
    carry = r.start(x.numpy())
    with torch.no_grad():
        ref = net(x).logits[:3]
    for k in range(3):  # one segment at a time: the carry holds the last exit's logits
        _, carry = r.advance(carry, stop=k + 1)
        assert carry.next == k + 1 and len(carry) == 16
        assert np.abs(carry.prev.numpy() - ref[k].numpy()).max() <= EXPORT_TOLERANCE
    json.dumps({k: v for k, v in m.items()})  # plain JSON throughout


def test_infinite_thresholds_are_written_as_strict_json(tmp_path):
    net = _net("linear")
    export(net, tmp_path, policy="max_prob", thresholds=[float("-inf"), 0.5, float("inf")])
    text = (tmp_path / "manifest.json").read_text()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    strict = json.loads(text, parse_constant=refuse)  # what a strict parser (browser, Go, jq) accepts
    assert strict["policy"]["thresholds"] == ["-inf", 0.5, "inf"]
    assert load_manifest(tmp_path)["policy"]["thresholds"] == [float("-inf"), 0.5, float("inf")]
    x = torch.randn(8, 1, 8, 8)
    assert (StagedRunner(tmp_path)(x.numpy())["exit"] == 0).all()  # -inf: everyone leaves at the first exit


def test_ensemble_weights_and_geometric_ensemble_are_exported(tmp_path):
    net = _net()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        th = _midpoint_thresholds(net, x, "ensemble", weights=w)
    export(net, tmp_path / "ens", policy="ensemble", thresholds=th, policy_options={"weights": w})
    eng = DynamicEngine(net, "ensemble", th, weights=w)(x)
    _assert_same(StagedRunner(tmp_path / "ens")(x.numpy()), eng)
    # ZTW: the geometric ensemble is data of the policy, stored in the manifest
    torch.manual_seed(1)
    ens = GeometricEnsemble(4, 10)
    with torch.no_grad():
        ens.weight.normal_(0, 0.5)
        ens.bias.normal_(0, 0.5)
        th = _midpoint_thresholds(net, x, "ensemble", ensemble=ens)
    export(net, tmp_path / "ztw", policy=eenn.policies.ExitPolicy("ensemble", th, ensemble=ens))
    _assert_same(StagedRunner(tmp_path / "ztw")(x.numpy()), DynamicEngine(net, "ensemble", th, ensemble=ens)(x))
    with pytest.raises(ExportError, match="no thresholds"):
        export(net, tmp_path / "none", policy="ensemble", policy_options={"ensemble": ens})
    with pytest.raises(ExportError, match="gated"):
        export(net, tmp_path / "gate", policy="gate")
    for opset in (3, 11, 99, "17"):  # said before any file is written, not after pages of TorchScript IR
        with pytest.raises(ExportError, match=f"opset {opset!r}: the exported graphs need ONNX opset 13"):
            export(net, tmp_path / "opset", policy="max_prob", thresholds=0.9, opset=opset)
    assert not (tmp_path / "opset").exists()


def test_traced_model_hands_on_tuples(tmp_path):
    torch.manual_seed(0)
    net = eenn.attach_exits(Skip2(), at=["relu", "relu_1"], input_shape=(3, 8, 8)).eval()
    m = export(net, tmp_path, policy="max_prob", thresholds=0.5)
    assert [s["num_state_outputs"] for s in m["segments"]] == [2, 2, 0]
    assert [i["name"] for i in m["segments"][1]["inputs"]] == ["state_in_0", "state_in_1"]
    assert m["segments"][0]["handoff_bytes_per_sample"] == 2 * 8 * 8 * 8 * 4
    x = torch.randn(48, 3, 8, 8)
    with torch.no_grad():
        th = _midpoint_thresholds(net, x, "max_prob")
    _assert_same(StagedRunner(tmp_path, thresholds=th)(x.numpy()), DynamicEngine(net, "max_prob", th)(x))


def test_tiers_chain_and_degrade(exported):
    net, d = exported["resnet20", "linear"]
    x = torch.randn(32, 1, 8, 8)
    whole = StagedRunner(d)(x.numpy())
    device, cloud = StagedRunner(d, segments=(0, 2)), StagedRunner(d, segments=(2, 4))
    ans, carry = device.advance(device.start(x.numpy()))
    rest, none = cloud.advance(carry)
    assert none is None
    ans.extend(rest)
    split = ans.ordered(32)
    for key in ("prediction", "exit", "depth"):
        assert np.array_equal(split[key], whole[key])
    # the cloud is gone: the carried samples are answered by exit 1, flagged
    ans, carry = device.advance(device.start(x.numpy()))
    ans.extend(device.degrade(carry))
    out = ans.ordered(32)
    assert (out["exit"][out["degraded"]] == 1).all() and out["degraded"].sum() == len(carry.index) > 0
    with pytest.raises(ExportError, match="holds segments 2..3, the features are for segment 0"):
        cloud.advance(device.start(x.numpy()))


def test_corrupted_segment_is_refused(exported, tmp_path):
    import shutil

    _, d = exported["resnet20", "linear"]
    shutil.copytree(d, tmp_path / "copy")
    with open(tmp_path / "copy" / "segment_2.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(ExportError, match="checksum"):
        StagedRunner(tmp_path / "copy")
    StagedRunner(tmp_path / "copy", segments=(0, 2))  # a tier that does not hold it still loads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy, head", [("max_prob", "linear"), ("entropy", "linear"), ("margin", "linear"),
                                          ("gate", "branching"), ("max_prob", "sdn")])
def test_fused_batch1_graph_answers_as_the_engine(policy, head, tmp_path, arch):
    """At batch 1 the runner makes one call of the fused graph (segments, heads and the rule with
    ONNX If nodes); its answers are the engine's, sample for sample, for any thresholds."""
    net = _net(head, arch, **({"head_options": {"cascade": True}} if head == "sdn" else {}))
    x = torch.randn(48, 1, 8, 8)
    with torch.no_grad():
        th = _midpoint_thresholds(net, x, policy)
    m = export(net, tmp_path, policy=policy, thresholds=th)
    assert m["fused"]["file"] == "fused_batch1.onnx" and m["fused"]["rule"] == policy
    runner = StagedRunner(tmp_path)
    assert runner.fused is not None
    calls = []
    runner._segment = lambda *a: calls.append(a)  # the staged path must not run at batch 1
    ones = [runner(x[i:i + 1].numpy()) for i in range(len(x))]
    assert not calls
    res = {k: np.concatenate([o[k] for o in ones]) for k in ones[0]}
    eng = DynamicEngine(net, policy, th)(x)
    _assert_same(res, eng)
    assert 0 < (res["exit"] < 3).sum() < 48 and len(set(res["exit"].tolist())) >= 3  # every branch is taken
    with torch.no_grad():
        p = F.softmax(net(x).logits, -1)[torch.as_tensor(res["exit"]), torch.arange(48)]
    assert np.allclose(res["probs"], p.numpy(), atol=1e-5)
    # the thresholds are an input of the graph: a runner with other thresholds uses the same file
    other = StagedRunner(tmp_path, thresholds=2.0 if policy != "entropy" else -1.0)
    assert other.fused is not None and int(other(x[:1].numpy())["exit"][0]) == 3
    # the tiers' path (advance) takes the fused graph too, with the same answer
    a, rest = runner.advance(runner.start(x[:1].numpy()))
    assert rest is None and int(a.exit[0][0]) == int(res["exit"][0])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy, head", [("max_prob", "linear"), ("entropy", "linear"), ("margin", "linear"),
                                          ("gate", "branching"), ("max_prob", "sdn")])
def test_fused_any_batch_graph_answers_as_the_engine(policy, head, tmp_path, arch):
    """A batch goes through one call of the any-batch fused graph, which compacts the batch
    inside (the rows that go on are gathered, their deeper answers scattered back); its answers
    are the engine's, sample for sample, in batch order, whatever mix of exits a batch has."""
    net = _net(head, arch, **({"head_options": {"cascade": True}} if head == "sdn" else {}))
    x = torch.randn(48, 1, 8, 8)
    with torch.no_grad():
        th = _midpoint_thresholds(net, x, policy)
    export(net, tmp_path, policy=policy, thresholds=th)
    runner = StagedRunner(tmp_path)
    assert runner.fused_batched is not None
    calls = []
    runner._segment = lambda *a: calls.append(a)  # the segment loop must not run
    for b in (48, 7, 2):  # a batch with every exit, odd sizes, a pair
        res = {k: np.concatenate([runner(c.numpy())[k] for c in x.split(b)]) for k in ("prediction", "exit", "depth",
                                                                                         "probs", "degraded")}
        _assert_same(res, DynamicEngine(net, policy, th)(x))
        assert np.array_equal(res["depth"], res["exit"]) and not res["degraded"].any()
    assert not calls
    assert len(set(res["exit"].tolist())) >= 3
    with torch.no_grad():
        p = F.softmax(net(x).logits, -1)[torch.as_tensor(res["exit"]), torch.arange(48)]
    assert np.allclose(res["probs"], p.numpy(), atol=1e-5)
    # everyone leaves at the first exit / nobody leaves early: both ends of the If chain
    low, high = (-1.0, 10.0) if policy == "entropy" else (-1.0, 2.0)
    assert (StagedRunner(tmp_path, thresholds=high if policy == "entropy" else low)(x.numpy())["exit"] == 0).all()
    assert (StagedRunner(tmp_path, thresholds=low if policy == "entropy" else high)(x.numpy())["exit"] == 3).all()
    # the tiers' path (advance) takes it too
    a, rest = runner.advance(runner.start(x.numpy()))
    out = a.ordered(48)
    assert rest is None and np.array_equal(out["exit"].numpy(), res["exit"])


def test_runner_refuses_inputs_of_another_shape(tmp_path):
    export(_net(), tmp_path, policy="max_prob", thresholds=0.5)
    runner = StagedRunner(tmp_path)
    for bad in (np.zeros((2, 1, 9, 8), np.float32), np.zeros((1, 8, 8), np.float32)):
        with pytest.raises(ExportError, match=r"inputs of shape \[batch, 1, 8, 8\], got"):
            runner(bad)
        with pytest.raises(ExportError, match="pad or resize"):
            runner.start(bad)


def test_fused_graph_only_where_it_applies(tmp_path, monkeypatch):
    net = _net()
    m = export(net, tmp_path / "ens", policy="ensemble", thresholds=0.5, policy_options={"weights": [1.0] * 4})
    assert m["fused"]["file"] is None and "no fused form" in m["fused"]["reason"]
    m = export(net, tmp_path / "sdn", policy="max_prob", thresholds=0.5, fallback="most_confident")
    assert m["fused"]["file"] is None
    export(net, tmp_path / "mp", policy="max_prob", thresholds=0.5)
    assert StagedRunner(tmp_path / "mp").fused is not None
    assert StagedRunner(tmp_path / "mp", policy="entropy", thresholds=1.0).fused is None  # another rule: staged
    assert StagedRunner(tmp_path / "mp", segments=(0, 2)).fused is None  # a tier holding some segments
    # segments sent in memory (a Ray worker without the export directory): built from them alone
    from eenn.staged import read_segments

    m = load_manifest(tmp_path / "mp")
    remote = StagedRunner({k: v for k, v in m.items() if k != "_dir"}, models=read_segments(m, (0, 4)))
    assert remote.fused is not None
    x = torch.randn(1, 1, 8, 8).numpy()
    assert np.array_equal(remote(x)["exit"], StagedRunner(tmp_path / "mp")(x)["exit"])
    # when the build from the segments fails, the exported (portable) graph is used, checked first
    import eenn.staged

    def fail(*a, **k):
        raise RuntimeError("no optimised segments here")

    monkeypatch.setattr(eenn.staged, "_fused_session", fail)
    with pytest.warns(RuntimeWarning, match="using the exported one"):
        assert StagedRunner(tmp_path / "mp").fused is not None
    (tmp_path / "mp" / "fused_batch1.onnx").write_bytes(b"tampered")
    with pytest.raises(ExportError, match="checksum"):
        StagedRunner(tmp_path / "mp")


def test_static_graph_is_the_backbone(tmp_path):
    import onnxruntime as ort

    net = _net()
    m = export(net, tmp_path, policy="max_prob", thresholds=0.5)
    sess = ort.InferenceSession(str(tmp_path / m["static"]["file"]), providers=["CPUExecutionProvider"])
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        want = net.backbone(x).numpy()
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - want).max() <= EXPORT_TOLERANCE


def test_lean_call_answers_as_the_public_run(tmp_path):
    """The runner calls its graphs without onnxruntime's Python wrapper (eenn.staged._caller):
    the same outputs, in the same order, as ``InferenceSession.run``; a session object without
    the binding (another onnxruntime) goes through the public ``run``."""
    import onnxruntime as ort
    from eenn.staged import _caller

    net = _net()
    m = export(net, tmp_path, policy="max_prob", thresholds=0.5)
    sess = ort.InferenceSession(str(tmp_path / m["segments"][0]["file"]), providers=["CPUExecutionProvider"])
    feeds = {"input": torch.randn(3, 1, 8, 8).numpy()}
    want = sess.run(None, feeds)
    assert len(want) == 2
    for got in (_caller(sess)(feeds), _caller(type("Wrapped", (), {"get_outputs": sess.get_outputs, "run": sess.run})())(feeds)):
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_deployments_time_every_path_and_name_the_fastest(tmp_path):
    """eenn.deployments: the static and the early-exit network on every path (each path's two
    runs give the network's own answers), the best of each named, the ratio to the MAC saving."""
    from eenn.deployments import Deployment, deployments, format_deployments, time_deployments

    net = _net()
    x = torch.randn(24, 1, 8, 8)
    with torch.no_grad():
        policy = eenn.ExitPolicy("max_prob", _midpoint_thresholds(net, x, "max_prob"))
        paths = deployments(net, policy)
        names = [p.name for p in paths]
        assert names[:3] == ["PyTorch eager", "PyTorch optimised", "onnxruntime, 1 thread"]
        want = DynamicEngine(net, policy)(x)
        logits = net.backbone(x)
        for p in paths:  # every path computes what it claims to
            early, static = p.early(x), p.static(x)
            exits = early["exit"] if isinstance(early, dict) else early.exit.numpy()
            assert np.array_equal(exits, want.exit.numpy()), p.name
            static = static[0] if isinstance(static, list) else static.numpy()
            assert np.abs(static - logits.numpy()).max() < 1e-3, p.name
        eng, streamed = DynamicEngine(net, policy), []  # a re-batching path gets the whole list of batches
        paths.append(Deployment("re-batched", eng.static, lambda bs: streamed.append(len(bs)) or list(eng.stream(bs)), True))
        names.append("re-batched")
        # 40 asked at batch 8, 24 there: the 24 are timed, and the times divided by 24
        timing = time_deployments(net, policy, x, [1, 8], samples=[6, 40], repeats=1, paths=paths, settle=0.0, warm=0.0)
        with pytest.raises(ValueError, match="one sample count >= 1 per batch size"):
            time_deployments(net, policy, x, [1, 8, 16], samples=[6, 24], repeats=1, paths=paths)
    assert streamed == [6, 6, 3, 3]  # per batch size: the untimed pass and one repeat, each on the whole stream
    assert [r["samples"] for r in timing["rows"]] == [6, 24]
    for r in timing["rows"]:
        best_s = min(r["paths"], key=lambda k: r["paths"][k]["static_ms"])
        best_e = min(r["paths"], key=lambda k: r["paths"][k]["early_ms"])
        assert (r["best_static"], r["best_early"]) == (best_s, best_e) and set(r["paths"]) == set(names)
        assert r["speedup"] == pytest.approx(r["paths"][best_s]["static_ms"] / r["paths"][best_e]["early_ms"])
        assert r["ratio"] == pytest.approx(r["speedup"] / r["mac_speedup"]) and r["mac_speedup"] > 1
    assert format_deployments(timing)[-1] == f"worst ratio over the best static: {timing['worst_ratio']:.2f}"
    assert [p.name for p in deployments(net, policy, paths="eager")] == ["PyTorch eager"]


def test_batch_parallel_answers_as_one_worker(tmp_path):
    """BatchParallel cuts a batch into one contiguous part per worker, runs the parts at once and
    joins the answers in batch order: the same answers as one runner on the whole batch, for the
    staged runner's dict, a session's list and a plain array; short batches and errors too."""
    from eenn.deployments import BatchParallel
    from eenn.staged import _session

    net = _net()
    x = torch.randn(23, 1, 8, 8)
    with torch.no_grad():
        th = _midpoint_thresholds(net, x, "max_prob")
    m = export(net, tmp_path, policy="max_prob", thresholds=th)
    one = StagedRunner(tmp_path)(x.numpy())
    par = BatchParallel([StagedRunner(tmp_path) for _ in range(3)])
    for rows in (23, 2, 1):  # three parts; fewer rows than workers
        got, want = par(x[:rows].numpy()), StagedRunner(tmp_path)(x[:rows].numpy())
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in ("prediction", "exit", "depth"))
        assert np.allclose(got["probs"], want["probs"], atol=1e-6)
    assert len(set(one["exit"].tolist())) >= 2  # parts that leave at different exits
    static = (tmp_path / m["static"]["file"]).read_bytes()
    sessions = BatchParallel([lambda v, s=_session(static, 1): s.run(None, {"input": v}) for _ in range(2)])
    logits = sessions(x.numpy())
    assert isinstance(logits, list) and logits[0].shape == (23, 10)
    assert np.allclose(logits[0], _session(static, 1).run(None, {"input": x.numpy()})[0], atol=1e-6)
    assert np.array_equal(BatchParallel([lambda v: v * 2] * 4)(np.arange(10)), np.arange(10) * 2)

    def fail(v):
        raise ValueError("worker failed")

    with pytest.raises(ValueError, match="worker failed"):
        BatchParallel([lambda v: v, fail])(np.arange(4))
    with pytest.raises(ValueError, match="at least one worker"):
        BatchParallel([])
    sessions.close()
    par.close()


@pytest.mark.parametrize("batched", [False, True])
def test_fused_graph_keeps_each_segments_weights_in_its_branch(tmp_path, batched):
    """Weights held at the top would be outer-scope inputs that every If hands to its branch on
    every call; each segment's weights sit in the (sub)graph that runs it instead."""
    import onnx

    from eenn.fused import fuse_segments

    export(_net(), tmp_path, policy="max_prob", thresholds=0.5)
    m = load_manifest(tmp_path)
    segs = [(tmp_path / s["file"]).read_bytes() for s in m["segments"]]
    g = onnx.load_from_string(fuse_segments(segs, m["segments"], "max_prob", 10, m["opset"], batched=batched)).graph
    depth = 0
    while True:
        names = {t.name.split("/")[0] for t in g.initializer}
        assert names <= {f"s{depth}", "c"} and f"s{depth}" in names, (depth, names)
        deeper = [a.g for n in g.node if n.op_type == "If" for a in n.attribute if a.g.initializer]
        if not deeper:
            break
        (g,) = deeper
        depth += 1
    assert depth == len(segs) - 1


def test_served_whole_the_static_graph_answers(tmp_path):
    """A runner holding the whole model under a policy that lets nobody leave early (thresholds out
    of reach: +inf for max_prob, -inf for entropy) answers through static.onnx, without the exits'
    heads and decisions: the final exit's answers, in one call, on a batch and through
    start/advance (a tier serving the network whole); a policy that can fire goes back to the exits."""
    from eenn.staged import read_segments

    net = _net()
    x = torch.randn(9, 1, 8, 8)
    export(net, tmp_path, policy=eenn.ExitPolicy("max_prob", [math.inf] * (net.num_exits - 1)))
    with torch.no_grad():
        final = net.backbone(x)
    m = load_manifest(tmp_path)
    for runner in (StagedRunner(tmp_path), StagedRunner(m, models=read_segments(m, (0, net.num_exits)))):
        assert runner._static_call is not None
        for out in (runner(x.numpy()), runner.advance(runner.start(x.numpy()))[0].ordered(len(x))):
            out = {k: np.asarray(v) for k, v in out.items()}
            assert np.array_equal(out["prediction"], final.argmax(-1).numpy())
            assert (out["exit"] == net.num_exits - 1).all() and (out["depth"] == net.num_exits - 1).all()
            assert np.abs(out["probs"] - final.softmax(-1).numpy()).max() < 1e-4
        th = _midpoint_thresholds(net, x, "max_prob")
        runner.set_policy("max_prob", th)  # a refit that lets samples leave: the exits answer again
        assert runner._static_call is None
        want = DynamicEngine(net, eenn.ExitPolicy("max_prob", th))(x)
        assert np.array_equal(runner(x.numpy())["exit"], want.exit.numpy())
        runner.set_policy("entropy", -math.inf)
        assert runner._static_call is not None and (runner(x.numpy())["exit"] == net.num_exits - 1).all()
    # a tier holding only some segments, or another fallback, never takes that path
    assert StagedRunner(tmp_path, segments=(0, 2))._static_call is None
    assert StagedRunner(tmp_path, fallback="most_confident")._static_call is None
    (tmp_path / "static.onnx").write_bytes(b"tampered")
    with pytest.raises(ExportError, match="static.onnx does not match its checksum"):
        StagedRunner(tmp_path)


def test_a_network_without_early_exits_calibrates_and_exports(tmp_path):
    """``exits="none"`` (the static network): calibration has nothing to fit, the export is one
    segment without a fused graph, and the runner answers as the network does."""
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits="none").eval()
    x = torch.randn(12, 1, 8, 8)
    with torch.no_grad():
        logits = net(x).logits
    cache = CachedOutputs(logits, None, torch.randint(0, 10, (12,)))
    for goal in ({"max_drop": 0.01}, {"budget": 0.5}, {"msdnet_q": 1.0}, {"max_drop": 0.01, "alpha": 0.1}):
        fitted = eenn.calibrate("max_prob", cache, net.cost(), goal)
        assert fitted.thresholds.numel() == 0, goal
    m = export(net, tmp_path, policy=fitted)
    assert m["num_exits"] == 1 and m["fused"]["file"] is None and "no early exit" in m["fused"]["reason"]
    res = StagedRunner(tmp_path)(x.numpy())
    assert np.array_equal(res["prediction"], logits[-1].argmax(-1).numpy()) and not res["exit"].any()
