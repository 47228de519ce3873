"""Split serving in-process, over real loopback HTTP: answers equal the dynamic engine's, bad
input gets a clear 4xx and the server keeps serving, a failing tier degrades to the deepest exit
computed, and the planner picks the split the cost model says is fastest."""
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import eenn
from _helpers import npy_bytes as _npy, post, spread_net as _net
from eenn.engine import DynamicEngine
from eenn.exporter import export, load_manifest
from eenn.serve import LinkSpec, LocalServer, TierPlan, TierSpeed, decode, encode, expected_latency, plan_splits
from eenn.serve.inputs import decode_body

MEAN, STD = (0.3,), (0.25,)
TH = [0.35, 0.45, 0.55]



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    net = _net()
    net.input_spec = eenn.InputSpec((1, 8, 8), MEAN, STD)
    d = tmp_path_factory.mktemp("export")
    val = {"depth_distribution": [0.5, 0.2, 0.2, 0.1], "exit_distribution": [0.5, 0.2, 0.2, 0.1]}
    export(net, d, policy="max_prob", thresholds=TH, validation=val)
    return net, d


def _plan(d, **kw):
    return TierPlan.from_dict({"model": str(d), "tiers": [{"name": "device", "segments": "0-1"},
                                                          {"name": "edge", "segments": 2},
                                                          {"name": "cloud", "segments": "rest"}], **kw})


@pytest.fixture(scope="module")
def server(model):
    srv = LocalServer(_plan(model[1], max_body_bytes=200_000, timeout_s=2))
    url = srv.start()
    yield srv, url
    srv.stop()




def test_served_answers_equal_the_engine(model, server):
    net, _ = model
    _, url = server
    x = torch.randn(40, 1, 8, 8)
    eng = DynamicEngine(net, "max_prob", TH)(x)
    assert 0 < (eng.exit < 3).sum() < 40 and len(set(eng.exit.tolist())) >= 3  # several tiers answer
    status, out = post(url, _npy(x.numpy()), "application/x-npy")
    assert status == 200, out
    rows = out["predictions"]
    assert [r["class"] for r in rows] == eng.prediction.tolist()
    assert [r["exit"] for r in rows] == eng.exit.tolist()
    tier_of = {0: "device", 1: "device", 2: "edge", 3: "cloud"}
    assert [r["tier"] for r in rows] == [tier_of[e] for e in eng.exit.tolist()]
    assert not any(r["degraded"] for r in rows) and out["errors"] == []
    assert set(out["time_s"]) == {"device", "edge", "cloud"}
    assert [(h["from"], h["to"]) for h in out["hops"]] == [("device", "edge"), ("edge", "cloud")]
    assert out["hops"][0]["bytes"] > out["hops"][1]["bytes"] > 0  # fewer samples go on to the cloud
    # one sample at a time, as JSON: the same answers (the batch make-up changes nothing)
    for i in range(0, 40, 9):
        status, one = post(url, json.dumps(x[i].tolist()).encode(), "application/json")
        assert status == 200 and one["class"] == eng.prediction[i] and one["exit"] == eng.exit[i]
        assert abs(sum(one["probabilities"]) - 1) < 1e-4


def test_images_are_normalised_as_the_evaluation_loader_does(model, server):
    from PIL import Image

    net, _ = model
    _, url = server
    px = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px, "L").save(buf, format="PNG")
    ds = eenn.data.TensorDataset(torch.from_numpy(px)[None, None], torch.zeros(1, dtype=torch.long))
    x = next(iter(eenn.TensorLoader(ds, 1, mean=MEAN, std=STD)))[0]
    assert np.array_equal(decode_body(buf.getvalue(), "image/png", load_manifest(model[1])), x.numpy())
    eng = DynamicEngine(net, "max_prob", TH)(x)
    for body, ct in [(buf.getvalue(), "image/png"), (buf.getvalue(), ""), (_npy(px[None]), "application/x-npy")]:
        status, out = post(url, body, ct)
        assert status == 200 and out["class"] == eng.prediction[0] and out["exit"] == eng.exit[0], out
    # a multipart upload (curl -F file=@digit.png) and a JPEG of another size are accepted too
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    status, out = post(url, body, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and out["class"] == eng.prediction[0]
    jpg = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(px, 4, 0), 4, 1)).convert("RGB").save(jpg, format="JPEG")
    assert post(url, jpg.getvalue(), "image/jpeg")[0] == 200
    # the pixels as JSON integers (img.tolist()) are pixels too, with or without the channel axis;
    # and one-channel arrays may leave that axis out, one sample or a batch
    for body, ct in [(json.dumps(px.tolist()).encode(), "application/json"),
                     (json.dumps({"inputs": px[None].tolist()}).encode(), "application/json"),
                     (_npy(px), "application/x-npy"), (_npy(x[0, 0].numpy()), "application/x-npy")]:
        status, out = post(url, body, ct)
        assert status == 200 and out["class"] == eng.prediction[0] and out["exit"] == eng.exit[0], (ct, out)
    status, out = post(url, _npy(np.repeat(px[None], 3, 0)), "application/x-npy")
    assert status == 200 and [p["class"] for p in out["predictions"]] == [int(eng.prediction[0])] * 3
    # written as floats, the same numbers are model inputs, as before
    assert np.array_equal(decode_body(json.dumps(x[0].tolist()).encode(), "application/json",
                                      load_manifest(model[1])), x.numpy())


