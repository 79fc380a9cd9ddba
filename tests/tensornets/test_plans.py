"""One plan type: every candidate computes x W^T; formula, forced and measured strategies; the wisdom file."""

from __future__ import annotations

import json

import pytest
import torch

import tensornets
from tensornets import plans, wisdom
from tensornets.formats.base import traffic_weight
from format_cases import IN, OUT, low_rank_plus_noise
from tolerance import assert_close


@pytest.fixture
def wisdom_file(monkeypatch, tmp_path):
    """A private wisdom file, read afresh by this test."""
    path = tmp_path / "cache" / "wisdom.json"
    monkeypatch.setenv("TENSORNETS_CACHE", str(path.parent))
    wisdom.forget()
    yield path
    wisdom.forget()


@pytest.fixture(autouse=True)
def _formula_strategy():
    yield
    plans.set_strategy("formula")


def _mpo(rank: int = 3, **kw) -> tensornets.MPO:
    return tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "mpo", rank=rank, num_cores=3, **kw)


def test_every_candidate_of_every_format_computes_x_w_t(format_case):
    fmt, kw = format_case
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.5), fmt, rank=3, **kw)
    x = torch.randn(5, IN, dtype=torch.float64)
    expected = x @ fact.to_dense().T
    candidates = fact._candidates(8)
    assert candidates[0].name == "rebuild" and len({c.label for c in candidates}) == len(candidates)
    for plan in candidates:
        assert isinstance(plan, plans.Plan) and plan.flops > 0 and plan.traffic > 0
        # a backward has two products per forward product and moves more than the forward did
        assert plan.backward_flops >= 2 * plan.flops - 2 * 8 * IN and plan.backward_traffic > plan.traffic
        assert_close(plan.apply(fact, x)[:, :OUT], expected, what=plan.label)
        # forcing the candidate by name runs it in forward
        fact.set_strategy(plan.name)
        assert fact.strategy(5) == plan.name
        assert_close(fact(x), expected, what=f"forward forced to {plan.name}")


def test_formula_is_the_cheapest_candidate_and_ties_go_first():
    fact = _mpo()
    weight = traffic_weight("cpu")
    for batch in (1, 64, 4096):
        candidates = fact._candidates(batch)
        for grad in (False, True):
            best = min(c.cost(weight, grad) for c in candidates)
            assert fact.strategy(batch, grad=grad) == next(c for c in candidates if c.cost(weight, grad) == best).name
    a, b = plans.RebuildPlan("rebuild", 10, 1), plans.ContractPlan("contract", 10, 1)
    assert plans.cheapest([a, b], 384) is a and plans.cheapest([b, a], 384) is b
    with pytest.raises(ValueError, match="at least one"):
        plans.cheapest([], 1.0)


def test_strategy_settings_global_and_per_layer():
    fact = _mpo()
    formula = fact.strategy(512)
    forced = "einsum" if formula != "einsum" else "rebuild"
    tensornets.set_strategy(forced)
    assert tensornets.get_strategy() == forced and fact.strategy(512) == forced
    fact.set_strategy("formula")  # the layer's own choice wins over the global one
    assert fact.strategy(512) == formula
    with pytest.raises(ValueError, match="strategy='fastest' is not a strategy"):
        tensornets.set_strategy("fastest")
    with pytest.raises(ValueError, match="not a plan of lowrank"):
        tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "lowrank", rank=3).set_strategy("split").strategy(1)


def test_a_global_plan_forces_the_formats_that_have_it_and_the_others_warn():
    # a model mixing formats: "split" is an MPO plan only; the low-rank and TT layers choose by the formula
    torch.manual_seed(0)
    mpo = tensornets.FactorizedLinear.create(64, 64, "mpo", rank=4, num_cores=2)
    others = [tensornets.FactorizedLinear.create(64, 64, fmt, rank=4) for fmt in ("lowrank", "tt")]
    formula = [layer.factorization.strategy(8) for layer in others]
    tensornets.set_strategy("split")
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"set_strategy\('split'\): lowrank has no such plan .*choose by the formula"):
        for layer in (mpo, *others):
            assert torch.isfinite(layer(x)).all()
    assert mpo.factorization.strategy(8) == "split"
    assert [layer.factorization.strategy(8) for layer in others] == formula
    with pytest.raises(ValueError, match="not a plan of lowrank"):  # a layer's own choice is still checked
        others[0].factorization.set_strategy("split")


