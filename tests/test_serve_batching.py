"""Batched tiers: concurrent requests' samples run through a tier's segments together, and each
request still gets exactly its own answers (the dynamic engine's); the plan's per-tier
``replicas``, ``ray_actor_options``, ``max_batch`` and ``batch_wait_ms`` are checked when it is
read and reach the Ray deployments.

The requests are released together by a barrier; a tier's batching window is long (seconds) where
the test needs a batch to fill, which it does as soon as every expected sample has arrived."""
import asyncio
from dataclasses import replace
import threading

import numpy as np
import pytest
import torch

from _helpers import npy_bytes as _npy, post, spread_net as _net
from eenn.engine import DynamicEngine
from eenn.exporter import export, load_manifest
from eenn.outputs import CachedOutputs
from eenn.policies import policy_scores
from eenn.serve import LocalServer, TierPlan
from eenn.serve.plan import TierSpec
from eenn.serve.local import LocalPipeline
from eenn.serve.tiers import BatchWindow, Tier, build_response, start_message

SIZES = [1, 2, 3, 1, 2, 1, 3, 1, 1, 2, 1, 3, 1, 1, 2, 3]  # samples per request: 28 in all
N = sum(SIZES)
TIER_OF = {0: "device", 1: "device", 2: "edge", 3: "cloud"}


def _midpoint_thresholds(net, x):
    """Per-exit max_prob thresholds halfway between the two neighbouring sample scores with the
    widest gap in the middle third, so that no score lies near a threshold (where the 1e-6
    difference between ONNX and PyTorch logits could flip a decision)."""
    out = net(x)
    s = policy_scores("max_prob", CachedOutputs(out.logits, out.gates, torch.zeros(len(x), dtype=torch.long)))
    srt = s.score[:-1].sort(1).values
    lo, hi = srt.shape[1] // 3, 2 * srt.shape[1] // 3
    gaps = srt[:, lo + 1:hi + 1] - srt[:, lo:hi]
    at = lo + gaps.argmax(1)
    rows = torch.arange(len(srt))
    return ((srt[rows, at] + srt[rows, at + 1]) / 2).tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    net = _net()
    torch.manual_seed(1)
    x = torch.randn(N, 1, 8, 8)
    th = _midpoint_thresholds(net, x)
    d = tmp_path_factory.mktemp("export")
    export(net, d, policy="max_prob", thresholds=th)
    with torch.no_grad():
        eng = DynamicEngine(net, "max_prob", th)(x)
    assert len(set(eng.exit.tolist())) >= 3  # several tiers answer
    return net, d, x, eng


def _plan(d, device=None, edge=None, cloud=None, **kw):
    return TierPlan.from_dict({"model": str(d), "tiers": [{"name": "device", "segments": "0-1", **(device or {})},
                                                          {"name": "edge", "segments": 2, **(edge or {})},
                                                          {"name": "cloud", "segments": "rest", **(cloud or {})}],
                               **kw})


def _together(fns, timeout=120):
    """Run ``fns`` in threads released at once by a barrier; their results in order."""
    barrier = threading.Barrier(len(fns))
    results = [None] * len(fns)
    errors = []

    def run(i):
        try:
            barrier.wait(timeout=timeout)
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a request never came back"
    assert not errors, errors
    return results


RAY_SIZES = [1, 2, 3, 2, 12]  # samples per request to a Ray tier of max_batch 8: 8 fill a batch; the 12 run alone


def _at_once(tier, m, x, sizes):
    """The replies of a Ray tier (called in-process) to pieces of ``x`` of ``sizes`` samples,
    each its own request, all sent at once."""
    starts = np.cumsum([0, *sizes])

    async def main():
        return await asyncio.gather(*[tier(start_message(m, x[a:b].numpy()))
                                      for a, b in zip(starts[:-1], starts[1:])])

    return asyncio.run(main())


