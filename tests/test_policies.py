"""Exit policies (hand-written outputs -> expected exits), calibration on synthetic caches whose
answer is known by construction, and the oracle."""
import itertools
import math

import pytest
import torch

import eenn

from eenn.cost import CostTable
from eenn.outputs import CachedOutputs
from eenn.functional import ensemble_so_far
from eenn.objectives.ztw import GeometricEnsemble
from eenn.policies import (ExitPolicy, Goal, calibrate, captured_share, decide, evaluate_policy, get_policy, list_policies,
                           msdnet_distribution, oracle, oracle_exit, policy_scores, register_policy, report_goal)

C = 3


def logits_from(conf, pred):
    """``[E, N, C]`` logits whose softmax gives ``conf`` to class ``pred`` and shares the rest."""
    conf, pred = torch.as_tensor(conf, dtype=torch.float64), torch.as_tensor(pred)
    p = ((1 - conf) / (C - 1))[..., None].expand(*conf.shape, C).clone()
    p.scatter_(-1, pred[..., None], conf[..., None])
    return p.log().float()


def cost_table(dynamic, static=None):
    static = static or dynamic
    return CostTable(exit_names=tuple(f"e{i}" for i in range(len(dynamic))), stage_index=tuple(range(len(dynamic))),
                     backbone_macs=tuple(static), head_macs=(0,) * len(dynamic), macs=tuple(static),
                     dynamic_macs=tuple(dynamic), params=(0,) * len(dynamic),
                     fraction=tuple(m / static[-1] for m in static), total_params=0)


# --- rules: hand-written outputs -> expected exit and prediction ------------------------------

# Three samples over three exits; the prediction at exit e is class e (so it names the exit).
CONF = [[0.90, 0.50, 0.50],   # exit 0
        [0.40, 0.95, 0.70],   # exit 1
        [0.60, 0.60, 0.60]]   # final
PRED = [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
GATES = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.0, 0.0, 0.0]])

CASES = [
    # policy, thresholds, fallback, expected exits
    ("max_prob", [0.8, 0.8], "final", [0, 1, 2]),
    ("max_prob", [0.85, 0.96], "final", [0, 2, 2]),
    ("max_prob", [0.99, 0.99], "final", [2, 2, 2]),          # none fires -> final
    ("max_prob", [0.99, 0.99], "most_confident", [0, 1, 1]),  # SDN: the most confident exit answers
    ("max_prob", [0.95, 0.65], "final", [2, 1, 1]),          # per-exit thresholds
    ("entropy", [0.5, 0.5], "final", [0, 1, 2]),             # H(0.9,.05,.05)=0.39, H(0.95,..)=0.23, H(0.7,..)=0.80
    ("entropy", [0.1, 0.1], "most_confident", [0, 1, 1]),    # lowest entropy answers
    ("margin", [0.8, 0.8], "final", [0, 1, 2]),              # margins .85/.25/.25, .1/.925/.55
    ("margin", [0.2, 0.5], "final", [0, 0, 0]),
    ("gate", [0.5, 0.5], "final", [0, 1, 2]),                # 0.5 is not > 0.5
    ("gate", [0.95, 0.7], "final", [2, 1, 2]),
    ("gate", [0.95, 0.95], "most_confident", [0, 1, 0]),     # ties -> the earliest
]


@pytest.mark.parametrize("policy,thresholds,fallback,expected", CASES)
def test_rule_table(policy, thresholds, fallback, expected):
    d = decide(policy, logits_from(CONF, PRED), torch.tensor(thresholds), gates=GATES, fallback=fallback)
    assert d.exit.tolist() == expected
    assert d.prediction.tolist() == expected  # the answering exit's prediction
    assert d.depth.tolist() == (expected if fallback == "final" else
                                [e if fired else 2 for e, fired in zip(expected, _fired(policy, thresholds))])


def _fired(policy, thresholds):
    d = decide(policy, logits_from(CONF, PRED), torch.tensor(thresholds), gates=GATES)
    return [e < 2 for e in d.exit.tolist()]


