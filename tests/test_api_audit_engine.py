"""Python-API audit: the engine, the network and the policies refuse what they cannot honour,
in one line, and leave the caller's network as they found it."""
import math

import numpy as np
import pytest
import torch

import eenn
from eenn.policies import Goal, as_thresholds, calibrate, report_goal
from eenn.outputs import CachedOutputs
from _helpers import spread_net


@pytest.fixture(scope="module")
def net():
    return spread_net()  # 4 exits, eval mode, 8x8 grey input


def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


# 1. evaluate keeps a policy's own fallback; a rule name gets "final"
def test_evaluate_keeps_the_policys_fallback_and_the_networks_mode():
    torch.manual_seed(0)
    net = spread_net().train()
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.3,), (0.25,))
    split = (torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (24,)))
    data = eenn.data.from_tensors(split, split, split, num_classes=10)
    kw = dict(batch_sizes=(), curve_points=0, deployments="eager")
    sdn = eenn.ExitPolicy("max_prob", fallback="most_confident")
    assert eenn.evaluate(net, data, policy=sdn, **kw).data["policy"]["fallback"] == "most_confident"
    assert net.training  # 5. left in the mode it was found in
    assert eenn.evaluate(net.eval(), data, policy="max_prob", **kw).data["policy"]["fallback"] == "final"
    assert not net.training
    assert eenn.evaluate(net, data, policy=sdn, fallback="final", **kw).data["policy"]["fallback"] == "final"


# 2. truncate takes an exit index in range, no wrapping
@pytest.mark.parametrize("k", [4, 5, 7, -5, 1.9, 1.0, True, "1"])
def test_truncate_refuses_out_of_range_and_non_integer_indices(net, k):
    with pytest.raises(ValueError, match=r"integer exit index in -4\.\.3") as e:
        net.truncate(k)
    _one_line(e)


def test_truncate_takes_indices_in_range(net):
    assert net.truncate(1).num_exits == 2
    assert net.truncate(-3).num_exits == 2
    assert net.truncate(np.int64(2)).num_exits == 3
    assert net.truncate(-1) is net and net.truncate(3) is net


# 3. thresholds: NaN and non-numbers refused; inf is a threshold
@pytest.mark.parametrize("th", [float("nan"), [0.5, float("nan"), 0.5]])
def test_nan_thresholds_are_refused(net, th):
    with pytest.raises(ValueError, match="NaN") as e:
        eenn.DynamicEngine(net, "max_prob", th)
    _one_line(e)
    with pytest.raises(ValueError, match="NaN"):
        as_thresholds(th, 4)


@pytest.mark.parametrize("th", ["0.5", ["0.5", 0.5, 0.5], {"a": 1}])
def test_thresholds_that_are_not_numbers_are_refused(th):
    with pytest.raises(TypeError, match="thresholds are numbers") as e:
        eenn.ExitPolicy("max_prob", th)
    _one_line(e)


def test_infinite_thresholds_stay_allowed(net):
    x = torch.randn(5, 1, 8, 8)
    assert eenn.DynamicEngine(net, "max_prob", math.inf)(x).exit.tolist() == [3] * 5
    assert eenn.DynamicEngine(net, "max_prob", -math.inf)(x).exit.tolist() == [0] * 5


# 4. non-finite inputs refused by the engine (on by default)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_engine_refuses_non_finite_inputs(net, bad):
    x = torch.randn(3, 1, 8, 8)
    x[1, 0, 2, 2] = bad
    eng = eenn.DynamicEngine(net, "max_prob", 0.0)
    for given in (x, x.numpy()):
        with pytest.raises(ValueError, match="NaN or inf") as e:
            eng(given)
        _one_line(e)
    with pytest.raises(ValueError, match="NaN or inf"):
        list(eng.stream([x]))
    assert len(eenn.DynamicEngine(net, "max_prob", 0.0, check_finite=False)(x).exit) == 3


# 5. the engine does not switch the caller's network to eval mode
def test_engine_refuses_a_training_mode_network():
    net = spread_net().train()
    with pytest.raises(RuntimeError, match=r"eval mode: net\.eval\(\)") as e:
        eenn.DynamicEngine(net, "max_prob", 0.5)
    _one_line(e)
    assert net.training