BAD = [
    (b"\x89PNG\r\n\x1a\nnot really", "image/png", 400, "cannot decode the image"),
    (b"", "application/json", 400, "empty body"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (json.dumps([[1.0, 2.0]]).encode(), "application/json", 422, "wrong shape"),
    (json.dumps([["a"] * 8] * 8).encode(), "application/json", 422, "numbers only"),
    (json.dumps({"x": 1}).encode(), "application/json", 422, '"inputs"'),
    (json.dumps([[300] * 8] * 8).encode(), "application/json", 422, "read as pixels 0-255"),
    (b"hello", "text/plain", 415, "unsupported content type"),
    (b"[" * 100000 + b"]" * 100000, "application/json", 400, "nested too deeply"),  # beyond the JSON reader
    (b"[" * 200 + b"]" * 200, "application/json", 422, "nested more than 4 levels"),  # beyond NumPy's 64 axes
]


@pytest.mark.parametrize("body, ct, status, message", BAD, ids=[b[3] for b in BAD])
def test_bad_input_gets_a_clear_4xx(server, body, ct, status, message):
    _, url = server
    got, out = post(url, body, ct)
    assert got == status and message in out["error"], out


def test_a_body_no_reader_foresaw_is_a_400(model, monkeypatch):
    from eenn.serve import inputs

    def unforeseen(body, manifest):
        raise KeyError("oops")

    monkeypatch.setattr(inputs, "_json", unforeseen)
    with pytest.raises(inputs.InputError) as e:
        decode_body(b"[1.0]", "application/json", load_manifest(model[1]))
    assert e.value.status == 400 and "cannot read the body (KeyError: 'oops')" in e.value.message


def test_bad_arrays_and_limits(server):
    srv, url = server
    nan = np.zeros((1, 8, 8), np.float32)
    nan[0, 2, 3] = np.nan
    cases = [
        (_npy(nan), 422, "non-finite"),
        (_npy(np.full((1, 8, 8), np.inf)), 422, "non-finite"),
        (_npy(np.full((1, 8, 8), 1e300)), 422, "non-finite"),  # beyond float32
        (_npy(np.zeros((1, 8, 8), np.int64)), 422, "dtype int64"),
        (_npy(np.zeros((3, 8, 7), np.float32)), 422, "wrong shape"),
        (_npy(np.zeros((2, 3, 8, 8), np.float32)), 422, "or without the channel axis (8, 8)"),
        (_npy(np.zeros((1, 8, 8), np.complex64)), 422, "dtype complex64"),
        (_npy(np.array([{"a": 1}], dtype=object)), 422, "unpickling"),
        (b"\x93NUMPY garbage", 400, ".npy"),
        (_npy(np.zeros((1, 8, 8), np.float32))[:-4], 400, "the body carries 252"),  # truncated
        (_npy(np.zeros((1, 8, 8), np.float32)) + b"\0", 400, "the body carries 257"),  # trailing bytes
        (_npy(np.zeros((1, 8, 8), np.float32)).replace(b"'<f4'", b"'<zz'"), 400, ".npy"),  # no such dtype
        (_npy(np.zeros((1000, 1, 8, 8), np.float32)), 413, "larger than the limit"),  # 256 KB > 200 KB
    ]
    for body, status, message in cases:
        got, out = post(url, body, "application/x-npy")
        assert got == status and message in out["error"], (message, out)
    assert post(url, _npy(np.zeros((300, 1, 8, 8), np.float16)), "application/x-npy")[0] == 413  # batch > 256
    req = urllib.request.Request(url + "/predict")  # GET on /predict
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
    with urllib.request.urlopen(url + "/health", timeout=10) as r:  # still serving
        h = json.loads(r.read())
    assert h["status"] == "ok" and [t["name"] for t in h["tiers"]] == ["device", "edge", "cloud"]
    assert post(url, _npy(np.zeros((1, 8, 8), np.float32)), "application/x-npy")[0] == 200


def test_npy_bodies_in_any_layout_read_as_their_values(server):
    """A .npy body is read from its own header (cached per distinct header): big-endian, Fortran
    order, float64 and a second request with the same header all give the answers of the same
    values sent as plain little-endian C-order float32."""
    _, url = server
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8)).astype(np.float32)
    _, want = post(url, _npy(x), "application/x-npy")
    for a in (x.astype(">f4"), np.asfortranarray(x), x.astype(np.float64), x):
        status, out = post(url, _npy(a), "application/x-npy")
        assert status == 200 and [(p["class"], p["exit"]) for p in out["predictions"]] == [
            (p["class"], p["exit"]) for p in want["predictions"]]


