"""mode=auto: exactly AR greedy at temperature 0 whatever it picks (idle, loaded, mixed with
other modes, under preemption, with the pass-time model pushing it to each decoder), and its
choice follows the cost model (fake pass times: the decision boundary is where the formula
puts it)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from server.engine.cost_model import AcceptanceEstimate, CostModel, PassTimeModel
from server.engine.modes.auto import AR_PLAN, Plan, choose
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from tests.engine.helpers import Driver, make_engine, run_all, to_params
from tests.engine.test_self_spec import _with_lora

AUTO = RequestParams(SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), DecodeParams(mode="auto"))


@dataclass
class LinearTime(PassTimeModel):
    """A fake device: a pass of n tokens takes fixed + per_token * n seconds; never learns."""

    fixed: float = 1.0
    per_token: float = 0.0

    def observe(self, num_tokens: int, seconds: float) -> None:
        pass

    def time(self, n: int) -> float:
        return self.fixed + self.per_token * n


def _acc(rate: float) -> dict[str, AcceptanceEstimate]:
    exact = AcceptanceEstimate(prior_rate=rate, prior=1e9)  # the observations cannot move it
    return {"linear": exact, "quadratic": exact}


def _cost(fixed: float, per_token: float, load_tokens: int = 0, load_requests: int = 0) -> CostModel:
    t = LinearTime(fixed=fixed, per_token=per_token)
    t.set_load(load_tokens, load_requests)
    return CostModel(pass_time=t)


QUAD3 = Plan("quadratic", 3)  # 20 tokens per pass
PLANS = (AR_PLAN, Plan("linear", 3), Plan("linear", 7), QUAD3, Plan("quadratic", 7))


def test_flat_pass_time_picks_the_most_tokens_per_pass() -> None:
    """Memory-bound device (time independent of n): the plan emitting most per step wins."""
    assert choose(PLANS, _cost(1.0, 0.0), _acc(0.9), 1) == Plan("quadratic", 7)
    assert choose(PLANS, _cost(1.0, 0.0), _acc(0.0), 1) == AR_PLAN  # nothing is ever accepted


def test_compute_bound_pass_time_picks_ar() -> None:
    """Time proportional to tokens: no drafting can pay for its extra tokens."""
    assert choose(PLANS, _cost(0.0, 1.0), _acc(0.95), 1) == AR_PLAN


def test_decision_boundary_idle() -> None:
    """AR vs quadratic(3), idle, T(n) = 10 + n: quadratic iff E(3) / 30 > 1 / 11, i.e. the
    expected tokens per cycle exceed 30 / 11. Sweep the acceptance rate across the boundary."""
    boundary = 30 / 11
    switched = []
    for i in range(1, 100):
        rate = i / 100
        e = (1 - rate**4) / (1 - rate)
        pick = choose((AR_PLAN, QUAD3), _cost(10.0, 1.0), _acc(rate), 1)
        assert pick == (QUAD3 if e > boundary else AR_PLAN), (rate, e, pick)
        switched.append(pick == QUAD3)
    assert any(switched) and not all(switched)  # the sweep does cross the boundary


def test_decision_boundary_under_load() -> None:
    """Same device, acceptance 0.9 (E = 3.439): with k other requests each adding one token
    and emitting one per step, quadratic wins iff (E + k) / (30 + k) > (1 + k) / (11 + k)."""
    e = (1 - 0.9**4) / 0.1
    picks = []
    for k in range(0, 12):
        cost = _cost(10.0, 1.0, load_tokens=k + 1, load_requests=k + 1)  # own last pass: 1 token
        want = QUAD3 if (e + k) / (30 + k) > (1 + k) / (11 + k) else AR_PLAN
        pick = choose((AR_PLAN, QUAD3), cost, _acc(0.9), 1)
        assert pick == want, k
        picks.append(pick)
    assert picks[0] == QUAD3 and picks[-1] == AR_PLAN  # idle: speculate; loaded: AR


def test_others_count_at_what_they_emit() -> None:
    """Eight requests all on linear(15) on a compute-bound device (T(n) = 5.6 + 0.088 n ms,
    this CPU's shape; acceptance 0.75: 1.98 tokens per pass each). Scored as if the others
    emitted one token each, drafting still looks best to every request (the batch stays
    stuck at 0.99 tokens/ms); counted at the 1.98 they do emit, switching to AR wins, and
    once all are on AR (one each) drafting no longer tempts (all-AR: 1.43 tokens/ms)."""
    plans = (AR_PLAN, Plan("linear", 15))
    acc = _acc(0.75)

    def cost(load_tokens: int, emitted: float) -> CostModel:
        c = _cost(5.6, 0.088, load_tokens=load_tokens, load_requests=8)
        c.pass_time.emitted_per_request = emitted
        return c

    assert choose(plans, cost(128, 1.0), acc, 16) == Plan("linear", 15), "the old accounting"
    assert choose(plans, cost(128, 1.98), acc, 16) == AR_PLAN
    assert choose(plans, cost(8, 1.0), acc, 1) == AR_PLAN


def test_a_stale_slow_bucket_is_capped_by_larger_ones() -> None:
    t = PassTimeModel()
    for n, seconds in ((1, 0.005), (16, 0.043), (32, 0.014), (64, 0.020)):
        t.observe(n, seconds)
    assert t.time(16) == pytest.approx(0.014) and t.time(32) == pytest.approx(0.014)
    assert t.time(1) == pytest.approx(0.005) and t.time(64) == pytest.approx(0.020)
    assert all(t.time(n) <= t.time(n + 1) + 1e-12 for n in range(1, 128))


def test_emitted_per_request_is_a_running_average() -> None:
    t = PassTimeModel()
    assert t.emitted_per_request == 1.0
    for _ in range(60):
        t.set_load(128, 8, emitted=16)
    assert t.emitted_per_request == pytest.approx(2.0, rel=1e-4)
    t.set_load(8, 8)  # no count given: unchanged
    assert t.emitted_per_request == pytest.approx(2.0, rel=1e-4)


def test_pass_time_covers_the_whole_step() -> None:
    """What the engine observes is a step's whole duration, scheduling included (a slow
    scheduler is made slower still here), not only the forward pass and sampling."""
    eng = make_engine(_with_lora(3))
    seen: list[tuple[int, float]] = []
    eng.cost_model.pass_time.observe = lambda n, seconds: seen.append((n, seconds))  # type: ignore[method-assign]
    schedule = eng.scheduler.schedule

    def slow_schedule():  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        return schedule()

    eng.scheduler.schedule = slow_schedule  # type: ignore[method-assign]
    eng.generate(_prompts(2, 1), to_params(dict(mode="ar", max_tokens=3, ignore_eos=True)))
    assert len(seen) == 3 and all(seconds >= 0.05 for _, seconds in seen), seen


def test_pass_time_model_interpolates_measurements() -> None:
    t = PassTimeModel()
    for _ in range(30):
        t.observe(1, 0.010)
        t.observe(64, 0.050)
    assert t.time(1) == pytest.approx(0.010, rel=1e-6)
    assert t.time(64) == pytest.approx(0.050, rel=1e-6)
    assert 0.010 < t.time(20) < 0.050 and t.time(128) > 0.050
    assert t.time(30) <= t.time(31)


def test_own_prefill_is_not_counted_as_load() -> None:
    """Right after its own prefill, a request alone is idle: its prompt's tokens were its own
    pass, not the batch's load. Compute-bound device, acceptance known to be high (0.9): alone,
    AR wins (1 / T(1) > E(3) / T(20)), so a 24-token prompt must not tilt the first choice to
    self_spec as if 23 other tokens shared every pass."""
    model = _with_lora(3)
    prompt = (_prompts(3, 1)[0] * 24)[:24]
    eng = make_engine(model)
    eng.cost_model.pass_time = LinearTime(fixed=1.0, per_token=1.0)
    for variant in ("linear", "quadratic"):
        eng.cost_model.acceptance[variant] = AcceptanceEstimate(prior_rate=0.9, prior=1e9)
    out = eng.generate([prompt], AUTO)[0]
    assert set(out["stats"].passes_by_decoder) == {"ar"}, out["stats"].passes_by_decoder


def test_others_prefills_are_not_counted_as_load() -> None:
    """Eight 24-token prompts prefilled in one pass: that 192-token pass does not recur, so the
    next step's choices see eight one-token decode rows, not 168 other tokens that would make a
    20-token quadratic cycle look nearly free. Compute-bound device, acceptance known to be
    high: (1 + 7) / T(8) beats (E(3) + 7) / T(27), so every request stays on AR."""
    model = _with_lora(3)
    prompts = [(p * 24)[:24] for p in _prompts(5, 8)]
    eng = make_engine(model)
    eng.cost_model.pass_time = LinearTime(fixed=1.0, per_token=1.0)
    for variant in ("linear", "quadratic"):
        eng.cost_model.acceptance[variant] = AcceptanceEstimate(prior_rate=0.9, prior=1e9)
    outs = eng.generate(prompts, AUTO)
    assert all(set(o["stats"].passes_by_decoder) == {"ar"} for o in outs), [o["stats"].passes_by_decoder for o in outs]


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(2, 20))] for _ in range(n)]


def _ar(model, prompts):
    p = to_params(dict(mode="ar", max_tokens=30, ignore_eos=True))
    return [o["token_ids"] for o in make_engine(model).generate(prompts, p)]


@pytest.mark.parametrize("device", ["memory_bound", "compute_bound", "measured"])
@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_auto_is_ar_greedy_under_every_load(device: str, concurrency: int) -> None:
    model = _with_lora(3)
    prompts = _prompts(concurrency, concurrency)
    want = _ar(model, prompts)
    eng = make_engine(model, max_num_seqs=concurrency, page_size=4)
    if device != "measured":  # force each regime (measured: this machine's own timings)
        eng.cost_model.pass_time = LinearTime(fixed=1.0, per_token=0.0 if device == "memory_bound" else 1.0)
    outs = eng.generate(prompts, AUTO)
    decoders: set[str] = set()
    for o, w in zip(outs, want):
        assert o["token_ids"] == w
        st = o["stats"]
        decoders |= set(st.passes_by_decoder)
        assert sum(sum(k.values()) for k in st.passes_by_decoder.values()) == st.total_forward_passes
    if device == "memory_bound":
        assert decoders & {"self_spec_linear", "self_spec_quadratic"}, decoders
    if device == "compute_bound":
        assert decoders == {"ar"}, decoders
    assert eng.kv.num_free_pages == eng.kv.num_pages


def test_auto_mixed_with_other_modes_and_preemption() -> None:
    """auto requests (switching decoders as the load changes) next to fixed-mode requests on a
    pool small enough to preempt: still AR greedy token for token."""
    model = _with_lora(3)
    prompts = _prompts(7, 4)
    want = _ar(model, prompts)
    eng = make_engine(model, max_model_len=64, kv_cache_tokens=80, page_size=4)
    eng.cost_model.pass_time = LinearTime(fixed=1.0, per_token=0.02)  # idle: spec; loaded: ar
    d = Driver(eng)
    for i, p in enumerate(prompts):
        d.add(f"auto{i}", p, AUTO)
    d.add("quad", prompts[0], to_params(dict(mode="self_spec", variant="quadratic", block_length=4, max_tokens=30, ignore_eos=True)))
    d.add("diff", prompts[1], to_params(dict(mode="diffusion", block_length=4, refine_steps=2, max_tokens=12)))
    d.run()
    assert eng.scheduler.num_preemptions > 0
    for i in range(len(prompts)):
        assert d.done[f"auto{i}"].token_ids == want[i]
    assert d.done["quad"].token_ids == want[0]
    decoders = set().union(*(d.done[f"auto{i}"].stats.passes_by_decoder for i in range(4)))
    assert len(decoders) >= 2, decoders  # it really switched
    assert eng.kv.num_free_pages == eng.kv.num_pages


def test_auto_waves_with_prefix_cache() -> None:
    model = _with_lora(3)
    prompts = _prompts(11, 6)
    want = _ar(model, prompts)
    eng = make_engine(model, page_size=4)
    reqs = [(f"r{i}", p, AUTO) for i, p in enumerate(prompts)] + [(f"s{i}", p, AUTO) for i, p in enumerate(prompts)]
    done = run_all(eng, reqs, waves=3)
    for i in range(len(prompts)):
        assert done[f"r{i}"].token_ids == want[i] and done[f"s{i}"].token_ids == want[i]


def test_choices_visible_in_usage_and_metrics() -> None:
    """The decoder auto chose for each pass reaches the response's usage and Prometheus."""
    from prometheus_client import CollectorRegistry

    from server.api.usage import build_usage
    from server.metrics import Metrics

    model = _with_lora(3)
    eng = make_engine(model)
    eng.cost_model.pass_time = LinearTime(fixed=1.0, per_token=0.0)  # idle device: speculates
    out = eng.generate(_prompts(5, 1), AUTO)[0]
    st = out["stats"]
    usage = build_usage(10, [len(out["token_ids"])], [st], "auto")
    assert usage.forward_passes_by_decoder == st.passes_by_decoder
    assert set(st.passes_by_decoder) >= {"ar"} and len(st.passes_by_decoder) >= 2
    m = Metrics(registry=CollectorRegistry(), model_name="tiny")
    m.on_request_finished(st, "length")
    for decoder, kinds in st.passes_by_decoder.items():
        for kind, n in kinds.items():
            labels = dict(mode="auto", model="tiny", decoder=decoder, kind=kind)
            assert m.registry.get_sample_value("nld_forward_passes_by_decoder_total", labels) == n