def test_cached_outputs_and_scalar_thresholds():
    cache = CachedOutputs(logits_from(CONF, PRED), GATES, torch.tensor([0, 1, 2]))
    assert decide("gate", cache, 0.5).exit.tolist() == [0, 1, 2]
    assert decide("max_prob", cache, 0.8).exit.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one threshold per non-final exit"):
        decide("max_prob", cache, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="needs gates"):
        decide("gate", logits_from(CONF, PRED), 0.5)


@pytest.mark.parametrize("gates,eps,expected", [
    # pi = stick-breaking: [.5, .25, .25] -> s = [.5, .75, 1]
    ([0.5, 0.5, 0.3], [0.6, 0.7], 1),
    ([0.5, 0.5, 0.3], [0.5, 0.9], 0),   # >= fires at equality
    ([0.5, 0.5, 0.3], [0.6, 0.8], 2),   # none fires -> final
    ([0.1, 0.9, 0.0], [0.5, 0.9], 1),   # s = [.1, .91, 1]
    ([0.1, 0.9, 0.0], [0.05, 0.99], 0),
])
def test_cumulative(gates, eps, expected):
    g = torch.tensor(gates)[:, None]
    logits = torch.zeros(3, 1, C)
    assert decide("cumulative", logits, torch.tensor(eps), gates=g).exit.item() == expected


@pytest.mark.parametrize("preds,t,expected", [
    # five exits; counter c_i = c_{i-1}+1 if pred agrees with the previous exit, else 0
    ([0, 0, 0, 0, 0], 1, 1),
    ([0, 0, 0, 0, 0], 2, 2),
    ([0, 1, 1, 1, 1], 2, 3),
    ([0, 1, 0, 1, 0], 1, 4),                 # never agrees -> final
    ([0, 1, 2, 0, 1], 0, 0),                 # t = 0 exits at once
    ([0, 0, 1, 1, 2], [3, 3, 1, 1], 3),      # counters 0,1,0,1: per-exit patience
    ([0, 0, 0, 1, 1], [5, 2, 5, 5], 4),      # exit 1 has counter 1 < 2, exit 2 counter 2 < 5
])
def test_patience(preds, t, expected):
    logits = logits_from([[0.9]] * 5, [[p] for p in preds])
    s = policy_scores("patience", logits)
    assert decide("patience", logits, torch.as_tensor(t, dtype=torch.float32)).exit.item() == expected
    assert s.score[0].item() == 0


def test_ensemble_probs_and_prediction():
    logits = logits_from(CONF, PRED)
    probs = torch.tensor([[[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]],
                          [[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]],
                          [[0.3, 0.3, 0.4], [0.4, 0.3, 0.3]]])
    d = decide("ensemble", logits[:, :2], [0.85, 0.85], probs=probs)
    assert d.exit.tolist() == [0, 2]
    assert d.prediction.tolist() == [0, 0]  # the ensemble's argmax, not the exit's own (class 2)
    d = decide("ensemble", logits[:, :2], [0.85, 0.75], probs=probs)
    assert d.exit.tolist() == [0, 1] and d.prediction.tolist() == [0, 2]


def test_ensemble_aep_weights_and_ztw():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, C) * 3
    w = torch.tensor([0.0, 1.0, 2.0, 1.0])
    th = torch.tensor([0.5, 0.7, 0.8])
    want = ensemble_so_far(logits, w)
    d = decide("ensemble", logits, th, weights=w)
    assert (d.exit > 0).all()  # exit 0 has no ensemble yet (weight 0): score 0
    assert torch.equal(d.prediction, want.argmax(-1).gather(0, d.exit[None])[0])
    assert torch.equal(d.exit, decide("ensemble", logits, th, probs=want).exit)
    ens = GeometricEnsemble(4, C)
    with torch.no_grad():
        probs = ens(logits).softmax(-1)
    assert torch.equal(decide("ensemble", logits, th, ensemble=ens).exit, decide("ensemble", logits, th, probs=probs).exit)
    with pytest.raises(ValueError, match="exactly one"):
        decide("ensemble", logits, th)


