"""`eenn plan` proposes each tier's batching (max_batch, batch_wait_ms) and placement (replicas,
num_cpus) from the segment times: the proposal must follow the times (swap which tier is slow and
the replicas swap), the load (more clients, bigger batches) and the fixed cost per run (what
batching saves); bad settings are refused with the reason."""
import json

import pytest
import yaml

from _helpers import spread_net
from eenn.exporter import export
from eenn.serve import TierPlan
from eenn.serve.cli import _main
from eenn.serve.splits import TierSpeed
from eenn.serve.sizing import propose_serving

MANIFEST = {"num_exits": 2, "segments": [{"macs": 1000}, {"macs": 1000}]}
BOUNDS = [(0, 1), (1, 2)]
DEPTH = [0.5, 0.5]  # half the samples leave at exit 0: the second tier sees half of them


def _speeds(t0, t1, *, fixed=(0.0, 0.0), batch=32):
    """Two one-segment tiers: batch-1 times t0, t1; a run of 32 costs the fixed part once."""
    tb = [f + (t - f) * batch for t, f in zip((t0, t1), fixed)]
    return [TierSpeed("a", segment_s=[t0, t1], batch_s=tb, batch=batch),
            TierSpeed("b", segment_s=[t0, t1], batch_s=tb, batch=batch)]


def _export(tmp_path):
    """A four-segment export whose validation record sends 40% of the samples out at exit 0."""
    d = tmp_path / "export"
    export(spread_net(), d, policy="max_prob", thresholds=[0.5, 0.5, 0.5],
           validation={"depth_distribution": [0.4, 0.2, 0.2, 0.2], "exit_distribution": [0.4, 0.2, 0.2, 0.2]})
    return d


def _by_name(props):
    return {p.name: p for p in props}


def test_the_slower_tier_gets_the_cores():
    # tier b's segment is 8x tier a's: though only half the samples reach it, it gets the replicas
    slow_b, _ = propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 8e-3), DEPTH, cores=5, concurrency=16)
    slow_a, _ = propose_serving(MANIFEST, BOUNDS, _speeds(8e-3, 1e-3), DEPTH, cores=5, concurrency=16)
    b, a = _by_name(slow_b), _by_name(slow_a)
    assert b["b"].replicas > b["a"].replicas and a["a"].replicas > a["b"].replicas
    assert b["b"].cores == pytest.approx(4.0) and a["a"].cores == pytest.approx(5 * 8 / 8.5)
    for props in (slow_b, slow_a):  # the reservations fit on the machine
        assert sum(p.replicas * p.num_cpus for p in props) <= 5 + 1e-9


def test_batches_follow_the_clients_reach_and_run_time():
    props, lines = propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 2e-3), DEPTH, cores=2, concurrency=32)
    p = _by_name(props)
    assert (p["a"].max_batch, p["b"].max_batch) == (32, 16)  # 32 clients; half of them reach b
    assert p["a"].batch_wait_ms == pytest.approx(1e3 * 32 * 1e-3, abs=0.05)  # one full run
    assert p["b"].batch_wait_ms == pytest.approx(1e3 * 16 * 2e-3, abs=0.05)
    assert any("capacity" in line for line in lines) and all(q.reasons for q in props)
    one, _ = propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 2e-3), DEPTH, cores=2, concurrency=1)
    assert [(q.max_batch, q.batch_wait_ms) for q in one] == [(1, 0.0), (1, 0.0)]
    capped, _ = propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 2e-3), DEPTH, cores=2, concurrency=500, batch_cap=48)
    assert [q.max_batch for q in capped] == [48, 48]


def test_at_a_rate_the_tier_with_the_larger_fixed_cost_batches_more():
    # 400 requests/s: tier a pays 2 ms per run whatever its size, tier b 0.1 ms; both 0.5 ms per sample
    sp = _speeds(2.5e-3, 0.6e-3, fixed=(2e-3, 0.1e-3))
    props, lines = propose_serving(MANIFEST, BOUNDS, sp, DEPTH, cores=2, rate=400)
    p = _by_name(props)
    # a keeps up when 400 (2 ms + 0.5 ms b) <= b, i.e. b >= 0.8 / (1 - 0.2) = 1: no batching needed
    assert p["a"].max_batch == 1 and p["b"].max_batch == 1
    props, _ = propose_serving(MANIFEST, BOUNDS, sp, DEPTH, cores=2, rate=1200)
    p = _by_name(props)
    # a: 1200 * 2 ms / (1 - 1200 * 0.5 ms) = 2.4 / 0.4 = 6; b: 600 * 0.1 ms / (1 - 0.3) = 0.086 -> 1
    assert p["a"].max_batch == 6 and p["b"].max_batch == 1
    assert 0 < p["a"].batch_wait_ms <= 1e3 * p["a"].run_s() + 0.05
    over, lines = propose_serving(MANIFEST, BOUNDS, sp, DEPTH, cores=2, rate=5000)
    assert _by_name(over)["a"].max_batch == 64 and any("overloaded" in line for line in lines)