def test_wisdom_round_trips(wisdom_file):
    assert wisdom.lookup("k") is None and not wisdom_file.exists()
    wisdom.record("k", "split@2", {"rebuild": 2.0, "split@2": 1.0})
    wisdom.forget()  # read back from disk, not from memory
    assert wisdom.lookup("k") == {"plan": "split@2", "seconds": {"rebuild": 2.0, "split@2": 1.0}}
    data = json.loads(wisdom_file.read_text())
    assert data["version"] == 1 and list(data["machines"]) == [wisdom.machine_key()]
    assert f"threads={torch.get_num_threads()}" in wisdom.machine_key() and torch.__version__ in wisdom.machine_key()
    assert [p.name for p in wisdom_file.parent.iterdir()] == ["wisdom.json"]  # no temporary file left behind


def test_measured_choice_is_stored_and_reused(wisdom_file, monkeypatch):
    fact = _mpo()
    weight = traffic_weight("cpu")
    candidates = fact._candidates(512)
    labels = [c.label for c in candidates]
    timed_order = [c.label for c in sorted(candidates, key=lambda c: c.cost(weight))]  # cheapest first
    winner = next(label for label in labels if label != fact._plan(512).label)  # not what the formula picks

    calls: list[str] = []

    def timer(fn):
        calls.append(fn)
        return 1.0 if len(calls) == timed_order.index(winner) + 1 else 2.0

    assert fact.tune([300], timer=timer) == {512: winner}
    assert len(calls) == len(labels)
    assert fact._plan(512).label == winner
    stored = json.loads(wisdom_file.read_text())["machines"][wisdom.machine_key()]
    (key, entry), = stored.items()
    assert entry["plan"] == winner and sorted(entry["seconds"]) == sorted(labels)
    assert "mpo|" in key and "|B=512|cpu|float64" in key

    # A new process (forget) with an identical layer reuses the measurement: nothing is timed again.
    wisdom.forget()

    def no_timing(fn):
        raise AssertionError("timed although the wisdom file has the answer")

    monkeypatch.setattr(tensornets.formats.base, "default_timer", no_timing)
    twin = _mpo().set_strategy("measure")
    assert twin._plan(512).label == winner
    x = torch.randn(300, IN, dtype=torch.float64)
    with torch.no_grad():  # tune measured the plans of inference
        assert_close(twin(x), x @ twin.to_dense().T)


def test_measure_times_once_per_bucket_in_forward(wisdom_file, monkeypatch):
    calls = []

    def timer(fn):
        calls.append(fn)
        return float(len(calls))  # the first candidate timed (the formula's pick) wins

    monkeypatch.setattr(tensornets.formats.base, "default_timer", timer)
    fact = _mpo()
    formula_pick = fact.strategy(3)
    tensornets.set_strategy("measure")
    n = len(fact._candidates(4))
    x = torch.randn(3, IN, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fact(x), x @ fact.to_dense().T)
        fact(x[:4])  # same bucket: no new measurement
        assert len(calls) == n and fact.strategy(3) == formula_pick
        fact(torch.randn(5, IN, dtype=torch.float64))  # next bucket
    assert len(calls) == 2 * n


def test_training_forward_measures_forward_and_backward_apart(wisdom_file, monkeypatch):
    calls = []

    def timer(fn):
        calls.append(fn())  # the measured call returns the gradients of the input and of every core
        return float(len(calls))

    monkeypatch.setattr(tensornets.formats.base, "default_timer", timer)
    fact = _mpo().set_strategy("measure")
    x = torch.randn(3, IN, dtype=torch.float64)
    fact(x)  # the cores require grad: autograd records this forward
    n_params = len(list(fact.parameters()))
    assert calls and all(len(grads) == 1 + n_params and all(g is not None for g in grads) for grads in calls)
    stored = json.loads(wisdom_file.read_text())["machines"][wisdom.machine_key()]
    assert [k.endswith("|grad") for k in stored] == [True]
    with torch.no_grad():
        fact(x)  # inference: a measurement of its own (the forward alone)
    stored = json.loads(wisdom_file.read_text())["machines"][wisdom.machine_key()]
    assert sorted(k.endswith("|grad") for k in stored) == [False, True]
    assert isinstance(calls[-1], torch.Tensor)


def test_measuring_skips_candidates_far_behind_by_formula_or_by_a_first_call(wisdom_file, monkeypatch):
    fact = _mpo()
    weight = traffic_weight("cpu")
    candidates = fact._candidates(1)
    least = min(c.cost(weight) for c in candidates)
    far = {c.label for c in candidates if c.cost(weight) > tensornets.formats.base.MEASURE_CUTOFF * least}
    assert far == {"rebuild"}  # one row: rebuilding W costs 7x the einsum
    timed = []
    fact.tune([1], timer=lambda fn: timed.append(fn) or 1.0)
    entry = wisdom.lookup(fact._wisdom_key(1, *fact._planning_target()))
    assert len(timed) == len(candidates) - len(far) and not far & set(entry["seconds"])

    # a candidate whose second call already takes PROBE_FACTOR x the fastest one timed is not sampled further
    slow = {"calls": 0}
    monkeypatch.setattr(tensornets.formats.base, "time_once", lambda fn: slow.__setitem__("calls", slow["calls"] + 1) or 3.0)
    timed.clear()
    fact.tune([64], timer=lambda fn: timed.append(fn) or 1.0)
    n = len([c for c in fact._candidates(64) if c.cost(weight) <= tensornets.formats.base.MEASURE_CUTOFF *
             min(c.cost(weight) for c in fact._candidates(64))])
    entry = wisdom.lookup(fact._wisdom_key(64, *fact._planning_target()))
    assert len(timed) == 1 and slow["calls"] == 2 * (n - 1) and sorted(entry["seconds"].values()) == [1.0] + [3.0] * (n - 1)