def test_registry():
    assert set(list_policies()) >= {"max_prob", "entropy", "margin", "gate", "cumulative", "patience", "ensemble"}
    with pytest.raises(KeyError, match="did you mean"):
        get_policy("max_probs")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("max_prob")(lambda logits, gates=None: None)
    with pytest.raises(ValueError, match="does not accept"):
        decide("max_prob", logits_from(CONF, PRED), 0.5, weights=torch.ones(3))


# --- calibration ------------------------------------------------------------------------------

def synthetic(n, seed, rules, num_exits=3):
    """A cache where exit e's confidence is uniform in [0.4, 1) and it is right iff ``rules[e](conf)``;
    the final exit is always right."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.4 + 0.6 * torch.rand(num_exits, n, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    right = torch.stack([torch.tensor([bool(r(c)) for c in row]) for r, row in zip(rules, conf)] + [torch.ones(n, dtype=torch.bool)])[:num_exits]
    pred = torch.where(right, y, (y + 1) % C)
    return CachedOutputs(logits_from(conf, pred), None, y), conf


COST3 = cost_table([10, 20, 100], [8, 15, 90])


def test_max_drop_zero_keeps_accuracy_and_saves():
    rules = [lambda c: c > 0.7]
    val, conf = synthetic(120, 0, rules, num_exits=2)
    cost = cost_table([10, 100], [8, 90])
    fitted = calibrate("max_prob", val, cost, {"max_drop": 0.0})
    th = fitted.thresholds
    r = evaluate_policy(fitted, val, cost)
    assert r["accuracy"] == 1.0
    confident = (conf[0] > 0.7).double().mean().item()
    assert r["expected_macs"] == pytest.approx(10 * confident + 100 * (1 - confident))  # every safe sample leaves
    assert 0.7 < th[0] <= conf[0][conf[0] > 0.7].min() + 1e-6


def test_thresholds_are_per_exit():
    rules = [lambda c: c > 0.85, lambda c: c > 0.5]
    val, conf = synthetic(120, 1, rules)
    fitted = calibrate("max_prob", val, COST3, Goal(max_drop=0.0))
    th = fitted.thresholds
    r = evaluate_policy(fitted, val, COST3)
    a0, a1 = conf[0] > 0.85, conf[1] > 0.5
    best = torch.where(a0, 10.0, torch.where(a1, 20.0, 100.0)).double().mean().item()
    assert r["accuracy"] == 1.0 and r["expected_macs"] == pytest.approx(best)
    assert th[0] > 0.8 and th[1] < 0.6
    # no shared threshold gets there
    shared = min(evaluate_policy(ExitPolicy("max_prob", t), val, COST3)["expected_macs"]
                 for t in conf.flatten().tolist() if evaluate_policy(ExitPolicy("max_prob", t), val, COST3)["accuracy"] == 1.0)
    assert shared > best + 1


def test_budget_respected_and_best_accuracy():
    rules = [lambda c: c > 0.8, lambda c: c > 0.6]
    val, conf = synthetic(40, 2, rules)
    budget = 22.0  # binding: the all-correct thresholds cost 30
    r = evaluate_policy(calibrate("max_prob", val, COST3, {"budget": budget}), val, COST3)
    assert r["expected_macs"] <= budget
    score = policy_scores("max_prob", val).score  # exhaustive: every partition at both exits
    cands, cands1 = ([-math.inf, math.inf] + score[i].tolist() for i in range(2))
    brute = max(x["accuracy"] for x in (evaluate_policy(ExitPolicy("max_prob", [a, b]), val, COST3)
                                        for a, b in itertools.product(cands, cands1)) if x["expected_macs"] <= budget)
    assert r["accuracy"] == pytest.approx(brute)


@pytest.mark.parametrize("policy", ["max_prob", "entropy"])
def test_msdnet_reproduces_distribution_on_val(policy):
    torch.manual_seed(3)
    logits = torch.randn(4, 1000, C) * 2
    val = CachedOutputs(logits, None, torch.randint(0, C, (1000,)))
    cost = cost_table([10, 20, 30, 100])
    counts = torch.bincount(decide(calibrate(policy, val, cost, {"msdnet_q": 2.0}), val).exit, minlength=4)
    p = msdnet_distribution(2.0, 4)
    assert counts[:3].tolist() == [math.floor(1000 * p[k].item()) for k in range(3)]


def test_msdnet_leaves_an_exit_empty_when_too_few_samples_are_left():
    """Ties at exit 0 let 9 of 10 samples leave where 6 were wanted; exit 1 wants 3 of the one
    left: as in MSDNet's code, nobody leaves there (its threshold stays out of reach) and the
    last sample goes on to the final exit."""
    from eenn.policies.calibrate import _msdnet

    sc = torch.tensor([[0.9] * 9 + [0.1], [0.5] * 9 + [0.8], [0.0] * 10])
    th = _msdnet(sc, False, torch.tensor([0.6, 0.3, 0.1]))
    assert th[0].item() == pytest.approx(0.9) and th[1].item() == math.inf


def test_fit_on_val_report_on_test():
    rules = [lambda c: c > 0.85, lambda c: c > 0.5]
    val, _ = synthetic(300, 4, rules)
    test, _ = synthetic(300, 5, rules)
    goal = Goal(max_drop=0.0)
    fitted = calibrate("max_prob", val, COST3, goal)
    r = report_goal(fitted, test, COST3, goal)
    assert r["goal_held"] and r["accuracy"] == 1.0 and r["speedup"] > 1
    assert r["oracle_macs"] <= r["expected_macs"] and 0 < r["captured_share"] <= 1
    assert sum(r["exit_distribution"]) == pytest.approx(1.0)
    # a test split where exit 0 is confidently wrong: the goal is measured there and fails
    bad, _ = synthetic(300, 5, [lambda c: c < 0.85, rules[1]])
    assert not report_goal(fitted, bad, COST3, goal)["goal_held"]
    budget = report_goal(calibrate("max_prob", val, COST3, {"budget": 40}), test, COST3, {"budget": 40})
    assert set(budget) >= {"accuracy", "expected_macs", "speedup", "exit_distribution", "goal_held"}


def noisy(n, seed):
    """Two exits: exit 0 is right with probability equal to its confidence, the final with 0.9."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.4 + 0.6 * torch.rand(2, n, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    right = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) < conf[0],
                         torch.rand(n, generator=g, dtype=torch.float64) < 0.9])
    return CachedOutputs(logits_from(conf, torch.where(right, y, (y + 1) % C)), None, y)