def _check_rows(rows, eng, lo):
    for j, r in enumerate(rows):
        assert (r["class"], r["exit"]) == (int(eng.prediction[lo + j]), int(eng.exit[lo + j]))
        assert r["tier"] == TIER_OF[int(eng.exit[lo + j])] and not r["degraded"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(model):
    net, d, x, eng = model
    # device: one batch of every sample (its window is long and ends when N samples are in);
    # edge: at most 4 samples a run (a larger message runs alone, as on Ray); cloud: no batching
    plan = _plan(d, device={"max_batch": N, "batch_wait_ms": 20_000}, edge={"max_batch": 4, "batch_wait_ms": 50})
    pipe = LocalPipeline(plan)
    try:
        m = pipe.manifest
        starts = np.cumsum([0, *SIZES])
        msgs = [start_message(m, x[a:b].numpy()) for a, b in zip(starts[:-1], starts[1:])]
        replies = _together([lambda msg=msg: pipe(msg) for msg in msgs])
        unbatched = LocalPipeline(_plan(d))
        alone = [unbatched(msg) for msg in msgs]  # one request at a time, no batching: what it gets alone
        unbatched.close()
        for (a, b), reply, single in zip(zip(starts[:-1], starts[1:]), replies, alone):
            out = build_response(m, reply, b - a, 0.0, False)
            _check_rows(out["predictions"], eng, a)
            ref = build_response(m, single, b - a, 0.0, False)["predictions"]
            assert [(r["class"], r["exit"]) for r in out["predictions"]] == [(r["class"], r["exit"]) for r in ref]
            assert np.allclose([r["probabilities"] for r in out["predictions"]],
                               [r["probabilities"] for r in ref], atol=1e-5)
            assert reply["tiers"][0]["samples"] == b - a
        device, edge, cloud = (list(b.sizes) for b in pipe.batchers)
        n_edge, n_cloud = int((eng.exit >= 2).sum()), int((eng.exit == 3).sum())
        # the device ran every request's samples at once, and each reply says so
        assert device == [N] and all(r["tiers"][0]["batch"] == N for r in replies)
        # the device run's survivors went on as one message, and so did the edge's: one run each
        assert edge == [n_edge] and cloud == [n_cloud] and n_edge > 4
        assert all(r["tiers"][1]["batch"] == n_edge for r in replies if len(r["tiers"]) > 1)
        print(f"batch sizes: device {device}, edge {edge}, cloud {cloud}")
    finally:
        pipe.close()


def test_a_tier_runs_at_most_max_batch_samples(model):
    _, d, x, eng = model
    pipe = LocalPipeline(_plan(d, device={"max_batch": 4, "batch_wait_ms": 20_000}))
    try:
        m = pipe.manifest
        replies = _together([lambda i=i: pipe(start_message(m, x[i:i + 1].numpy())) for i in range(8)])
        assert list(pipe.batchers[0].sizes) == [4, 4]  # full batches go at once; 8 single samples make two
        big = pipe(start_message(m, x[8:14].numpy()))  # more than max_batch: runs alone, at once
        assert list(pipe.batchers[0].sizes) == [4, 4, 6] and big["tiers"][0]["batch"] == 6
        for i, reply in enumerate(replies):
            _check_rows([build_response(m, reply, 1, 0.0, True)], eng, i)
        _check_rows(build_response(m, big, 6, 0.0, False)["predictions"], eng, 8)
    finally:
        pipe.close()


@pytest.mark.parametrize("max_batch", [2, 1])
def test_in_process_replicas_run_batches_at_once(model, monkeypatch, max_batch):
    """In-process, a tier's ``replicas`` are worker threads (callers, without batching) that run
    batches at the same time, as Ray runs replicas: each of two batches waits inside the tier
    for the other to be running too, which one worker alone would never let happen."""
    _, d, x, eng = model
    wait = {"max_batch": max_batch, "batch_wait_ms": 20_000} if max_batch > 1 else {}
    pipe = LocalPipeline(_plan(d, device={**wait, "replicas": 2}))
    try:
        m, tier = pipe.manifest, pipe.tiers[0]
        both_in = threading.Barrier(2, timeout=60)
        runs, real = [], tier.run_many

        def meeting(runnings, waits=None):
            if len(runs) < 2:
                runs.append(len(runnings))
                both_in.wait()  # BrokenBarrierError after 60 s if the other batch cannot start
            return real(runnings, waits)

        monkeypatch.setattr(tier, "run_many", meeting)
        n = 2 * max_batch
        replies = _together([lambda i=i: pipe(start_message(m, x[i:i + 1].numpy())) for i in range(n)])
        assert runs == [max_batch, max_batch]
        for i, reply in enumerate(replies):
            _check_rows([build_response(m, reply, 1, 0.0, True)], eng, i)
    finally:
        pipe.close()


def test_a_replica_computes_on_the_cpus_it_reserves(model):
    """In-process, a tier planned as one replica with 1.6 CPUs runs onnxruntime on 2 threads
    (one thread would leave the reserved second core idle); a tier with less than a core keeps
    the plan's ``threads``; answers do not change."""
    _, d, x, eng = model
    plan = _plan(d, device={"ray_actor_options": {"num_cpus": 1.6}}, edge={"ray_actor_options": {"num_cpus": 0.25}})
    assert [t.threads(plan.threads) for t in plan.tiers] == [2, 1, 1]
    assert plan.tiers[0].threads(3) == 3  # the plan's own threads when they are more
    pipe = LocalPipeline(plan)
    try:
        threads = [[s.get_session_options().intra_op_num_threads for s in t.runner.sessions.values()]
                   for t in pipe.tiers]
        assert threads == [[2, 2], [1], [1]]
        reply = pipe(start_message(pipe.manifest, x[:N].numpy()))
        _check_rows(build_response(pipe.manifest, reply, N, 0.0, False)["predictions"], eng, 0)
    finally:
        pipe.close()


def test_a_batched_tier_degrades_each_request_when_the_next_fails(model, monkeypatch):
    net, d, x, eng = model
    n_edge = int((eng.exit >= 2).sum())
    pipe = LocalPipeline(_plan(d, edge={"max_batch": n_edge, "batch_wait_ms": 20_000}))
    try:

        def broken(runnings, waits=None):
            raise ConnectionError("cloud is down")

        monkeypatch.setattr(pipe.tiers[2], "run_many", broken)
        m = pipe.manifest
        idx = [i for i in range(N) if eng.exit[i] >= 2]  # single-sample requests that all reach the edge
        replies = _together([lambda i=i: pipe(start_message(m, x[i:i + 1].numpy())) for i in idx])
        assert list(pipe.batchers[1].sizes) == [n_edge]  # all of them in one edge run
        for i, reply in zip(idx, replies):
            row = build_response(m, reply, 1, 0.0, True)
            if eng.exit[i] == 2:
                assert (row["exit"], row["class"], row["degraded"]) == (2, int(eng.prediction[i]), False)
            else:  # the edge's exit answers, flagged
                assert (row["exit"], row["tier"], row["degraded"]) == (2, "edge", True)
                assert "cloud is down" in row["errors"][0]
    finally:
        pipe.close()


def test_local_server_batches_concurrent_http_requests(model):
    net, d, x, eng = model
    n = 8
    with LocalServer(_plan(d, device={"max_batch": n, "batch_wait_ms": 20_000})) as url:
        outs = _together([lambda i=i: post(url, _npy(x[i].numpy())) for i in range(n)])
    for i, (status, out) in enumerate(outs):
        assert status == 200, out
        _check_rows([out], eng, i)
        assert out["batch_samples"]["device"] == n  # all eight ran through the device together


def _hold_first_tier(monkeypatch, pipe):
    """Make the first tier's runs wait, once started, until the test lets them: returns the
    events ``entered`` (a run has started) and ``release`` (set by the test)."""
    entered, release = threading.Event(), threading.Event()
    run_many = pipe.tiers[0].run_many

    def held(runnings, waits=None):
        entered.set()
        assert release.wait(60)
        return run_many(runnings, waits)

    monkeypatch.setattr(pipe.tiers[0], "run_many", held)
    return entered, release


def test_quiesced_waits_for_requests_in_flight(model, monkeypatch):
    _, d, x, _ = model
    pipe = LocalPipeline(_plan(d))
    entered, release = _hold_first_tier(monkeypatch, pipe)
    done = threading.Event()
    msg = start_message(pipe.manifest, x[:2].numpy())
    th = threading.Thread(target=pipe, args=(msg,))
    th.start()
    assert entered.wait(60)

    def hold():
        with pipe.quiesced():
            done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    with pipe._cv:  # the holder has closed the door and waits for the request in flight
        assert pipe._cv.wait_for(lambda: pipe._held, 60)
    assert not done.is_set() and pipe._in_flight == 1
    release.set()
    assert done.wait(60)
    th.join(60)
    holder.join(60)
    pipe.close()


def test_a_batch_window_follows_the_arrivals():
    w = BatchWindow(0.01, max_batch=8)
    # lone requests: the window halves, then closes under a tenth of the plan's
    assert [(w.observe([5.0], 1), w.wait_s) for _ in range(4)] == [(True, 0.005), (True, 0.0025), (True, 0.00125),
                                                                   (True, 0.0)]
    assert not w.observe([5.0], 1) and w.wait_s == 0.0
    # two queued while a batch ran, 1 ms apart: open again, twice that; arrivals late in it: it doubles
    assert w.observe([5.0, 5.001], 2) and w.wait_s == pytest.approx(0.002)
    assert w.observe([5.0, 5.0015], 2) and w.wait_s == pytest.approx(0.004)
    assert w.observe([5.0, 5.003], 2) and w.wait_s == pytest.approx(0.008)
    assert w.observe([5.0, 5.0079], 2) and w.wait_s == 0.01  # up to the plan's, no more
    assert not w.observe([5.0, 5.0099], 2) and w.wait_s == 0.01
    # every arrival within 0.3 ms of the first: halves, but stays twice that span
    assert [(w.observe([5.0, 5.0002, 5.0003], 3), round(w.wait_s, 6)) for _ in range(4)] == [
        (True, 0.005), (True, 0.0025), (True, 0.00125), (True, 0.0006)]
    assert not w.observe([5.0] * 8, 8) and w.wait_s == pytest.approx(0.0006)  # a full batch: no change
    fixed = BatchWindow(0.01, max_batch=8, adaptive=False)
    assert not any(fixed.observe([5.0], 1) for _ in range(10)) and fixed.wait_s == 0.01
    none = BatchWindow(0.0, max_batch=8)
    assert not any(none.observe([5.0, 5.001], 2) for _ in range(3)) and none.wait_s == 0.0


@pytest.mark.parametrize("adaptive", [True, False])
def test_one_client_stops_waiting_out_the_batching_window(model, monkeypatch, adaptive):
    """A window sized for many clients only delays one client that waits for each answer: in-process,
    each lone request halves it (with ``adaptive_wait: false`` every one waits it out) until it
    closes and the next ones run at once. Requests that queue while a batch runs open it again,
    and every answer stays the engine's."""
    _, d, x, eng = model
    wait_s = 0.2
    pipe = LocalPipeline(_plan(d, device={"max_batch": 8, "batch_wait_ms": wait_s * 1000, "adaptive_wait": adaptive}))
    batcher = pipe.batchers[0]
    try:
        msg = lambda i: start_message(pipe.manifest, x[i:i + 1].numpy())
        replies = [pipe(msg(i)) for i in range(5)]
        waits = [r["tiers"][0]["wait_s"] for r in replies]
        for i, r in enumerate(replies):
            _check_rows(build_response(pipe.manifest, r, 1, 0.0, False)["predictions"], eng, i)
        if not adaptive:
            assert all(w >= wait_s for w in waits) and batcher.window.wait_s == wait_s, waits
            return
        # the windows were 200, 100, 50 and 25 ms, then none
        assert all(w >= wait_s / 2 ** k for k, w in enumerate(waits[:4])) and waits[4] < wait_s / 8, waits
        assert batcher.window.wait_s == 0.0

        # two requests queue while a third runs: they run together, and the window opens again
        entered, release = _hold_first_tier(monkeypatch, pipe)
        out = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, pipe(msg(i)))) for i in (5, 6, 7)]
        threads[0].start()
        assert entered.wait(60)
        for t in threads[1:]:
            t.start()
        with batcher._cv:
            assert batcher._cv.wait_for(lambda: len(batcher._queue) == 2, 60)
        release.set()
        for t in threads:
            t.join(60)
        assert [out[i]["tiers"][0]["batch"] for i in (5, 6, 7)] == [1, 2, 2] and batcher.window.wait_s > 0
        for i in (5, 6, 7):
            _check_rows(build_response(pipe.manifest, out[i], 1, 0.0, False)["predictions"], eng, i)
    finally:
        pipe.close()