def test_the_front_takes_its_share_and_a_tier_gets_a_replica_per_core_begun():
    # one tier holding both segments: 1.5 ms of work per sample (half the samples run segment 1)
    one = [TierSpeed("all", segment_s=[1e-3, 1e-3], batch_s=[32e-3, 32e-3], batch=32)]
    alone, _ = propose_serving(MANIFEST, [(0, 2)], one, DEPTH, cores=2, concurrency=32)
    assert (alone[0].cores, alone[0].replicas, alone[0].num_cpus) == (pytest.approx(2.0), 2, 1.0)
    # the front costs as much per request as the tier: it keeps half the cores, the tier one replica
    single, lines = propose_serving(MANIFEST, [(0, 2)], one, DEPTH, cores=2, concurrency=32, front_s=1.5e-3)
    assert (single[0].cores, single[0].replicas, single[0].num_cpus) == (pytest.approx(1.0), 1, 1.0)
    assert any(line.startswith("the front: 1.5 ms per request = 50% of the work") for line in lines)
    # with 32 samples a request the front's share is small again: two replicas
    batch, _ = propose_serving(MANIFEST, [(0, 2)], one, DEPTH, cores=2, concurrency=32, samples_per_request=32,
                               front_s=1.5e-3)
    assert batch[0].replicas == 2 and batch[0].cores == pytest.approx(2 * 1.5 / (1.5 + 1.5 / 32))
    # 1.4 cores of work: one replica would compute on one core; two replicas of 0.7
    part, _ = propose_serving(MANIFEST, [(0, 2)], one, DEPTH, cores=2, concurrency=32, front_s=1.5e-3 * 0.6 / 1.4)
    assert (part[0].cores, part[0].replicas, part[0].num_cpus) == (pytest.approx(1.4), 2, 0.7)
    # the tier runs in the front's replicas (with_front): they are sized for both, the whole machine
    inside, lines = propose_serving(MANIFEST, [(0, 2)], one, DEPTH, cores=2, concurrency=32, front_s=1.5e-3,
                                    with_front=True)
    assert (inside[0].cores, inside[0].replicas, inside[0].num_cpus) == (pytest.approx(2.0), 2, 1.0)
    assert inside[0].options()["with_front"] is True and "with_front" not in single[0].options()
    assert any("in the replicas of all" in line for line in lines)
    # of two tiers only the first runs with the front; the second keeps its own share
    two, _ = propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 1e-3), DEPTH, cores=3, concurrency=32, front_s=1.5e-3,
                             with_front=True)
    apart, _ = propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 1e-3), DEPTH, cores=3, concurrency=32, front_s=1.5e-3)
    assert [p.with_front for p in two] == [True, False]
    assert two[0].cores == pytest.approx(apart[0].cores + 3 * 1.5 / 3.0) and two[1].cores == pytest.approx(apart[1].cores)


@pytest.mark.parametrize("kw, message", [
    ({}, "concurrency"), ({"concurrency": 4, "rate": 10}, "one of them"), ({"concurrency": 0}, "concurrency"),
    ({"rate": -1}, "rate"), ({"concurrency": 4, "cores": 0}, "cores"),
    ({"concurrency": 4, "batch_cap": 0}, "batch_cap"), ({"concurrency": 4, "request_overhead_s": -1}, "overhead"),
    ({"concurrency": 4, "front_s": -1}, "front"),
])
def test_bad_load_settings_are_refused(kw, message):
    kw = {"cores": 2, **kw}
    with pytest.raises(ValueError, match=message):
        propose_serving(MANIFEST, BOUNDS, _speeds(1e-3, 1e-3), DEPTH, **kw)