def test_a_failing_tier_degrades_to_the_deepest_exit(model, server, monkeypatch):
    net, _ = model
    srv, url = server
    cloud = srv.front.pipeline.tiers[2]

    def broken(runnings, waits=None):
        raise ConnectionError("cloud is down")

    monkeypatch.setattr(cloud, "run_many", broken)
    x = torch.randn(40, 1, 8, 8)
    eng = DynamicEngine(net, "max_prob", TH)(x)
    status, out = post(url, _npy(x.numpy()), "application/x-npy")
    assert status == 200
    rows = out["predictions"]
    late = eng.exit == 3
    assert late.any()
    for r, e, p in zip(rows, eng.exit.tolist(), eng.prediction.tolist()):
        if e < 3:  # answered before the cloud: unchanged
            assert (r["exit"], r["class"], r["degraded"]) == (e, p, False)
        else:  # the edge's exit 2 answers, flagged
            assert (r["exit"], r["tier"], r["degraded"]) == (2, "edge", True)
    assert "cloud is down" in out["errors"][0]


def test_float16_handoff_halves_the_feature_bytes(model):
    from eenn.serve.splits import handoff_bytes

    m = load_manifest(model[1])
    full, half = handoff_bytes(m, 1), handoff_bytes(m, 1, float16=True)
    feat = m["segments"][0]["handoff_bytes_per_sample"]
    assert full - half == feat // 2
    a = {"state_0": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "index": np.arange(3)}
    back, meta = decode(encode(a, {"k": 1}, float16=True, half=["state_0"]))
    assert meta == {"k": 1} and back["state_0"].dtype == np.float32 and back["index"].dtype == np.int64
    assert np.abs(back["state_0"] - a["state_0"]).max() < 1e-2 and np.array_equal(back["index"], a["index"])


def test_a_malformed_handoff_is_refused_with_the_reason():
    """A hand-off message that is not what encode makes (foreign, truncated, or whose header lies
    about an array) raises CodecError saying what is wrong, never a NumPy error from deep inside."""
    from eenn.serve.codec import CodecError

    good = encode({"state_0": np.zeros((2, 3), np.float32)}, {"k": 1})
    n = int.from_bytes(good[4:8], "little")
    header = json.loads(good[8:8 + n])

    def with_header(**array):
        h = json.dumps({"meta": header["meta"], "arrays": [{**header["arrays"][0], **array}]}).encode()
        return good[:4] + len(h).to_bytes(4, "little") + h + good[8 + n:]

    for message, reason in [(b"XXXX" + good[4:], "bad magic"), (good[:-4], "truncated"),
                            (good + b"\0", "trailing bytes"), (with_header(shape=[2, -3]), "negative dimension"),
                            (with_header(shape="2x3"), "malformed shape"), (with_header(shape=[2, None]), "malformed shape"),
                            (with_header(wire="object"), "unsupported dtype"), (with_header(shape=[4, 3]), "truncated")]:
        with pytest.raises(CodecError, match=reason):
            decode(message)
    arrays, meta = decode(good)
    assert meta == {"k": 1} and arrays["state_0"].shape == (2, 3)