def test_corrupt_wisdom_warns_and_is_replaced(wisdom_file):
    wisdom_file.parent.mkdir(parents=True)
    wisdom_file.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert wisdom.lookup("k") is None
    wisdom.record("k", "rebuild", {"rebuild": 1.0})
    wisdom.forget()
    assert wisdom.lookup("k")["plan"] == "rebuild"
    wisdom_file.write_text(json.dumps({"version": 99}))  # valid JSON, wrong layout
    wisdom.forget()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert wisdom.lookup("k") is None
    wisdom_file.write_text(json.dumps({"version": 1, "machines": {wisdom.machine_key(): []}}))  # wrong layout inside
    wisdom.forget()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert wisdom.lookup("k") is None
    wisdom.record("k", "rebuild", {"rebuild": 1.0})
    wisdom.forget()
    assert wisdom.lookup("k")["plan"] == "rebuild"


def test_an_unwritable_cache_measures_and_remembers_in_this_process_only(monkeypatch, tmp_path):
    # a cache path below a regular file cannot be created, whoever runs the test (root included)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path / "file" / "cache"))
    wisdom.forget()
    timed = []
    monkeypatch.setattr(tensornets.formats.base, "default_timer", lambda fn: timed.append(fn) or 1.0)
    fact = _mpo().set_strategy("measure")
    x = torch.randn(300, IN, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="cannot write its wisdom file .*remembered by this process only"):
        with torch.no_grad():
            assert_close(fact(x), x @ fact.to_dense().T)
    assert timed and wisdom.lookup(fact._wisdom_key(512, *fact._planning_target())) is not None
    count = len(timed)
    twin = _mpo().set_strategy("measure")  # the same structure: this process knows the answer
    with torch.no_grad():
        twin(x)
    assert len(timed) == count
    wisdom.forget()


def test_stale_wisdom_entry_is_measured_again(wisdom_file, monkeypatch):
    # an entry naming a plan this layer does not have (hand-edited file) is not trusted
    fact = _mpo()
    wisdom.record(fact._wisdom_key(512, *fact._planning_target()), "split@9", {})
    monkeypatch.setattr(tensornets.formats.base, "default_timer", lambda fn: 1.0)
    fact.set_strategy("measure")
    assert fact._plan(512).label == "rebuild"  # measured again (all tie: the first wins)
    assert wisdom.lookup(fact._wisdom_key(512, *fact._planning_target()))["plan"] == "rebuild"


def test_measuring_leaves_the_random_stream_alone(wisdom_file):
    fact = _mpo()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    fact.tune([64], timer=lambda fn: 1.0)
    assert torch.equal(torch.rand(4), expected)


def test_wisdom_of_another_machine_is_not_used(wisdom_file, monkeypatch):
    wisdom.record("k", "rebuild", {"rebuild": 1.0})
    monkeypatch.setattr(wisdom, "machine_key", lambda: "Linux-x86_64|another CPU|threads=64|torch=9.9")
    assert wisdom.lookup("k") is None
    wisdom.record("k", "einsum", {"einsum": 1.0})  # both machines' entries are kept side by side
    assert len(json.loads(wisdom_file.read_text())["machines"]) == 2


def test_training_measure_with_frozen_cores_times_the_input_gradient(wisdom_file):
    # a frozen factorized base under a trainable input (an adapter above it): autograd records the forward, and the
    # measurement must not ask for gradients of cores that have none
    fact = _mpo().set_strategy("measure").requires_grad_(False)
    x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)
    y = fact(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert_close(gx, fact.to_dense().sum(0).expand(3, -1))
    assert fact._plans and all(key[-1] for key in fact._plans)  # the plan of a recorded forward


def test_a_plan_without_backward_costs_counts_twice_its_forward():
    plan = plans.ContractPlan("contract", 10, 3)
    assert (plan.backward_flops, plan.backward_traffic) == (20, 6) and plan.cost(2.0, grad=True) == 3 * 10 + 3 * 2 * 3