def test_eenn_plan_writes_the_proposal_into_the_plan(tmp_path, capsys):
    d = _export(tmp_path)
    out = tmp_path / "plan.yaml"
    assert _main(["plan", str(d), "--tier", "device=measure", "--tier", "cloud=measure", "--link", "1e9,0.0001",
                  "--split", "0-1,rest", "--cores", "3", "--concurrency", "20", "--no-with-front", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max_batch 20" in printed and "8.0 samples can wait" in printed and "capacity" in printed
    plan = TierPlan.load(out)
    (dev, cloud) = plan.tiers
    assert (dev.start, dev.stop, cloud.start, cloud.stop) == (0, 2, 2, 4)
    assert (dev.max_batch, cloud.max_batch) == (20, 8)  # 20 clients; 40% of the samples reach the cloud
    assert dev.batch_wait_ms > 0 and cloud.batch_wait_ms > 0
    assert dev.replicas * dev.ray_actor_options["num_cpus"] + cloud.replicas * cloud.ray_actor_options["num_cpus"] <= 3
    # the HTTP front's share of the cores (--front-ms) is left to it: the tiers reserve less
    assert _main(["plan", str(d), "--tier", "device=measure", "--tier", "cloud=measure", "--link", "1e9,0.0001",
                  "--split", "0-1,rest", "--cores", "3", "--concurrency", "20", "--front-ms", "50", "--no-with-front",
                  "--out", str(tmp_path / "front.yaml")]) == 0
    assert "the front: 50 ms per request" in capsys.readouterr().out
    fronted = TierPlan.load(tmp_path / "front.yaml").tiers
    assert (sum(t.replicas * t.ray_actor_options["num_cpus"] for t in fronted)
            < sum(t.replicas * t.ray_actor_options["num_cpus"] for t in plan.tiers))
    raw = yaml.safe_load(out.read_text())
    assert set(raw["tiers"][0]) == {"name", "segments", "max_batch", "batch_wait_ms", "replicas", "ray_actor_options"}
    # by default (--with-front) the first tier runs in the front's replicas, which are sized for both
    assert _main(["plan", str(d), "--tier", "device=measure", "--tier", "cloud=measure", "--link", "1e9,0.0001",
                  "--split", "0-1,rest", "--cores", "3", "--concurrency", "20", "--front-ms", "50",
                  "--out", str(tmp_path / "with.yaml")]) == 0
    assert "with the front" in capsys.readouterr().out
    dev_w, cloud_w = TierPlan.load(tmp_path / "with.yaml").tiers
    assert dev_w.with_front and not cloud_w.with_front
    assert (dev_w.replicas * dev_w.ray_actor_options["num_cpus"]
            > fronted[0].replicas * fronted[0].ray_actor_options["num_cpus"])
    # bad usage: a clear error, exit status 1
    for argv, message in [(["--split", "0-1", "--concurrency", "4"], "--split gives 1"),
                          (["--split", "0-1,rest", "--concurrency", "4", "--rate", "3"], "not both"),
                          (["--split", "0-1,rest", "--cores", "2"], "--concurrency or --rate"),
                          (["--split", "0-1,rest", "--front-ms", "1"], "--concurrency or --rate"),
                          (["--split", "0-1,rest", "--concurrency", "4", "--front-ms", "-1"], "front")]:
        assert _main(["plan", str(d), "--tier", "device=measure", "--tier", "cloud=measure", "--link", "1e9,0.0001",
                      *argv]) == 1
        assert message in capsys.readouterr().err


def test_tiers_on_one_machine_become_one_tier_and_a_far_faster_one_over_a_free_link_takes_all(tmp_path, capsys):
    """Without --split, eenn plan chooses the split: tiers that are all this machine compute at the
    same speed, so a hop between them only adds its link and every segment goes to the first tier
    (the others are left out of the plan); a cloud far faster over a nearly free link takes them all."""
    d = _export(tmp_path)
    same = tmp_path / "same.yaml"
    assert _main(["plan", str(d), "--tier", "device=measure", "--tier", "edge=measure", "--tier", "cloud=measure",
                  "--link", "1e9,0.00035", "--link", "1e9,0.00035", "--concurrency", "8", "--out", str(same)]) == 0
    printed = capsys.readouterr().out
    assert "edge: -, cloud: -" in printed and "left out of the plan (no segments): edge, cloud" in printed
    (only,) = TierPlan.load(same).tiers
    assert (only.name, only.start, only.stop) == ("device", 0, 4)
    faster = tmp_path / "faster.yaml"
    assert _main(["plan", str(d), "--tier", "device=measure", "--tier", "cloud=measure:1000",
                  "--link", "1e12,1e-7", "--out", str(faster)]) == 0
    printed = capsys.readouterr().out
    assert "device: -, cloud: 0-3" in printed and "least expected latency gives them no segments" in printed
    assert "same speed" not in printed
    # an export without a validation record cannot be planned: said so, with the ways to make one
    bare = tmp_path / "bare"
    export(spread_net(), bare, policy="max_prob", thresholds=[0.5, 0.5, 0.5])
    assert _main(["plan", str(bare), "--tier", "device=measure", "--tier", "cloud=measure:1000",
                  "--link", "1e12,1e-7"]) == 1
    err = capsys.readouterr().err
    assert "no validation exit distribution" in err and "--dataset" in err and "calibration_record" in err
    (cloud,) = TierPlan.load(faster).tiers
    assert (cloud.name, cloud.start, cloud.stop) == ("cloud", 0, 4)


def test_eenn_plan_names_the_argument_that_is_wrong(tmp_path, capsys):
    """Bad --tier, --link, --split or export values: one line naming the flag or the path and what
    is allowed, and no plan written; exit status 2 (a usage error) where the flag's own form is
    wrong, 1 where it does not fit the export or the other flags."""
    d = _export(tmp_path)
    out = tmp_path / "plan.yaml"
    ok = ["--tier", "device=1e8", "--tier", "cloud=1e10", "--link", "1e9,0.001"]
    for argv, message in [
            (["--tier", "device=-1", "--tier", "cloud=1e10", "--link", "1e9,0.001"],
             "--tier 'device=-1': MACS_PER_S must be a number > 0, got -1"),
            (["--tier", "device=1e8,-1", "--tier", "cloud=1e10", "--link", "1e9,0.001"],
             "--tier 'device=1e8,-1': OVERHEAD_S must be a number of seconds >= 0"),
            (["--tier", "device=fast", "--tier", "cloud=1e10", "--link", "1e9,0.001"],
             "--tier 'device=fast': SPEED is MACS_PER_S[,OVERHEAD_S] in numbers"),
            (["--tier", "device=measurex", "--tier", "cloud=1e10", "--link", "1e9,0.001"], "--tier 'device=measurex'"),
            ([*ok[:4], "--link=-1,0.01"], "--link '-1,0.01': link `bandwidth` must be a number of bytes per second > 0"),
            ([*ok[:4], "--link=1e6,-5"], "--link '1e6,-5': link `latency_s` must be a number of seconds >= 0")]:
        with pytest.raises(SystemExit) as e:
            _main(["plan", str(d), *argv, "--out", str(out)])
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (this stand-alone parser prints its usage first)
        assert e.value.code == 2 and last.startswith("eenn plan: error: argument --") and message in last, (argv, last)
        assert not out.exists()
    for argv, message in [
            (["--tier", "a=1e8", "--tier", "a=1e9", "--link", "1e9,0.001"], "--tier names must be distinct"),
            ([*ok, "--split", "2-1,rest"], "--split '2-1,rest': tier 'device': segments 2-1 are reversed: write the "
                                          "first one first (1-2)"),
            ([*ok, "--split", "0-1-2,rest"], "--split '0-1-2,rest': tier 'device': cannot read segments '0-1-2'")]:
        assert _main(["plan", str(d), *argv, "--out", str(out)]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("eenn: error: ") and message in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()
    ckpt = tmp_path / "best.safetensors"  # an --out mistyped onto a checkpoint does not replace it
    ckpt.write_bytes(b"weights")
    assert _main(["plan", str(d), *ok, "--out", str(ckpt)]) == 1
    assert "is a checkpoint (safetensors): writing a plan there" in capsys.readouterr().err
    assert ckpt.read_bytes() == b"weights"
    assert _main(["plan", str(tmp_path / "nonexistent"), *ok]) == 1
    assert f"no exported model at {tmp_path / 'nonexistent'} (missing manifest.json)" in capsys.readouterr().err
    # a hand-edited manifest: said so, not an IndexError or a bare KeyError
    m = json.loads((d / "manifest.json").read_text())
    for edit, message in [(lambda m: m["segments"].pop(), "got 3 entries"), (lambda m: m.pop("segments"), "got none")]:
        broken = dict(m, segments=list(m["segments"]))
        edit(broken)
        (d / "manifest.json").write_text(json.dumps(broken))
        assert _main(["plan", str(d), *ok]) == 1
        assert f"manifest.json of {d}: `segments` must list one entry per exit (4, num_exits), {message}; re-export " \
               "the model" in capsys.readouterr().err