MANIFEST_EDITS = [
    (lambda m: m.update(class_names=["a", "b"]), "`class_names` must list 10 names (num_classes) or be null, got 2"),
    (lambda m: m["preprocess"].update(mean="x"),
     "`preprocess.mean` must be 1 number (per channel of input_shape [1, 8, 8]), got 'x'"),
    (lambda m: m["preprocess"].update(std=[0.2, 0.2]), "`preprocess.std` must be 1 number"),
    (lambda m: m["segments"].pop(), "`segments` must list one entry per exit (4, num_exits), got 3 entries"),
    (lambda m: m.pop("segments"), "`segments` must list one entry per exit (4, num_exits), got none"),
    (lambda m: m.update(input_shape=[1, 8, -8]), "`input_shape` must be a list of positive integers"),
    (lambda m: m.update(input_shape=[1, 9, 8]), "`input_shape` [1, 9, 8] does not match segment 0's input [1, 8, 8]"),
    (lambda m: m["exit_names"].pop(), "`exit_names` must list 4 names"),
    (lambda m: m["validation"].update(depth_distribution=[0.5, 0.5]), "`validation.depth_distribution` must be 4"),
]


@pytest.mark.parametrize("edit, message", MANIFEST_EDITS, ids=[m[1][:40] for m in MANIFEST_EDITS])
def test_an_inconsistent_manifest_is_refused_when_read(model, tmp_path, edit, message):
    """A hand-edited manifest whose parts disagree is refused once, when read, saying what is
    wrong, instead of a 500 on every request or an IndexError when planning."""
    from eenn.staged import ExportError

    m = json.loads((model[1] / "manifest.json").read_text())
    edit(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError) as e:
        load_manifest(tmp_path)
    assert str(e.value).startswith(f"manifest.json of {tmp_path}: ") and message in str(e.value)
    assert str(e.value).endswith("; re-export the model")


def test_an_input_shape_the_graphs_do_not_take_is_refused_at_load(model, tmp_path):
    import shutil

    from eenn.staged import ExportError, StagedRunner

    d = shutil.copytree(model[1], tmp_path / "export")
    m = json.loads((d / "manifest.json").read_text())
    m["input_shape"] = m["segments"][0]["inputs"][0]["shape"][1:] = [1, 9, 8]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"`input_shape` \[1, 9, 8\] does not match the ONNX graph of segment 0, "
                                          r"which takes \[batch, 1, 8, 8\]; re-export the model"):
        StagedRunner(d, segments=(0, 1))
    with pytest.raises(ExportError, match="no exported model at /nonexistent "):
        load_manifest("/nonexistent")