# ------------------------------------------------------------------------------------ the plan
def test_plan_tier_options_parse_and_round_trip(model, tmp_path):
    _, d, _, _ = model
    p = _plan(d)
    assert [(t.replicas, t.max_batch, t.batch_wait_ms, t.ray_actor_options) for t in p.tiers] == [(1, 1, 0.0, {})] * 3
    f = tmp_path / "plan.yaml"
    f.write_text(f"model: {d}\ntiers:\n"
                 "  - {name: device, segments: '0-1', max_batch: 16, batch_wait_ms: 2.5, adaptive_wait: false}\n"
                 "  - {name: edge, segments: 2, replicas: 3, ray_actor_options: {num_cpus: 1, num_gpus: 0,"
                 " resources: {edge: 0.01}}}\n"
                 "  - {name: cloud, segments: rest}\n")
    p = TierPlan.load(f)
    dev, edge, cloud = p.tiers
    assert (dev.max_batch, dev.batch_wait_ms, dev.replicas, dev.adaptive_wait) == (16, 2.5, 1, False)
    assert edge.adaptive_wait and cloud.adaptive_wait  # the default
    assert edge.replicas == 3 and edge.ray_actor_options == {"num_cpus": 1, "num_gpus": 0, "resources": {"edge": 0.01}}
    d2 = p.to_dict()
    assert d2["tiers"][0] == {"name": "device", "segments": "0-1", "max_batch": 16, "batch_wait_ms": 2.5,
                              "adaptive_wait": False}
    assert d2["tiers"][2] == {"name": "cloud", "segments": "3-3"}
    back = TierPlan.from_dict(d2)
    assert back.tiers == p.tiers


