"""Design search: the space as data and its errors, the Pareto front, the repair step, impossible
constraints, a small search on digits with its report, resuming after a worker is killed at
several moments (its trial failed and requeued, a live worker's left alone), a resumed sampler
drawing new designs, two workers on one SQLite study, and the command line."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import eenn
from eenn.outputs import CachedOutputs
from eenn.policies import ExitPolicy, evaluate_policy
from eenn.search import (ConfigError, ImpossibleConstraints, SearchConfig, SearchSpace, pareto_front,
                         repair_thresholds, run_search)
from eenn.search import cli as search_cli
from eenn.search import study as search_study
from eenn.search import workers as search_workers
from eenn.search.study import counts_as_trained, create_study

SRC = str(Path(eenn.__file__).resolve().parents[1])

SPACE = {
    "family": "resnet",
    "stages": [{"depth": [1, 2], "channels": [4, 8]}, {"depth": 1, "channels": [8, 16]}, {"depth": 1, "channels": 16}],
    "head": {"type": ["linear", "conv"], "width": [None, 8]},
}


def tiny(**over) -> dict:
    """A search small enough for a test: digits capped, tiny ResNets, two epochs."""
    raw = {
        "name": "tiny",
        "dataset": {"name": "digits", "val_fraction": 0.2, "seed": 0, "train_limit": 400, "val_limit": 200,
                    "test_limit": 200},
        "space": copy.deepcopy(SPACE),
        "constraints": {"accuracy_floor": 0.3, "macs_ceiling": 200_000},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.01},
        "retrain": {"epochs": 20},
        "search": {"trials": 2, "sampler": "random", "seed": 0},
    }
    for key, value in over.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    return raw


SHAPE = dict(num_classes=10, in_channels=1, input_size=(8, 8))


# ------------------------------------------------------------------------------------- the space
def test_space_samples_buildable_designs_with_at_least_one_exit():
    space = SearchSpace.from_dict(SPACE)
    # 2x2 (group 0) x 2 (group 1) x 3 exit sets ({0}, {1}, {0, 1}) x 2 heads x 2 widths
    assert space.size() == 2 * 2 * 2 * 3 * 2 * 2
    assert space.exit_sets == ["0", "1", "0,1"]
    params = {"stage0.depth": 2, "stage0.channels": 8, "stage1.channels": 16, "exits": "0,1", "head.type": "conv",
              "head.width": 8}
    d = space.sample(optuna.trial.FixedTrial(params), **SHAPE)
    net = d.build()
    # Exits sit on each group's last block: blocks 0-1 are group 0, block 2 is group 1.
    assert net.exit_stages == [1, 2]
    assert d.network["backbone_options"] == {"depths": [2, 1, 1], "channels": [8, 16, 16]}
    assert net.head_names == ["conv", "conv"] and d.network["head_options"] == {"width": 8}
    assert net.num_exits == 3
    # rebuilt from its own description (what a design's YAML holds)
    again = eenn.NetworkConfig(**d.network).build()
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in net.parameters())


def test_gated_objectives_get_gated_heads_and_mobilenet_family_builds():
    space = SearchSpace.from_dict({"family": "mobilenet", "stages": [
        {"depth": [1, 2], "channels": 8, "expansion": [2, 4], "kernel": [3, 5], "stride": 1},
        {"depth": 1, "channels": 16, "expansion": 4}], "options": {"stem_channels": 8, "last_channels": 32},
        "head": {"type": "linear"}})
    d = space.sample(optuna.trial.FixedTrial({"stage0.depth": 2, "stage0.expansion": 4, "stage0.kernel": 5}),
                     gated=True, **SHAPE)
    net = d.build()
    assert net.has_gates and net.exit_stages == [1]
    assert d.network["backbone_options"]["settings"] == [[4, 8, 2, 1, 5], [4, 16, 1, 2, 3]]
    assert net.backbone.stages[1].block[1][0].kernel_size == (5, 5)  # the depthwise conv took kernel 5


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(space={}), "space: empty"),
    (lambda r: r["space"]["stages"][0].update(bogus=[1]), r"stages\[0\]: unknown key\(s\) bogus"),
    (lambda r: r["space"].update(familly="resnet"), "unknown key.*familly"),
    (lambda r: r["space"]["stages"][0].update(depth=["two"]), r"stage0.depth has 'two'"),
    (lambda r: r["space"]["stages"][0].update(depth=[]), "stage0.depth is an empty list"),
    (lambda r: r["space"].update(stages=[{"depth": 1, "channels": 8}]), "at least two stage groups"),
    (lambda r: r["space"].update(exits=[2]), "space.exits"),
    (lambda r: r["space"]["head"].update(type=["linear", "nope"]), "head.type has 'nope'"),
    (lambda r: r["space"].update(family="vit"), "space.family"),
    (lambda r: r["constraints"].update(accuracy_floor=90), "accuracy_floor: must be <= 1"),
    (lambda r: r["constraints"].update(macs_ceiling=-5), "macs_ceiling: must be > 0"),
    (lambda r: r["constraints"].pop("macs_ceiling"), "give both accuracy_floor"),
    (lambda r: r["constraints"].update(accuracy_floor="high"), "accuracy_floor: expected a number"),
    (lambda r: r.update(serch={}), "unknown top-level key.*serch"),
    (lambda r: r["train"].update(epoch=3), r"train: unknown key\(s\) epoch"),
    (lambda r: r["search"].update(sampler="cmaes"), "search.sampler"),
    (lambda r: r.update(policy={"name": "ensemble"}), "policy.name"),
    (lambda r: r.update(objective={"name": "joint", "options": {"wieghts": "sdn"}}),
     r"objective: objective 'joint' does not accept option\(s\) 'wieghts'"),
    (lambda r: r["train"].update(lr="abc"), "train/retrain: lr must be a number, got 'abc'"),
    (lambda r: r.update(space=[1]), r"space: expected a mapping such as \{family: resnet"),
])
def test_bad_config_names_the_key(mutate, match):
    raw = tiny()
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        SearchConfig.from_dict(raw)


# ------------------------------------------------------------------------------- front and repair
@pytest.mark.parametrize("points, front", [
    ([(0.9, 100), (0.8, 50), (0.85, 120), (0.95, 200)], [(0.8, 50), (0.9, 100), (0.95, 200)]),
    ([(0.9, 100), (0.9, 100), (0.9, 90)], [(0.9, 90)]),  # equal accuracy: the cheaper one only
    ([(0.7, 10), (0.7, 10)], [(0.7, 10)]),  # duplicates: once
    ([(0.5, 10), (0.6, 10)], [(0.6, 10)]),  # equal cost: the more accurate one
])
def test_pareto_front_by_table(points, front):
    recs = [{"number": i, "val_accuracy": a, "val_macs": m} for i, (a, m) in enumerate(points)]
    assert [(r["val_accuracy"], r["val_macs"]) for r in pareto_front(recs)] == front


def _cache_and_cost():
    """Two exits; exit 0 right on 80% of the samples, the final on all; confidence higher where right."""
    torch.manual_seed(0)
    n = 200
    y = torch.randint(0, 3, (n,))
    right0 = torch.arange(n) % 5 != 0
    conf0 = torch.where(right0, 2.0 + torch.rand(n), torch.rand(n))
    logits = torch.zeros(2, n, 3)
    wrong = (y + 1) % 3
    logits[0, torch.arange(n), torch.where(right0, y, wrong)] = conf0
    logits[1, torch.arange(n), y] = 5.0
    net = eenn.create_network("resnet_cifar", in_channels=1, num_classes=3, input_size=8, exits=[0],
                              depths=[1, 1], channels=[4, 8])
    return CachedOutputs(logits, None, y), net.cost()


def test_repair_lowers_thresholds_under_the_ceiling_keeping_the_floor():
    cache, cost = _cache_and_cost()
    th = ExitPolicy("max_prob", float("inf"))  # nobody leaves early: the full network's cost
    c0, c1 = cost.dynamic_macs
    mid = c0 + 0.5 * (c1 - c0)
    new, repaired = repair_thresholds(th, cache, cost, accuracy_floor=0.85, macs_ceiling=mid)
    after = evaluate_policy(new, cache, cost)
    assert repaired and after["expected_macs"] <= mid and after["accuracy"] >= 0.85
    # Already under the ceiling: unchanged.
    same, repaired = repair_thresholds(new, cache, cost, accuracy_floor=0.85, macs_ceiling=mid)
    assert not repaired and same == new
    # Under c0 + 10%, at least 90% must leave at exit 0, which is right on 80%: the floor 0.95
    # cannot hold, so the thresholds stay as they were.
    same, repaired = repair_thresholds(th, cache, cost, accuracy_floor=0.95, macs_ceiling=c0 + 0.1 * (c1 - c0))
    assert not repaired and same == th


# ------------------------------------------------------------------------------------ searching
def test_impossible_ceiling_is_reported_before_any_training(tmp_path):
    cfg = SearchConfig.from_dict(tiny(constraints={"accuracy_floor": 0.5, "macs_ceiling": 1000}))
    with pytest.raises(ImpossibleConstraints, match=r"impossible constraints: the MAC ceiling 1,000 is below the "
                                                    r"cheapest design of this space \([\d,]+ MACs"):
        run_search(cfg, out=tmp_path, progress=False)
    assert not (tmp_path / "study.db").exists()  # refused before a study was even made


def test_unreachable_floor_is_explained_not_an_empty_table(tmp_path, capsys):
    cfg = SearchConfig.from_dict(tiny(constraints={"accuracy_floor": 1.0, "macs_ceiling": 10**9},
                                      search={"trials": 1, "sampler": "random"}))
    res = run_search(cfg, out=tmp_path, storage="memory", progress=False)
    assert res.front == [] and not res.feasible
    assert "no admissible design" in res.message and "The most accurate reached" in res.message
    md = (tmp_path / "pareto.md").read_text()
    assert "no admissible design" in md and "| trial |" not in md
    assert json.loads((tmp_path / "pareto.json").read_text())["feasible"] is False


def test_search_on_digits_returns_admissible_non_dominated_designs(tmp_path):
    cfg = SearchConfig.from_dict(tiny(search={"trials": 3, "sampler": "nsga2", "population": 2, "seed": 1}))
    res = run_search(cfg, out=tmp_path, progress=False)
    assert res.front, res.message
    for d in res.front:
        assert d["val_accuracy"] >= cfg.accuracy_floor and d["val_macs"] <= cfg.macs_ceiling
        assert 0 <= d["test_accuracy"] <= 1 and d["test_macs"] > 0
        others = [o for o in res.front if o is not d]
        assert not any(o["val_accuracy"] >= d["val_accuracy"] and o["val_macs"] <= d["val_macs"] for o in others)
    # Constraints reached Optuna as constraints (not folded into the objectives).
    trained = [t for t in res.study.trials if t.state.name == "COMPLETE"]
    assert all(len(t.values) == 2 for t in trained)
    assert all(any(k.startswith("constraints") for k in t.system_attrs) for t in trained)
    for name in ("pareto.md", "pareto.json", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["feasible"] and len(doc["front"]) == len(res.front)
    # Every design's YAML is a run config that `eenn train --config` retrains.
    from eenn.config import load_config
    from eenn.run import build_data, build_network

    for d in doc["front"]:
        cfg = load_config(d["config_file"])
        net = build_network(cfg, build_data(cfg).info)
        assert net.cost().macs[-1] == d["full_macs"]
        assert cfg.train.epochs == 20
        assert cfg.meta["search"]["proxy_thresholds"] == d["thresholds"]


def test_first_epoch_pruning_and_pre_training_pruning_are_reported(tmp_path):
    # Only designs with 4 channels and one block in group 0 and an exit there fit under this ceiling.
    space = copy.deepcopy(SPACE)
    space["head"] = {"type": "linear"}
    cfg = SearchConfig.from_dict(tiny(space=space, search={"trials": 1, "sampler": "random", "prune_below": 0.99},
                                      constraints={"accuracy_floor": 0.2, "macs_ceiling": 25_000}))
    res = run_search(cfg, out=tmp_path, storage="memory", progress=False)
    pruned = [r for r in res.records if r["state"] == "PRUNED"]
    assert pruned and all(r["pruned_reason"] for r in pruned)
    assert any("after epoch 1" in r["pruned_reason"] for r in pruned)
    assert sum(counts_as_trained(r["state"], r) for r in res.records) == 1
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["trials"]["pruned"] == len(pruned) and "Every candidate was pruned" in doc["message"]


def _write_config(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _counted(url: str, name: str) -> list[int]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t.number for t in study.trials if counts_as_trained(t.state.name, t.user_attrs)]


def _wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a bound, not a wait)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s: {what}")
        time.sleep(0.05)


def _heartbeat_rows(db: Path, trial_id: int) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        return con.execute("SELECT count(*) FROM trial_heartbeats WHERE trial_id = ?", (trial_id,)).fetchone()[0]


# A search worker that stops at a chosen moment of its first trial, says so (the marker file) and
# waits there until the test kills it. The hooks live here, not in eenn.
_HELD_WORKER = r'''
import os, sys, threading
from pathlib import Path

import eenn.search.candidate as candidate
from eenn.search import load_config, run_search

where, marker, config, out = sys.argv[1:]


def hold(*args, **kwargs):
    Path(marker).write_text(str(os.getpid()))
    threading.Event().wait()


if where == "start":  # RUNNING, worker recorded, design not drawn yet, and never a heartbeat
    import optuna
    from eenn.search.space import SearchSpace

    optuna.storages.RDBStorage.record_heartbeat = lambda self, trial_id: None
    SearchSpace.sample = hold
elif where == "train":  # at the end of the first of two epochs
    candidate._FirstEpochPruner.on_epoch_end = hold
elif where == "evaluate":  # trained; calibrating the exit thresholds on validation
    candidate.calibrate = hold
run_search(load_config(config), out=out, progress=False, heartbeat=(1, 2), report=False)
'''


def test_killed_workers_trials_are_failed_requeued_and_the_resumed_studies_finish(tmp_path, capsys):
    """A worker killed before its trial's first heartbeat, while training, and while evaluating
    (one study each; the three held workers start together to share their start-up time)."""
    raw = tiny(search={"trials": 2, "sampler": "random"})
    cfg = SearchConfig.from_dict(raw)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    workers = {}
    for where in ("start", "train", "evaluate"):
        out = tmp_path / where
        out.mkdir()
        workers[where] = subprocess.Popen([sys.executable, "-c", _HELD_WORKER, where, str(out / "held"),
                                           str(_write_config(out, raw)), str(out)], env=env)
    held, before = {}, {}
    try:
        for where, worker in workers.items():
            out = tmp_path / where
            url, db = f"sqlite:///{out}/study.db", out / "study.db"
            _wait_for(lambda: (out / "held").exists() or worker.poll() is not None, 120,
                      f"the worker never reached {where!r}")
            assert worker.poll() is None, f"{where}: the worker exited instead of holding"
            (t,) = optuna.load_study(study_name="tiny", storage=url).get_trials(states=(TrialState.RUNNING,))
            assert t.user_attrs["worker_process"]["pid"] == worker.pid, where
            assert t.user_attrs["worker_process"]["heartbeat"] == 1, where  # it records that it beats
            if where == "start":
                assert not t.params and _heartbeat_rows(db, t._trial_id) == 0
            else:
                assert t.params, where
                _wait_for(lambda: _heartbeat_rows(db, t._trial_id) > 0, 60, f"{where}: the held trial never beat")
            # Another run on the study while that worker lives leaves the worker's trial alone.
            run_search(cfg, out=out, n_trials=1, progress=False, heartbeat=(1, 2), report=False)
            study = optuna.load_study(study_name="tiny", storage=url)
            assert study.trials[t.number].state == TrialState.RUNNING, where
            assert not study.get_trials(states=(TrialState.FAIL, TrialState.WAITING)), where
            held[where], before[where] = t, _counted(url, "tiny")
            assert len(before[where]) == 1, where
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
    for where, worker in workers.items():
        out, t = tmp_path / where, held[where]
        capsys.readouterr()
        res = run_search(cfg, out=out, n_trials=2, progress=True, heartbeat=(1, 2), report=False)
        said = capsys.readouterr().out
        assert f"trial {t.number} was left running by a worker that stopped (its worker process {worker.pid} " in said
        trials = res.study.trials
        assert not [r.number for r in trials if r.state == TrialState.RUNNING], where
        after = _counted(f"sqlite:///{out}/study.db", "tiny")
        assert set(before[where]) < set(after) and len(after) == 2, where  # the same study, the trials asked for
        dead = trials[t.number]
        assert dead.state == TrialState.FAIL, where
        assert f"worker process {worker.pid} " in dead.user_attrs["failed_because"], where
        retries = [r for r in trials if r.user_attrs.get("retried_from") == t.number]
        if where == "start":
            assert not retries  # it died before drawing a design: nothing to run again
        else:  # its design ran again, once, in the resumed run
            (retry,) = retries
            assert retry.state == TrialState.COMPLETE and retry.params == dead.params, where
            assert retry.user_attrs["worker_process"]["pid"] == os.getpid(), where


def _exited_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("sweep", ["at start", "before each trial"])
def test_dead_worker_rule_by_table(tmp_path, sweep):
    """Which RUNNING trials count as left by a dead worker. Heartbeats every second, with a grace
    period of 10 s so that "within grace" stays so on a slow machine; "an hour" is far past it."""
    study = create_study(SearchConfig.from_dict(tiny()), f"sqlite:///{tmp_path}/study.db", out=tmp_path,
                         heartbeat=(1, 10))
    storage = study._storage
    me = search_workers._this_process(1)
    if me["start"] is None:
        pytest.skip("needs /proc to read process start times")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for until the end: a zombie
    _wait_for(lambda: (search_workers._proc_stat(zombie.pid) or ("?",))[0] == "Z", 30, "the child never exited")
    far = {**me, "host": "elsewhere.example"}
    hour = 3600
    # name: (worker_process, seconds since its start, seconds since its heartbeat (None: none), dead)
    table = {
        "live worker, never beat, started an hour ago": (me, hour, None, False),
        "live worker, heartbeat an hour old": (me, hour, hour, False),
        "worker gone": ({**me, "pid": _exited_pid()}, 0, 0, True),
        "worker a zombie": ({**me, "pid": zombie.pid}, 0, 0, True),
        "pid reused by a later process": ({**me, "start": me["start"] - 1}, 0, 0, True),
        "other machine, heartbeat within grace": (far, hour, 1, False),
        "other machine, heartbeat an hour old": (far, hour, hour, True),
        "other machine, never beat, just started": (far, 0, None, False),
        "other machine, never beat, started an hour ago": (far, hour, None, True),
        "other machine without heartbeats": ({**far, "heartbeat": None}, hour, None, False),
        "no worker recorded, just started": (None, 0, None, False),
        "no worker recorded, heartbeat within grace": (None, hour, 1, False),
        "no worker recorded, started an hour ago": (None, hour, None, True),
        "a retry whose worker is gone too": ({**me, "pid": _exited_pid()}, 0, 0, True),
    }
    number = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
        for name in table:
            t = study.ask()
            t.suggest_int("case", 0, 1000)
            number[name] = t.number
    tids = {name: study.trials[number[name]]._trial_id for name in table}
    for name, (proc, *_) in table.items():
        if proc is not None:
            storage.set_trial_user_attr(tids[name], "worker_process", proc)
        if name.startswith("a retry"):
            storage.set_trial_user_attr(tids[name], "retried_from", 0)
    con = sqlite3.connect(tmp_path / "study.db", timeout=30)
    with con:  # one transaction: the times Optuna has no setter for
        for name, (proc, started, beat, _) in table.items():
            tid = tids[name]
            start = (datetime.now() - timedelta(seconds=started)).strftime("%Y-%m-%d %H:%M:%S.%f")
            con.execute("UPDATE trials SET datetime_start = ? WHERE trial_id = ?", (start, tid))
            if beat is not None:
                con.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES (?, datetime('now', ?))",
                            (tid, f"-{beat} seconds"))
    con.close()
    run = (lambda: search_study._recover_dead_trials(study)) if sweep == "at start" else (
        lambda: optuna.storages.fail_stale_trials(study))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        run()
        trials = study.trials
        for name, (_, _, _, dead) in table.items():
            t = trials[number[name]]
            assert (t.state == TrialState.FAIL) == dead and (t.state == TrialState.RUNNING) == (not dead), name
            assert ("failed_because" in t.user_attrs) == dead, name
        retried = {t.user_attrs["retried_from"]: t for t in trials if t.state == TrialState.WAITING}
        expect = {number[n] for n, row in table.items() if row[3] and not n.startswith("a retry")}
        assert set(retried) == expect  # each dead design queued once; a retry is not retried again
        run()  # nothing more to do
        assert len(study.trials) == len(trials)
        for _ in retried:  # each queued trial, once started, draws the design of the trial it retries
            warnings.simplefilter("ignore")
            t = study.ask()
            t.suggest_int("case", 0, 1000)
            assert t.params == trials[t.user_attrs["retried_from"]].params
    zombie.wait()


def test_resumed_search_draws_new_designs(tmp_path, monkeypatch):
    """A resumed search does not replay its sampler's earlier designs; a fresh one is reproducible."""
    monkeypatch.setattr(search_study, "evaluate_design", lambda *a, **k: {"val_accuracy": 0.5, "val_macs": 1e4})
    cfg = SearchConfig.from_dict(tiny(search={"trials": 3, "sampler": "random", "seed": 3}))

    def designs(out, n):
        res = run_search(cfg, out=tmp_path / out, n_trials=n, progress=False, report=False)
        return [t.params for t in res.study.trials]

    first = designs("a", 3)
    assert designs("b", 3) == first  # a new study: the same designs from the same seed
    resumed = designs("a", 6)
    assert resumed[:3] == first and len(resumed) >= 6
    assert resumed[3:6] != first  # the old code re-seeded with config.seed and drew `first` again
    assert search_study._sampler_seed(3, 0, 0) == 3 and search_study._sampler_seed(3, 1, 0) == 1003
    assert len({search_study._sampler_seed(3, w, n) for w in (0, 1) for n in (0, 3, 6)}) == 6