# 6. other float types: converted by the engine, refused by net(x)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_types(net, dtype):
    x = torch.randn(4, 1, 8, 8)
    eng = eenn.DynamicEngine(net, "max_prob", 0.5)
    want = eng(x.to(dtype).float())
    got = eng(x.to(dtype))
    assert torch.equal(got.exit, want.exit) and torch.equal(got.prediction, want.prediction)
    with pytest.raises(ValueError, match=r"expected float32 inputs.*x\.to\(torch\.float32\)") as e:
        net(x.to(dtype))
    _one_line(e)


def test_float_type_follows_the_parameters():
    net = spread_net().double()
    x = torch.randn(2, 1, 8, 8)
    assert net(x.double()).logits.dtype == torch.float64
    with pytest.raises(ValueError, match="expected float64 inputs"):
        net(x)
    assert eenn.DynamicEngine(net, "max_prob", 0.5)(x).exit.shape == (2,)  # float32 converted to float64
    net.float()
    assert net(x).logits.dtype == torch.float32


# 7. 2-D thresholds and fractional micro-batches refused at construction
def test_two_dimensional_thresholds_are_refused_at_construction(net):
    with pytest.raises(ValueError, match=r"1-D.*\(1, 3\)") as e:
        eenn.DynamicEngine(net, "max_prob", [[0.5, 0.5, 0.5]])
    _one_line(e)


@pytest.mark.parametrize("mb", [2.5, 0, True, "4"])
def test_micro_batch_must_be_a_whole_number(net, mb):
    with pytest.raises(ValueError, match="micro_batch must be a positive whole number") as e:
        eenn.DynamicEngine(net, "max_prob", 0.5, micro_batch=mb)
    _one_line(e)
    assert eenn.DynamicEngine(net, "max_prob", 0.5, micro_batch=np.int64(2))(torch.randn(5, 1, 8, 8)).exit.shape == (5,)


# 8. a cache given as the policy
def test_a_cache_is_not_a_policy(net):
    cache = CachedOutputs(torch.randn(4, 50, 10), None, torch.zeros(50, dtype=torch.long))
    for make in (lambda: eenn.DynamicEngine(net, cache), lambda: eenn.ExitPolicy(cache)):
        with pytest.raises(TypeError, match="rule name.*got a CachedOutputs") as e:
            make()
        assert len(_one_line(e)) < 200


# 9. tolerance belongs to the msdnet_q goal
def _cache(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CachedOutputs(torch.randn(4, n, 10, generator=g) * 3, None, torch.randint(0, 10, (n,), generator=g))


def test_tolerance_only_with_msdnet_q(net):
    with pytest.raises(ValueError, match="'tolerance'.*msdnet_q.*'max_drop'") as e:
        calibrate("max_prob", _cache(), net.cost(), {"max_drop": 0.01, "tolerance": 0.5})
    _one_line(e)
    assert Goal(msdnet_q=2.0).tolerance == 0.05 and Goal(msdnet_q=2.0, tolerance=0.2).tolerance == 0.2
    p = calibrate("max_prob", _cache(), net.cost(), {"max_drop": 0.01})
    assert report_goal(p, _cache(seed=1), net.cost(), {"max_drop": 0.01})["goal"] == {"max_drop": 0.01}
    assert report_goal(p, _cache(seed=1), net.cost(), {"msdnet_q": 2.0})["goal"] == {"msdnet_q": 2.0, "tolerance": 0.05}


# 10. a rule too coarse for the msdnet target says so
def test_msdnet_target_missed_by_a_coarse_rule_warns(net):
    with pytest.warns(UserWarning, match=r"rule 'patience'.*too coarse for the msdnet_q=1\.2 target") as w:
        calibrate("patience", _cache(), net.cost(), {"msdnet_q": 1.2})
    assert w[0].filename == __file__ and "\n" not in str(w[0].message)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a continuous score meets the target: no warning
        calibrate("max_prob", _cache(), net.cost(), {"msdnet_q": 1.2})