BAD_TIERS = [
    ({"replica": 2}, "unknown keys replica"),
    ({"replicas": 0}, "`replicas` must be an integer >= 1, got 0"),
    ({"replicas": "2"}, "`replicas` must be an integer >= 1, got '2'"),
    ({"replicas": True}, "`replicas` must be an integer >= 1"),
    ({"max_batch": 0}, "`max_batch` must be an integer >= 1"),
    ({"max_batch": 2.5}, "`max_batch` must be an integer >= 1, got 2.5"),
    ({"batch_wait_ms": -1}, "`batch_wait_ms` must be a number of milliseconds >= 0"),
    ({"batch_wait_ms": "5ms"}, "`batch_wait_ms` must be a number"),
    ({"ray_actor_options": [1]}, "`ray_actor_options` must be a mapping"),
    ({"ray_actor_options": {"cpus": 1}}, "unknown ray_actor_options cpus"),
    ({"ray_actor_options": {"num_gpus": -1}}, "`num_gpus` must be a number >= 0"),
    ({"ray_actor_options": {"resources": {"edge": "x"}}}, "`resources` must map resource names"),
    ({"with_front": True}, "only the first tier can run `with_front`"),
    ({"adaptive_wait": "no"}, "`adaptive_wait` must be true or false, got 'no'"),
]


@pytest.mark.parametrize("options, message", BAD_TIERS, ids=[b[1] for b in BAD_TIERS])
def test_plan_tier_options_are_checked(model, options, message):
    _, d, _, _ = model
    with pytest.raises(ValueError, match="tier 'edge'") as e:
        _plan(d, edge=options)
    assert message in str(e.value)


BAD_PLANS = [
    ({"max_batch": 0}, "plan `max_batch` must be an integer >= 1 (the most samples one request may carry), got 0"),
    ({"max_body_bytes": -1}, "plan `max_body_bytes` must be an integer >= 1"),
    ({"timeout_s": "abc"}, "plan `timeout_s` must be a number of seconds > 0 (how long a tier waits for the next "
                           "one), got 'abc'"),
    ({"threads": 0}, "plan `threads` must be an integer >= 1 (onnxruntime threads per tier), got 0"),
    ({"float16": "no"}, "plan `float16` must be true or false, got 'no'"),
    ({"links": [{"bw": 1}]}, "plan `links` entry 0 must be {bandwidth: BYTES_PER_S, latency_s: SECONDS}, got {'bw': 1}"),
    ({"links": [{"bandwidth": 1e6, "latency_s": 0}, {"bandwidth": 0, "latency_s": 0}]},
     "plan `links` entry 1: link `bandwidth` must be a number of bytes per second > 0, got 0"),
    ({"links": [{"bandwidth": 1e6, "latency_s": 0}]}, "plan `links`: 3 tiers need 2 links"),
    ({"tiers": []}, "plan `tiers` must list at least one tier"),
    ({"model": None}, "plan `model` must be the export directory (a path), got None"),
    ({"replicas": 2}, "unknown plan keys: replicas (a plan takes float16, links, "),
]