def test_serve_refuses_a_bad_or_busy_port(model, tmp_path, capsys):
    import socket

    from eenn.serve import serve
    from eenn.serve.cli import _main

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": str(model[1]), "tiers": [{"name": "all", "segments": "rest"}]}))
    with pytest.raises(SystemExit) as e:
        _main(["serve", "--plan", str(plan), "--local", "--port", "99999"])
    assert e.value.code == 2 and "argument --port: a port is a number 0-65535" in capsys.readouterr().err
    with pytest.raises(ValueError, match="port must be a number 0-65535"):
        serve(str(plan), local=True, port=70000)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _main(["serve", "--plan", str(plan), "--local", "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert err == f"eenn: error: cannot listen on 127.0.0.1:{port}: the port is in use (another server listens on " \
                  "it): stop that one or choose another --port\n" and "serving" not in out


def test_plan_parsing_errors(model):
    _, d = model
    with pytest.raises(ValueError, match="consecutive"):
        TierPlan.from_dict({"model": str(d), "tiers": [{"name": "a", "segments": "0-1"}, {"name": "b", "segments": 3}]})
    with pytest.raises(ValueError, match="rest"):
        TierPlan.from_dict({"model": str(d), "tiers": [{"name": "a", "segments": "0-1"}]})
    p = _plan(d)
    assert [(t.start, t.stop) for t in p.tiers] == [(0, 2), (2, 3), (3, 4)]


def test_planner_minimises_expected_latency(model):
    m = load_manifest(model[1])
    E = m["num_exits"]
    fast_net = [LinkSpec(1e9, 1e-5), LinkSpec(1e9, 1e-5)]
    # a slow device and fast links: everything goes to the cloud
    speeds = [TierSpeed("device", 1e3), TierSpeed("edge", 1e6), TierSpeed("cloud", 1e9)]
    r = plan_splits(m, speeds, fast_net)
    assert r.bounds == [(0, 0), (0, 0), (0, E)]
    # equal tiers: no reason to pay a hop, everything stays on the device
    same = [TierSpeed(n, 1e7) for n in ("device", "edge", "cloud")]
    assert plan_splits(m, same, fast_net).bounds == [(0, E), (E, E), (E, E)]
    # the chosen split is the minimum over every split (brute force agrees)
    slow = [LinkSpec(1e5, 0.002), LinkSpec(1e6, 0.02)]
    r = plan_splits(m, [TierSpeed("device", 2e6), TierSpeed("edge", 2e7), TierSpeed("cloud", 1e9)], slow)
    depth = m["validation"]["depth_distribution"]
    for a in range(E + 1):
        for b in range(a, E + 1):
            t, _ = expected_latency(m, [(0, a), (a, b), (b, E)], [TierSpeed("device", 2e6), TierSpeed("edge", 2e7),
                                                                  TierSpeed("cloud", 1e9)], slow, depth)
            assert r.predicted_s <= t + 1e-12
    assert abs(r.predicted_s - sum(p * t for p, t in zip(depth, r.per_depth_s))) < 1e-12
    plan = TierPlan.from_dict(r.to_plan(str(model[1]), ["device", "edge", "cloud"]))
    assert plan.tiers[0].start == 0 and plan.tiers[-1].stop == E


def _raw(url: str, request: bytes, *, close_after_send: bool = False, timeout: float = 20.0) -> bytes:
    """What the server answers a raw HTTP request (read until it closes the connection or the
    answer's body is complete); with ``close_after_send``, nothing: the client hangs up at once."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(request)
        if close_after_send:
            return b""
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                      if k.strip().lower() == b"content-length"]
            if sep and length and len(body) >= length[0]:
                return data


def test_every_path_and_method_gets_a_json_answer(server):
    """Unknown paths 404 and wrong methods 405 in JSON, the 405 with the methods a route takes;
    HEAD where GET is served; /predict/ served as /predict (no redirect built from the Host header)."""
    _, url = server
    for method, path, status, allow in [("GET", "/nope", 404, None), ("GET", "/", 404, None),
                                        ("DELETE", "/predict", 405, "POST"), ("GET", "/predict", 405, "POST"),
                                        ("POST", "/health", 405, "GET, HEAD"), ("GET", "/monitor/revert", 405, "POST")]:
        answer = _raw(url, f"{method} {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()), (method, path, head)
        assert json.loads(body)["status"] == status
        if allow:
            assert f"allow: {allow}".lower().encode() in head.lower(), head
    head = _raw(url, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    x = np.zeros((1, 8, 8), np.float32)
    assert post(url + "/predict", _npy(x), path="/")[0] == 200  # /predict/


def test_bodies_that_are_not_what_they_say_are_refused(server):
    _, url = server
    assert post(url, b"garbage")[1]["error"].startswith("the body is not a .npy array")
    assert post(url, b"garbage", "application/octet-stream")[0] == 400
    req = urllib.request.Request(url + "/predict", data=b"\x1f\x8b\x08\x00", method="POST",
                                 headers={"Content-Type": "application/x-npy", "Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415 and "send the body uncompressed" in json.loads(e.value.read())["error"]
    status, out = post(url, b"\x89PNG\r\n\x1a\nnot really", "image/png")
    assert status == 400 and "BytesIO" not in out["error"]


def test_a_stalled_or_abandoned_upload_is_answered_and_counted(server, monkeypatch):
    """A body shorter than its Content-Length: 408 once no part of it comes for BODY_STALL_S (the
    connection is not held forever); a client that hangs up mid-body is counted (499), one log
    line, no traceback; the server goes on answering."""
    import time

    from eenn.serve import app

    srv, url = server
    monkeypatch.setattr(app, "BODY_STALL_S", 0.5)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nContent-Length: 1000\r\n\r\n"
    answer = _raw(url, head + b"\x93NUMPY")
    assert answer.startswith(b"HTTP/1.1 408") and b"no part of the body came for 0.5 s (6 bytes read of 1000)" in answer
    before = srv.front.rejected.get(499, 0)
    _raw(url, head + b"\x93NUMPY", close_after_send=True)
    deadline = time.monotonic() + 20
    while srv.front.rejected.get(499, 0) == before:  # the server notices the hang-up on its own time
        assert time.monotonic() < deadline, "the hang-up was never counted"
        time.sleep(0.01)
    assert post(url, _npy(np.zeros((1, 8, 8), np.float32)))[0] == 200


def test_server_settings_bound_connections_and_shutdown():
    from eenn.serve.app import uvicorn_config

    c = uvicorn_config(lambda *a: None)
    assert c.limit_concurrency >= 64 and c.timeout_graceful_shutdown == 5 and c.timeout_keep_alive == 30