def test_guarded_max_drop():
    cost = cost_table([10, 100], [8, 90])
    val, test = noisy(4000, 0), noisy(20000, 1)
    plain = calibrate("max_prob", val, cost, Goal(max_drop=0.05)).thresholds
    guarded = calibrate("max_prob", val, cost, Goal(max_drop=0.05, alpha=0.1))
    assert math.isfinite(guarded.thresholds.item()) and guarded.thresholds.item() > plain.item()  # more careful, still saves
    r = report_goal(guarded, test, cost, Goal(max_drop=0.05, alpha=0.1))
    assert r["goal_held"] and r["speedup"] > 1 and r["goal"]["alpha"] == 0.1
    # too few validation samples to certify anything: nobody leaves early
    assert calibrate("max_prob", noisy(100, 0), cost, Goal(max_drop=0.05, alpha=0.1)).thresholds.tolist() == [math.inf]


def test_goal_validation():
    with pytest.raises(ValueError, match="alpha"):
        Goal(budget=3, alpha=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        Goal(max_drop=0.1, budget=3)
    with pytest.raises(ValueError, match="exactly one"):
        Goal()
    with pytest.raises(ValueError, match=r"unknown goal key 'maxdrop' \(did you mean 'max_drop'\?\); goal keys: max_drop"):
        calibrate("max_prob", *_tiny_val(), {"maxdrop": 0.01})
    for bad in ("max_drop=0.01", 0.01):
        with pytest.raises(TypeError, match="a goal is a Goal or a mapping such as"):
            calibrate("max_prob", *_tiny_val(), bad)
    with pytest.raises(TypeError, match=r"goal 'max_drop' must be a number in \[0, 1\].*got '1%'"):
        Goal(max_drop="1%")
    for goal, key in [({"max_drop": 1.5}, "max_drop"), ({"max_drop": -0.1}, "max_drop"), ({"budget": math.nan}, "budget"),
                      ({"budget": 0}, "budget"), ({"msdnet_q": 0}, "msdnet_q"), ({"msdnet_q": math.inf}, "msdnet_q"),
                      ({"max_drop": 0.1, "alpha": 1}, "alpha"), ({"msdnet_q": 2, "tolerance": -1}, "tolerance")]:
        with pytest.raises(ValueError, match=f"goal '{key}' must be a finite number"):
            Goal(**goal)
    assert msdnet_distribution(1e200, 3).tolist() == [0.0, 1e-200, 1.0]  # no overflow to nan
    with pytest.raises(TypeError, match=r"cost table, a CostTable \(net.cost\(\)\).*got a list"):
        calibrate("max_prob", _tiny_val()[0], [10, 20, 100], {"max_drop": 0.01})


def _tiny_val():
    return CachedOutputs(logits_from([[0.9, 0.6], [0.9, 0.9], [0.9, 0.9]], [[0, 1], [0, 1], [0, 1]]), None,
                         torch.tensor([0, 1])), COST3


# --- oracle -----------------------------------------------------------------------------------

def test_oracle_hand_example():
    right = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # [E, N]
    y = torch.tensor([0, 1, 2, 0])
    pred = torch.where(right, y, (y + 1) % C)
    cache = CachedOutputs(logits_from(torch.full((3, 4), 0.9), pred), None, y)
    assert oracle_exit(pred, y).tolist() == [0, 1, 2, 2]
    o = oracle(cache, COST3)
    assert o["accuracy"] == 0.75
    assert o["expected_macs"] == pytest.approx((10 + 20 + 100 + 100) / 4)
    assert o["exit_distribution"] == [0.25, 0.25, 0.5]
    assert captured_share(70.0, o["expected_macs"], 90.0) == pytest.approx(20 / 32.5)
    assert captured_share(90.0, o["expected_macs"], 90.0) == 0.0


@pytest.mark.parametrize("policy", ["max_prob", "entropy", "margin", "gate", "cumulative", "patience", "ensemble"])
@pytest.mark.parametrize("fallback", ["final", "most_confident"])
def test_every_policy_calibrates_to_a_budget(policy, fallback):
    torch.manual_seed(1)
    y = torch.randint(0, C, (200,))
    logits = torch.randn(4, 200, C) + 2 * torch.arange(4)[:, None, None] * torch.nn.functional.one_hot(y, C)
    cache = CachedOutputs(logits, torch.rand(4, 200), y)
    cost = cost_table([10, 20, 30, 100])
    opts = {"weights": torch.tensor([1.0, 1.0, 2.0, 2.0])} if policy == "ensemble" else {}
    fitted = calibrate(policy, cache, cost, {"budget": 40}, fallback=fallback, **opts)
    assert fitted.thresholds.shape == (3,) and fitted.fallback == fallback and fitted.name == policy
    r = evaluate_policy(fitted, cache, cost)
    assert r["expected_macs"] <= 40
    d = decide(fitted, cache)
    assert torch.tensor(cost.dynamic_macs, dtype=torch.float64)[d.depth].mean().item() == pytest.approx(r["expected_macs"])
    assert (d.prediction == y).double().mean().item() == pytest.approx(r["accuracy"])


@pytest.mark.parametrize("policy, opts", [
    ("max_prob", {}), ("entropy", {}), ("margin", {}), ("gate", {}), ("cumulative", {}), ("patience", {}),
    ("ensemble", {"weights": torch.tensor([0.1, 0.0, 0.3, 0.6])}),
])
def test_one_exit_at_a_time_equals_all_at_once(policy, opts):
    """The engine's incremental form of each rule gives bit-identical scores and predictions."""
    from eenn.policies.rules import exit_step

    torch.manual_seed(1)
    logits = torch.randn(4, 50, 6) * 2
    logits[2, :25] = logits[1, :25]  # some agreement for patience
    gates = torch.rand(4, 50)
    gates[-1] = 1.0
    full = eenn.policies.policy_scores(policy, logits, gates=gates, **opts)
    step, carry = exit_step(policy, 4, **opts), None
    for k in range(4):
        s, carry = step(carry, logits[k], gates[k], k)
        assert s.rule == full.rule
        assert torch.equal(s.score, full.score[k]) and torch.equal(s.prediction, full.prediction[k]), k


def test_ztw_ensemble_has_no_one_exit_form():
    from eenn.objectives.ztw import GeometricEnsemble
    from eenn.policies.rules import exit_step

    assert exit_step("ensemble", 4, ensemble=GeometricEnsemble(4, 6)) is None
    with pytest.raises(ValueError, match="weights"):
        exit_step("ensemble", 4, weights=torch.tensor([0.0, 0.0, 0.0, 0.0]))


# --- the policy object and the one exit loop ------------------------------------------------

def _random_cache(n=300, e=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (n,), generator=g)
    logits = torch.randn(e, n, 6, generator=g) * 2
    logits[2, : n // 3] = logits[1, : n // 3]  # agreements for patience, ties for most_confident
    gates = torch.rand(e, n, generator=g)
    gates[-1] = 1.0
    return CachedOutputs(logits, gates, y)


POLICIES = [("max_prob", {}, 0.6), ("entropy", {}, 1.2), ("margin", {}, 0.3), ("gate", {}, 0.5),
            ("cumulative", {}, 0.6), ("patience", {}, 1.0), ("ensemble", {"weights": [0.1, 0.0, 0.3, 0.6]}, 0.6),
            ("ensemble", {"weights": "linear"}, 0.5),
            ("ensemble", {"ensemble": GeometricEnsemble(4, 6)}, 0.5)]


@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("rule, opts, th", POLICIES)
def test_exit_loop_equals_vectorised_routing(rule, opts, th, fallback):
    """The exit loop (what the engine, the ONNX runner and the tiers run) makes, sample for sample,
    the decisions of the vectorised routing that calibration sweeps."""
    from eenn.policies import route

    cache = _random_cache()
    policy = ExitPolicy(rule, [th, th * 0.9, th * 1.1], fallback=fallback, **opts)
    bound = policy.bind(4)
    s = bound.scores(cache.logits, cache.gates)
    exit_, depth = route(s.score, bound.thresholds, s.rule, fallback=fallback)
    d = decide(policy, cache)
    assert 0 < (d.exit < 3).sum() < 300  # a real mix of early and late exits
    assert torch.equal(d.exit, exit_) and torch.equal(d.depth, depth)
    assert torch.equal(d.prediction, s.prediction.gather(0, exit_[None]).squeeze(0))


@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("rule, opts, th", POLICIES)
def test_exit_loop_pools_the_survivors_of_several_batches(rule, opts, th, fallback):
    """Running.cat / Running.split: the survivors of three batches (their indices sample ids
    across them) pooled after two exits and cut again run on to the same decisions."""
    from eenn.policies.loop import Answers, Running, run_exits, simulate_segment, start

    cache = _random_cache()
    policy = ExitPolicy(rule, [th, th * 0.9, th * 1.1], fallback=fallback, **opts)
    bound, seg, answers = policy.bind(4), simulate_segment(cache.logits, cache.gates), Answers()
    cuts = [0, 70, 130, 300]
    left = [run_exits(bound, start(torch.arange(a, b), offset=a), seg, answers, stop=2, probs=True)
            for a, b in zip(cuts, cuts[1:])]
    pooled = Running.cat([r for r in left if r is not None])
    assert pooled.next == 2 and pooled.batch == 300 and torch.equal(pooled.index, pooled.index.sort().values)
    assert (pooled.seen is None) == (fallback == "final") and pooled.last is not None
    n = len(pooled) // 2
    head, rest = pooled.split(n)
    assert n > 0 and len(head) == n and len(rest) == len(pooled) - n and pooled.split(len(pooled))[0] is pooled
    assert pooled.split(len(pooled))[1] is None
    for part in (rest, head):
        assert run_exits(bound, part, seg, answers, probs=True) is None
    out, d = answers.ordered(300), decide(policy, cache)
    assert torch.equal(out["exit"], d.exit) and torch.equal(out["depth"], d.depth)
    assert torch.equal(out["prediction"], d.prediction)
    with pytest.raises(ValueError, match="different segments"):
        Running.cat([pooled, start(torch.arange(3))])


@pytest.mark.parametrize("rule, opts, th", POLICIES)
def test_policy_round_trips_through_json(rule, opts, th, tmp_path):
    import json

    from eenn.io import read_json, write_json

    cache = _random_cache(seed=1)
    policy = ExitPolicy(rule, [th, math.inf, th], fallback="most_confident", **opts)
    write_json(policy.to_dict(), tmp_path / "p.json")
    back = ExitPolicy.from_dict(read_json(tmp_path / "p.json"))
    json.dumps(policy.to_dict())  # plain JSON apart from the infinity
    assert back == policy and back.name == rule and back.fallback == "most_confident"
    assert torch.equal(decide(back, cache).exit, decide(policy, cache).exit)


def test_policy_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown exit rule 'max_probs'.*max_prob"):
        ExitPolicy("max_probs")
    with pytest.raises(ValueError, match="fallback"):
        ExitPolicy("max_prob", 0.5, fallback="best")
    with pytest.raises(ValueError, match="no thresholds.*calibrate"):
        decide(ExitPolicy("max_prob"), _random_cache())
    with pytest.raises(ValueError, match="needs gated exit heads"):
        ExitPolicy("gate", 0.5).bind(4, has_gates=False)
    with pytest.raises(ValueError, match="one ensemble weight per exit"):
        ExitPolicy("ensemble", 0.5, weights=[1.0, 1.0]).bind(4)
    with pytest.raises(ValueError, match="'uniform' or 'linear'"):
        ExitPolicy("ensemble", 0.5, weights="hybrid")
    # an older record ({"name"|"policy", "thresholds", "fallback", "policy_options"}) still reads
    old = {"policy": "ensemble", "thresholds": [0.5, 0.5, 0.5], "fallback": "final", "policy_options": {"weights": "linear"}}
    assert ExitPolicy.from_dict(old) == ExitPolicy("ensemble", 0.5, weights="linear").replace(thresholds=[0.5] * 3)


def test_policy_is_kept_with_the_weights_and_read_from_any_eenn_file(tmp_path):
    """eenn.save(net, path, policy=...) keeps a fitted policy in the checkpoint; ExitPolicy.load reads
    it back from there, from a calibration record, a report or an export manifest alike."""
    from eenn.io import write_json

    net = eenn.create_network("mlp", in_channels=1, num_classes=6, input_size=8, exits=[0])
    policy = ExitPolicy("ensemble", [math.inf], fallback="most_confident", weights="linear")
    eenn.save(net, tmp_path / "m.safetensors", policy=policy)
    assert ExitPolicy.load(tmp_path / "m.safetensors") == policy
    assert eenn.load(tmp_path / "m.safetensors").num_exits == 2  # the network reads as before
    write_json({"policy": policy.to_dict(), "goal": {"max_drop": 0.01}}, tmp_path / "calibration.json")
    assert ExitPolicy.load(tmp_path / "calibration.json") == policy
    eenn.save(net, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="holds no exit policy"):
        ExitPolicy.load(tmp_path / "plain.safetensors")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        ExitPolicy.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[0.9, 0.8]")  # thresholds alone: say what the file should hold
    with pytest.raises(ValueError, match="expected a JSON object with 'rule' and 'thresholds'.*got list"):
        ExitPolicy.load(tmp_path / "list.json")