@pytest.mark.parametrize("keys, message", BAD_PLANS, ids=[b[1][:40] for b in BAD_PLANS])
def test_plan_wide_keys_are_checked(model, keys, message):
    _, d, _, _ = model
    with pytest.raises(ValueError) as e:
        TierPlan.from_dict({**_plan(d).to_dict(), **keys})
    assert message in str(e.value)


def test_plan_files_that_cannot_be_read_say_where(tmp_path):
    for name, text, message in [
            ("empty.yaml", "", "empty.yaml is empty: a plan needs `model` (an export directory) and `tiers`"),
            ("broken.yaml", "model: export\ntiers: [{name: a, segments: rest}\n",
             "broken.yaml: not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>' (while "
             "parsing a flow sequence that begins at line 2, column 8)"),
            ("broken.json", '{"model": "export",\n', "broken.json: not valid JSON at line 2, column 1: Expecting"),
            ("list.yaml", "- a\n", "list.yaml: a plan is a mapping with `model` (an export directory) and `tiers`, got list")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            TierPlan.load(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path}/{name}") and message in str(e.value) and "\n" not in str(e.value)
    # 1e6 reads as a number, as in YAML 1.2 (YAML 1.1 wants 1.0e+6)
    (tmp_path / "links.yaml").write_text(f"model: {tmp_path}\ntiers: []\nlinks: [{{bandwidth: 1e6, latency_s: 1e-3}}]\n")
    with pytest.raises(ValueError, match="`tiers` must list at least one tier"):
        TierPlan.load(tmp_path / "links.yaml")


# ------------------------------------------------------------------------------------ Ray Serve
def _batch_in_test_loop(monkeypatch, deployment):
    """Let ``deployment``'s ``serve.batch`` method run in a plain event loop, no cluster: its
    warning that max_batch_size exceeds max_ongoing_requests (raised through the replica
    context, absent here) is silenced, and the object the class's batch queue (bound to one
    event loop) and limits live in is restored afterwards, or the class could no longer be
    pickled for a real deployment later. Returns that object."""
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    shared = deployment.func_or_class._run.set_max_batch_size.__self__
    monkeypatch.setattr(shared, "__dict__", dict(shared.__dict__))
    return shared


class _Response:
    """What a deployment handle's ``.remote()`` gives: awaitable and cancellable."""

    def __init__(self, coro):
        self.coro = coro

    def __await__(self):
        return self.coro.__await__()

    def cancel(self):
        self.coro.close()


def _device_before_cloud(m, before, timeout_s: float, **settings):
    """A device tier replica (segments 0-1, the Ray deployment's class called in-process) whose
    next tier is a plain cloud :class:`Tier` behind a stand-in handle: every call to it is recorded
    in ``calls`` and awaits ``before()`` (which raises, as a dead replica, or waits, as a slow one)
    before the cloud answers. ``settings``: more of the deployment's settings (``batch_wait_ms``
    and ``max_batch`` go to its spec). Returns ``(device, calls)``. (The serve.batch queue is the class's:
    one tier class per process, so the next tier is not another deployment instance.)"""
    from eenn.serve import ray_app
    from eenn.staged import read_segments

    E = m["num_exits"]
    cloud = Tier(m, TierSpec("cloud", 2, E), models=read_segments(m, (2, E)))
    calls = []

    class Handle:
        def remote(self, message):
            calls.append(message)

            async def answer():
                await before()
                reply, carry = cloud.begin(message)
                assert carry is None
                return reply

            return _Response(answer())

    spec = {"name": "device", "start": 0, "stop": 2, "max_batch": settings.pop("max_batch", N),
            "batch_wait_ms": settings.pop("batch_wait_ms", 20_000)}
    device = ray_app.TierDeployment.func_or_class(
        m, spec,
        read_segments(m, (0, 2)), Handle(), {"float16": False, "threads": 1, "timeout_s": timeout_s,
                                             "next_name": "cloud", **settings})
    return device, calls


def _spans_and_late(eng):
    """The sample ranges of the requests of ``SIZES``, and the requests with samples that the
    engine takes past the device tier (segments 0-1)."""
    starts = np.cumsum([0, *SIZES])
    spans = list(zip(starts[:-1], starts[1:]))
    return spans, [i for i, (a, b) in enumerate(spans) if any(e >= 2 for e in eng.exit[a:b].tolist())]


def _first_then_rest(device, m, x, spans, late, calls, between=None):
    """Send the first request of ``late`` to ``device`` and, once its hand-off is under way
    (``calls`` has it), every other request of ``spans``; then await ``between()``, if given, and
    every reply. Returns the replies in request order."""

    async def main():
        send = lambda i: asyncio.ensure_future(device(start_message(m, x[spans[i][0]:spans[i][1]].numpy())))
        tasks = {late[0]: send(late[0])}
        while not calls:  # the first request's survivors are on their way
            await asyncio.sleep(0)
        tasks.update({i: send(i) for i in range(len(spans)) if i != late[0]})
        if between is not None:
            await between()
        return await asyncio.gather(*[tasks[i] for i in range(len(spans))])

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_ray_deployments_take_replicas_options_and_batches(model, monkeypatch):
    """The deployments ``build_app`` makes carry the plan's replicas and actor options; a tier
    replica's ``serve.batch`` (run here in a plain event loop, no cluster) gathers concurrent
    requests' samples up to ``max_batch``, a larger request alone, and answers each its own."""
    from eenn.serve import ray_app
    from eenn.staged import read_segments

    _, d, x, eng = model
    plan = _plan(d, edge={"replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "max_batch": 8,
                          "batch_wait_ms": 20_000})
    ingress = ray_app.build_app(plan)._bound_deployment
    device = ingress.init_args[2]._bound_deployment
    edge = device.init_args[3]._bound_deployment
    assert (device.name, device.num_replicas, device.ray_actor_options) == ("tier-device", 1, {"num_cpus": 0})
    assert (edge.name, edge.num_replicas, edge.ray_actor_options) == ("tier-edge", 2, {"num_cpus": 0.5})

    _batch_in_test_loop(monkeypatch, ray_app.TierDeployment)
    m = load_manifest(d)
    spec = {"name": "all", "start": 0, "stop": m["num_exits"], "max_batch": 8, "batch_wait_ms": 20_000}
    tier = ray_app.TierDeployment.func_or_class(m, spec, read_segments(m, (0, m["num_exits"])), None,
                                                {"float16": False, "threads": 1, "timeout_s": 1.0})
    sizes = RAY_SIZES
    starts = np.cumsum([0, *sizes])
    replies = _at_once(tier, m, x, sizes)
    assert [r["tiers"][0]["batch"] for r in replies] == [8, 8, 8, 8, 12]
    for (a, b), reply in zip(zip(starts[:-1], starts[1:]), replies):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        assert [(r["class"], r["exit"]) for r in rows] == list(zip(eng.prediction[a:b].tolist(),
                                                                   eng.exit[a:b].tolist()))


def test_ray_tier_hands_a_batchs_survivors_on_as_one_message(model, monkeypatch):
    """A Ray tier replica runs the requests ``serve.batch`` gathered, then sends the survivors of
    all of them to the next tier in one call (not one per request) and splits the reply back: each
    request still gets exactly its own answers, and a failing next tier degrades each of them."""
    from eenn.serve import ray_app

    _, d, x, eng = model
    shared = _batch_in_test_loop(monkeypatch, ray_app.TierDeployment)
    m = load_manifest(d)
    broken = []

    async def before():
        if broken:
            raise RuntimeError("replica died")

    device, calls = _device_before_cloud(m, before, timeout_s=5.0)
    starts = np.cumsum([0, *SIZES])
    replies = _at_once(device, m, x, SIZES)
    assert len(calls) == 1  # one batch of every request, its survivors in one message
    for (a, b), reply in zip(zip(starts[:-1], starts[1:]), replies):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        assert [(r["class"], r["exit"]) for r in rows] == list(zip(eng.prediction[a:b].tolist(),
                                                                   eng.exit[a:b].tolist()))
        assert [r["tier"] for r in rows] == ["device" if e < 2 else "cloud" for e in eng.exit[a:b].tolist()]
        if any(e >= 2 for e in eng.exit[a:b].tolist()):
            assert [h["from"] for h in reply["hops"]] == ["device"] and reply["hops"][0]["bytes"] > 0
    broken.append(True)
    shared._queue = None  # the queue belongs to the event loop that made it: a new one for the new loop
    replies = _at_once(device, m, x, SIZES)
    assert len(calls) == 2
    for (a, b), reply in zip(zip(starts[:-1], starts[1:]), replies):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        for r, e, c in zip(rows, eng.exit[a:b].tolist(), eng.prediction[a:b].tolist()):
            if e < 2:
                assert (r["class"], r["exit"], r["degraded"]) == (c, e, False)
            else:  # answered by the device's deepest exit, flagged
                assert r["exit"] == 1 and r["degraded"] and r["tier"] == "device"
        if any(e >= 2 for e in eng.exit[a:b].tolist()):
            assert "replica died" in reply["errors"][0]


def test_ray_tier_answers_early_exits_without_waiting_for_the_next_tier(model, monkeypatch):
    """A Ray tier replica answers the requests whose samples all exited there as soon as its batch
    is done, as the in-process queue does; those with survivors wait for the next tier. Here the
    next tier holds its reply until the test opens a gate: the early requests must be answered
    while it is closed, the others only after."""
    from eenn.serve import ray_app

    _, d, x, eng = model
    _batch_in_test_loop(monkeypatch, ray_app.TierDeployment)
    m = load_manifest(d)
    spans, late = _spans_and_late(eng)
    early = [i for i in range(len(spans)) if i not in late]
    assert early and late  # the thresholds send some requests on and answer others at the device
    gate = asyncio.Event()
    device, calls = _device_before_cloud(m, gate.wait, timeout_s=60.0)

    async def main():
        tasks = [asyncio.ensure_future(device(start_message(m, x[a:b].numpy()))) for a, b in spans]
        # the guard only turns a regression (early requests held by the hop) into a failure, not a hang
        done, _ = await asyncio.wait([tasks[i] for i in early], timeout=60)
        assert len(done) == len(early), "requests answered at the device waited for the next tier"
        assert not any(tasks[i].done() for i in late) and len(calls) == 1  # the survivors: one message, held
        gate.set()
        return await asyncio.gather(*tasks)

    replies = asyncio.run(main())
    for (a, b), reply in zip(spans, replies):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        assert [(r["class"], r["exit"], r["degraded"]) for r in rows] == [
            (c, e, False) for c, e in zip(eng.prediction[a:b].tolist(), eng.exit[a:b].tolist())]


@pytest.mark.parametrize("cap", [None, 4])
def test_ray_tier_sends_survivors_gathered_during_a_hop_together(model, monkeypatch, cap):
    """A Ray Serve call costs the cores the same whatever it carries, so a tier has at most one
    hop per replica of the next tier under way: the survivors of batches that end meanwhile wait
    and go together in the next call (at most the next tier's ``max_batch`` samples a call, whole
    requests), and each request still gets exactly its own answers."""
    from eenn.serve import ray_app
    from eenn.policies.loop import Running
    from eenn.serve.codec import decode

    _, d, x, eng = model
    _batch_in_test_loop(monkeypatch, ray_app.TierDeployment)
    m = load_manifest(d)
    spans, late = _spans_and_late(eng)
    gate = asyncio.Event()
    # batches of at most 4 samples: the requests sent after the first run in several batches
    device, calls = _device_before_cloud(m, gate.wait, timeout_s=60.0, max_batch=4, batch_wait_ms=0,
                                         next_replicas=1, next_max_batch=cap or N)
    survivors = lambda i: sum(e >= 2 for e in eng.exit[spans[i][0]:spans[i][1]].tolist())
    carried = lambda: (sum(len(c) for _, c, _, _ in device._outbox)
                       + sum(len(Running.from_arrays(*decode(c))) for c in calls[1:]))

    async def held():  # the first hop held: every other batch runs, and its survivors wait
        while carried() < sum(survivors(i) for i in late[1:]):
            await asyncio.sleep(0)
        assert len(calls) == 1 and len(device._outbox) == len(late) - 1
        gate.set()

    replies = _first_then_rest(device, m, x, spans, late, calls, held)
    sent = [len(Running.from_arrays(*decode(c))) for c in calls]
    assert sent[0] == survivors(late[0]) and sum(sent) == sum(survivors(i) for i in late)
    if cap is None:
        assert len(calls) == 2  # everything gathered during the first hop went in one call
    else:
        assert len(calls) > 2 and all(n <= max(cap, max(survivors(i) for i in late)) for n in sent[1:])
    for (a, b), reply in zip(spans, replies):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        assert [(r["class"], r["exit"], r["degraded"]) for r in rows] == [
            (c, e, False) for c, e in zip(eng.prediction[a:b].tolist(), eng.exit[a:b].tolist())]


def test_ray_tier_counts_the_wait_for_a_hop_against_the_timeout(model, monkeypatch):
    """Survivors that wait in the outbox behind a hop to a hung tier do not get a whole timeout of
    their own after it: the time waited counts, so every request is answered (degraded, flagged)
    within about one timeout, before the tiers upstream give up on it."""
    from eenn.serve import ray_app, ray_tiers

    _, d, x, eng = model
    _batch_in_test_loop(monkeypatch, ray_app.TierDeployment)
    waits, within = [], ray_tiers._within
    monkeypatch.setattr(ray_tiers, "_within", lambda response, timeout: waits.append(timeout) or within(response, timeout))
    m = load_manifest(d)
    spans, late = _spans_and_late(eng)
    T = 1.0
    device, calls = _device_before_cloud(m, asyncio.Event().wait, timeout_s=T, max_batch=4, batch_wait_ms=0,
                                         next_replicas=1)  # the next tier never answers
    replies = _first_then_rest(device, m, x, spans, late, calls)
    assert waits[0] <= T and sum(waits) < 2 * T  # (each hop waiting a whole timeout: 2 T or more)
    for i, ((a, b), reply) in enumerate(zip(spans, replies)):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        for r, e, c in zip(rows, eng.exit[a:b].tolist(), eng.prediction[a:b].tolist()):
            assert (r["class"], r["exit"], r["degraded"]) == ((c, e, False) if e < 2 else (r["class"], 1, True))
        assert (i in late) == bool(reply["errors"]) and all("unavailable" in err for err in reply["errors"])


def test_a_first_tier_with_the_front_runs_in_the_ingress_replicas(model, monkeypatch):
    """``with_front: true`` on the first tier: ``build_app`` makes no deployment of it; the ingress
    takes its replicas and actor options and builds the tier in its own process, in front of the
    next tier's deployment; that local tier batches and answers as a tier deployment does. The
    no-op of such a plan computes nothing inside the ingress. Only the first tier may say so, and
    only true or false."""
    from eenn.serve import ray_app

    _, d, x, eng = model
    plan = _plan(d, device={"with_front": True, "replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "max_batch": 8,
                            "batch_wait_ms": 20_000})
    assert plan.to_dict()["tiers"][0]["with_front"] is True and TierPlan.from_dict(plan.to_dict()).tiers == plan.tiers
    ingress = ray_app.build_app(plan)._bound_deployment
    assert (ingress.name, ingress.num_replicas, ingress.ray_actor_options) == ("ingress", 2, {"num_cpus": 0.5})
    edge = ingress.init_args[2]._bound_deployment  # the ingress calls the edge tier itself
    assert edge.name == "tier-edge" and edge.init_args[3]._bound_deployment.name == "tier-cloud"
    kind, (spec, models, settings) = ingress.init_args[4]
    assert (kind, spec["name"], sorted(models), settings["next_name"]) == ("tier", "device", [0, 1], "edge")

    _batch_in_test_loop(monkeypatch, ray_app.TierDeployment)
    m = load_manifest(d)
    one = _plan(d)  # every segment in the ingress (no next tier) to compare whole answers with the engine
    whole = replace(one, tiers=[TierSpec("all", 0, m["num_exits"], max_batch=8, batch_wait_ms=20_000, with_front=True)])
    args = ray_app.build_app(whole)._bound_deployment.init_args
    front = ray_app.Ingress.func_or_class(*args)
    assert front.front.plan.tiers[0].with_front and front.local.next is None
    replies = _at_once(front.local, m, x, RAY_SIZES)
    assert [r["tiers"][0]["batch"] for r in replies] == [8, 8, 8, 8, 12]
    starts = np.cumsum([0, *RAY_SIZES])
    for (a, b), reply in zip(zip(starts[:-1], starts[1:]), replies):
        rows = build_response(m, reply, b - a, 0.0, False)["predictions"]
        assert [(r["class"], r["exit"]) for r in rows] == list(zip(eng.prediction[a:b].tolist(),
                                                                   eng.exit[a:b].tolist()))

    noop = ray_app.build_app(plan, noop=True)._bound_deployment
    assert (noop.num_replicas, noop.init_args[2], noop.init_args[4][0]) == (2, None, "noop")
    with pytest.raises(ValueError, match="`with_front` must be true or false"):
        _plan(d, device={"with_front": "yes"})
    with pytest.raises(ValueError, match="only the first tier"):
        ray_app.build_app(replace(plan, tiers=[plan.tiers[0], replace(plan.tiers[1], with_front=True), plan.tiers[2]]))


def test_the_noop_deployment_answers_every_sample_without_computing(model, monkeypatch):
    """``build_app(plan, noop=True)``: the same ingress in front of a tier that computes nothing,
    with the first tier's batching, replicas and placement (the framework's ceiling in
    benchmarks/serve_load.py); it batches like a tier and answers each request's samples."""
    from eenn.serve import ray_app

    _, d, x, _ = model
    plan = _plan(d, device={"replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "max_batch": 8,
                            "batch_wait_ms": 20_000})
    ingress = ray_app.build_app(plan, noop=True)._bound_deployment
    tier = ingress.init_args[2]._bound_deployment
    assert (tier.name, tier.num_replicas, tier.ray_actor_options) == ("tier-noop", 2, {"num_cpus": 0.5})
    _batch_in_test_loop(monkeypatch, ray_app.NoopTier)
    m = load_manifest(d)
    noop = ray_app.NoopTier.func_or_class(*tier.init_args)
    sizes = RAY_SIZES
    replies = _at_once(noop, m, x, sizes)
    assert [r["tiers"][0]["batch"] for r in replies] == [8, 8, 8, 8, 12]
    for n, reply in zip(sizes, replies):
        rows = build_response(m, reply, n, 0.0, False)["predictions"]
        assert [(r["class"], r["exit"], r["tier"], r["degraded"]) for r in rows] == [(0, 0, "device", False)] * n


@pytest.mark.parametrize("kind", ["tier", "noop"])
def test_a_ray_replica_closes_its_window_for_one_client_and_reopens_it_under_load(model, monkeypatch, kind):
    """On Ray a tier replica (and the no-op, which batches as a tier does) sets its ``serve.batch``
    window as the in-process queue does: halved by each lone request until it closes, open again
    when requests queue together."""
    from eenn.serve import ray_app
    from eenn.staged import read_segments

    _, d, x, eng = model
    cls = ray_app.TierDeployment if kind == "tier" else ray_app.NoopTier
    queue = _batch_in_test_loop(monkeypatch, cls)  # holds the window serve.batch uses
    m = load_manifest(d)
    E = m["num_exits"]
    spec = {"name": "all", "start": 0, "stop": E, "max_batch": 8, "batch_wait_ms": 100}
    if kind == "tier":
        replica = cls.func_or_class(m, spec, read_segments(m, (0, E)), None,
                                    {"float16": False, "threads": 1, "timeout_s": 1.0})
    else:
        replica = cls.func_or_class(spec, m["num_classes"])
    msg = lambda i: start_message(m, x[i:i + 1].numpy())

    async def main():
        alone = [await replica(msg(i)) for i in range(5)]
        closed = queue.get_batch_wait_timeout_s()
        together = await asyncio.gather(*[replica(msg(i)) for i in range(5, 8)])
        return alone, closed, together

    alone, closed, together = asyncio.run(asyncio.wait_for(main(), 60))
    waits = [r["tiers"][0]["wait_s"] for r in alone]  # windows of 100, 50, 25 and 12.5 ms, then none
    assert all(w >= 0.099 / 2 ** k for k, w in enumerate(waits[:4])) and waits[4] < 0.0125, waits
    assert closed == 0.0 and [r["tiers"][0]["batch"] for r in together] == [3, 3, 3]
    assert queue.get_batch_wait_timeout_s() > 0
    if kind == "tier":
        rows = [build_response(m, r, 1, 0.0, True) for r in [*alone, *together]]
        assert [(r["class"], r["exit"]) for r in rows] == list(zip(eng.prediction[:8].tolist(), eng.exit[:8].tolist()))