def test_two_workers_share_one_sqlite_study(tmp_path):
    raw = tiny(search={"trials": 4, "sampler": "random"}, train={"epochs": 3, "batch_size": 32},
               dataset={"name": "digits", "val_fraction": 0.2, "seed": 0, "val_limit": 100, "test_limit": 100})
    res = run_search(SearchConfig.from_dict(raw), out=tmp_path, workers=2, progress=False)
    trials = [t for t in res.study.trials if counts_as_trained(t.state.name, t.user_attrs)]
    assert len(trials) >= 4
    assert len({t.user_attrs["worker"] for t in res.study.trials}) == 2  # both processes wrote trials
    # Each worker checks for dead workers' trials before each of its trials: the other's live
    # trials were never among them.
    assert not [t.number for t in res.study.trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    assert len({t.number for t in res.study.trials}) == len(res.study.trials)


# ------------------------------------------------------------------------------------- the command
def test_cli_help_bad_config_and_impossible_constraints(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="eenn")
    sub = parser.add_subparsers(dest="command")
    search_cli.add_parser(sub)
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--help"])
    assert "eenn search --config configs/search_digits.yaml" in capsys.readouterr().out

    bad = tiny()
    bad["space"]["stages"][1]["width"] = [8]
    args = parser.parse_args(["search", "--config", str(_write_config(tmp_path, bad)), "--out", str(tmp_path)])
    assert search_cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("eenn search: error: space.stages[1]: unknown key(s) width") and err.count("\n") == 1

    args = parser.parse_args(["search", "--config", str(_write_config(tmp_path, tiny())), "--ceiling", "10",
                              "--out", str(tmp_path)])
    assert search_cli.run(args) == 2
    assert "impossible constraints" in capsys.readouterr().err


def test_cli_runs_a_search_and_rewrites_the_report(tmp_path, capsys):
    cfg = _write_config(tmp_path, tiny(search={"trials": 1, "sampler": "tpe"}))
    out = tmp_path / "out"
    assert search_cli.main(["--config", str(cfg), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[1/1 trained" in text and "best admissible" in text and "Pareto-optimal" in text
    # The same study reported under a floor nobody reaches: exit 1 and a sentence saying why.
    designs = sorted(p.name for p in (out / "designs").iterdir())
    assert designs  # the front's design configs
    (out / "designs" / "mine.yaml").write_text("# a file of the user's\n")
    assert search_cli.main(["--config", str(cfg), "--out", str(out), "--report-only", "--floor", "1.0"]) == 1
    assert "no admissible design" in capsys.readouterr().out
    # the designs that report left are off the front now: gone; the user's file stays
    assert sorted(p.name for p in (out / "designs").iterdir()) == ["mine.yaml"]
    # nothing to report in a fresh folder: said so, and no empty database or folder left there
    assert search_cli.main(["--config", str(cfg), "--out", str(tmp_path / "fresh"), "--report-only"]) == 2
    assert "no study 'tiny'" in capsys.readouterr().err and not (tmp_path / "fresh" / "study.db").exists()
    assert search_cli.main(["--config", str(cfg), "--out", str(tmp_path / "zero"), "--trials", "0"]) == 2
    assert "need trials >= 1" in capsys.readouterr().err and not (tmp_path / "zero").exists()


def test_nachos_objective_searches_gated_designs(tmp_path):
    space = copy.deepcopy(SPACE)
    space["head"] = {"type": "nachos", "width": 4}
    cfg = SearchConfig.from_dict(tiny(space=space, objective={"name": "nachos"}, policy={"name": "cumulative"},
                                      search={"trials": 1, "sampler": "random"},
                                      constraints={"accuracy_floor": 0.0, "macs_ceiling": 10**6}))
    assert cfg.objective_options["mmax"] == 10**6  # the MACs regulariser's ceiling is the constraint's
    res = run_search(cfg, out=tmp_path, storage="memory", progress=False)
    (done,) = [r for r in res.records if r["state"] == "COMPLETE"]
    assert done["network"]["head"] == "nachos" and 0 < done["val_accuracy"] <= 1


def test_a_design_another_worker_is_training_is_left_to_it():
    """Two searches started together on one study draw alike: a trial whose design is being
    trained by another (RUNNING) trial is pruned at once, free, naming that trial, instead of
    training the same design twice."""
    from eenn.search.study import _objective, load_search_data

    config = SearchConfig.from_dict(tiny())
    data = load_search_data(config)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    running = study.ask()  # another worker's trial, under way
    config.space.sample(running, gated=config.gated, **SHAPE)
    study.enqueue_trial(running.params)
    study.optimize(_objective(config, data, None), n_trials=1)
    (mine,) = [t for t in study.get_trials() if t.number != running.number]
    assert mine.state == TrialState.PRUNED and mine.user_attrs["duplicate_of"] == running.number
    assert "train_seconds" not in mine.user_attrs and not counts_as_trained("PRUNED", mine.user_attrs)


def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path):
    (tmp_path / "study.db").write_bytes(b"not a database" * 100)
    for url, why in [("foo://bar", "NoSuchModuleError"), (f"sqlite:///{tmp_path}/study.db", "file is not a database")]:
        with pytest.raises(ConfigError, match=f"cannot open the study storage .*{why}"):
            search_study._storage(url, tmp_path, (5, 20))
    assert (tmp_path / "study.db").read_bytes() == b"not a database" * 100  # left as it was


def test_ctrl_c_leaves_no_optuna_traceback():
    """Optuna logs a trial stopped by Ctrl-C with its traceback; the search filters that record
    out (its command says it in one line) and keeps every other failed trial's."""
    import logging

    search_study._quiet_interrupts()
    log = logging.getLogger("optuna.study._optimize")

    def record(exc, n):
        try:
            raise exc
        except BaseException:
            return log.makeRecord(log.name, logging.WARNING, __file__, 1, f"Trial {n} failed with parameters: {{}}",
                                  (), sys.exc_info())

    def value_line(n):  # what Optuna logs after the failure, without a traceback
        return log.makeRecord(log.name, logging.WARNING, __file__, 1, f"Trial {n} failed with value None.", (), None)

    assert not log.filter(record(KeyboardInterrupt(), 2)) and not log.filter(value_line(2))
    assert log.filter(record(ValueError("a real failure"), 3)) and log.filter(value_line(3))


def test_a_trial_stopped_by_ctrl_c_is_trained_when_the_search_resumes(tmp_path, monkeypatch):
    """Ctrl-C during a trial's training: Optuna marks it failed; its design is queued again, so
    that re-running the command trains it (rather than leaving it to the sampler's luck)."""
    cfg = SearchConfig.from_dict(tiny(search={"trials": 1, "sampler": "random", "seed": 0}))
    real = search_study.evaluate_design

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_study, "evaluate_design", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, out=tmp_path, progress=False, report=False)
    url = f"sqlite:///{tmp_path}/study.db"
    stopped, queued = optuna.load_study(study_name="tiny", storage=url).trials
    assert stopped.state == TrialState.FAIL and stopped.params
    assert queued.state == TrialState.WAITING and queued.user_attrs["retried_from"] == stopped.number
    assert stopped.user_attrs["failed_because"] == "stopped by Ctrl-C"
    monkeypatch.setattr(search_study, "evaluate_design", real)
    res = run_search(cfg, out=tmp_path, progress=False, report=False)
    (retry,) = [t for t in res.study.trials if t.user_attrs.get("retried_from") == stopped.number]
    assert retry.state == TrialState.COMPLETE and retry.params == stopped.params
    assert retry.user_attrs["retry_reason"] == "stopped by Ctrl-C"
    assert _counted(url, "tiny") == [retry.number]


def test_a_space_smaller_than_the_trials_asked_stops_when_all_are_measured(tmp_path, capsys):
    space = {"family": "resnet", "stages": [{"depth": 1, "channels": [4, 8]}, {"depth": 1, "channels": 8}],
             "head": {"type": "linear", "width": None}}
    config = SearchConfig.from_dict(tiny(space=space))
    assert config.space.size() == 2
    result = run_search(config, storage="memory", n_trials=3, out=tmp_path, progress=True)
    assert "the space holds 2 designs, fewer than the 3 trials asked" in capsys.readouterr().out
    trials = result.study.get_trials()
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 2 and len(trials) <= 6  # not 48 repeats


def test_nachos_epsilon_grid_by_hand():
    """NACHOS' tuning: one ε for every early exit, the first exit's at least 0.7, the ε with the
    best validation accuracy, the smaller on ties (NACHOS keeps the first found)."""
    from eenn.cost import CostTable
    from eenn.search.candidate import nachos_epsilon

    def logits(q, right):  # two classes, the target is 0: top probability q, on the target or not
        d = math.log(q / (1 - q))
        return [d, 0.0] if right else [0.0, d]

    # per sample (exit 0, exit 1, final): see the accuracies below
    rows = [[logits(0.75, False), logits(0.9, True), logits(0.9, True)],
            [logits(0.6, False), logits(0.55, False), logits(0.9, True)],
            [logits(0.72, True), logits(0.65, False), logits(0.9, False)]]
    cache = CachedOutputs(torch.tensor(rows).permute(1, 0, 2).contiguous(), None, torch.zeros(3, dtype=torch.long))
    cost = CostTable(("e0", "e1", "final"), (0, 1, 2), (1, 2, 3), (0, 0, 0), (1, 2, 3), (1, 2, 3), (1, 1, 1),
                     (1 / 3, 2 / 3, 1.0), 3)
    # ε <= 0.5: 1/3 (the first two leave wrong); 0.6: 2/3; 0.7: 2/3; 0.8: 2/3 (the third goes on, wrong)
    got = nachos_epsilon(eenn.ExitPolicy("max_prob"), cache, cost)
    assert got.thresholds.tolist() == pytest.approx([0.7, 0.6])
    assert nachos_epsilon(eenn.ExitPolicy("max_prob"), cache, cost, grid=(0.8, 0.7)).thresholds.tolist() == \
        pytest.approx([0.8, 0.8])
    with pytest.raises(ValueError, match="not for 'entropy'"):
        nachos_epsilon(eenn.ExitPolicy("entropy"), cache, cost)


def test_search_calibrates_with_nachos_grid_when_asked(tmp_path):
    cfg = SearchConfig.from_dict(tiny(policy={"name": "max_prob", "calibration": "nachos"},
                                      search={"trials": 1, "sampler": "random"},
                                      constraints={"accuracy_floor": 0.0, "macs_ceiling": 10**9}))
    assert SearchConfig.from_dict(cfg.to_dict()).calibration == "nachos"
    res = run_search(cfg, out=tmp_path, storage="memory", progress=False)
    (done,) = [r for r in res.records if r["state"] == "COMPLETE"]
    th = done["thresholds"]
    grid = (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8)
    eps = th[-1] if len(th) > 1 else th[0]
    assert min(abs(eps - g) for g in grid) < 1e-6 and th[0] == pytest.approx(max(0.7, eps))
    assert th[1:] == pytest.approx([eps] * (len(th) - 1))
    for bad, msg in [({"calibration": "grid"}, "choose fit"), ({"name": "entropy", "calibration": "nachos"}, "not for 'entropy'")]:
        with pytest.raises(ConfigError, match=msg):
            SearchConfig.from_dict(tiny(policy=bad))
