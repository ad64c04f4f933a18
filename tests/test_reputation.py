"""Reputation: the honesty state machine, its false-alarm bound, and the score.

Fast: no model, no database. Many-host simulations run on the same vectorised evidence
functions that `assess` uses for one host (checked equal below)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from scipy import stats

from validator.reputation import (
    POOLED, STATES, InvalidTransition, Outcome, ReputationConfig, assess, disable, enable,
    log_e_values, log_evidence, release,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DEFAULT = ReputationConfig()


def at(i: int) -> datetime:
    return T0 + timedelta(minutes=i)


def scored(p_values, start: int = 0, **timing) -> list[Outcome]:
    """Answered, scored probes; verdicts from the p-values as validator.scoring.verdict gives them."""
    timing = {"ttfb_s": 0.5, "total_s": 2.0, "bytes": 400, **timing}
    return [Outcome(f"q{start + i}", at(start + i),
                    "fail" if p < 1e-4 else "pass" if p >= 1e-2 else "inconclusive", float(p), None,
                    **timing)
            for i, p in enumerate(p_values)]


def failed(n: int, start: int, error: str = "total_timeout") -> list[Outcome]:
    return [Outcome(f"e{start + i}", at(start + i), error=error, total_s=180.0) for i in range(n)]


def first_flag(p_values: np.ndarray, config: ReputationConfig = DEFAULT) -> np.ndarray:
    """Per host (rows): index of the first probe at which it is flagged, or -1."""
    crossed = log_evidence(log_e_values(p_values, config)) >= math.log(1 / config.alpha)
    return np.where(crossed.any(-1), crossed.argmax(-1), -1)


# --------------------------------------------------------------------------- false alarms

def test_honest_flag_rate_stays_below_alpha_over_thousands_of_looks():
    # 2000 honest hosts x 3000 probes, uniform p-values (the boundary case of honesty),
    # a look after every probe. alpha is raised to 1e-2 so the bound is observable.
    config = ReputationConfig(alpha=1e-2)
    p = np.random.default_rng(11).random((2000, 3000))
    rate = (first_flag(p, config) >= 0).mean()
    assert rate <= config.alpha, rate

    # The same simulation catches a rule that does not control repeated looks: Fisher's
    # combined p-value (validator.reputation) checked after every probe at the same level.
    fisher_p = stats.chi2.sf(np.cumsum(-2 * np.log(p), axis=1), 2 * np.arange(1, p.shape[1] + 1))
    naive_rate = (fisher_p.min(axis=1) < config.alpha).mean()
    assert naive_rate > 3 * config.alpha, naive_rate


def test_default_alpha_never_flags_conservative_honest_hosts():
    # 1000 hosts x 5000 probes each (a month of probing), p-values stochastically larger
    # than uniform: half the probes pass outright (p = 1), the rest uniform.
    rng = np.random.default_rng(12)
    p = np.where(rng.random((1000, 5000)) < 0.5, 1.0, rng.random((1000, 5000)))
    assert (first_flag(p) >= 0).sum() == 0


def test_assess_runs_the_same_evidence_as_the_simulation():
    p = np.random.default_rng(13).random(3000)
    standing, transition = assess("trusted", scored(p))
    log_r = log_evidence(log_e_values(p, DEFAULT))
    answers = standing.evidence["processes"]["answers"]
    assert answers["log_e"] == pytest.approx(log_r[-1])
    assert answers["log_e_max"] == pytest.approx(log_r.max())
    # The host's evidence mixes the answers' process with the pooled ones (which these
    # outcomes, without pooled records, leave at their change-point weights, or at 1
    # for the alternatives, whose processes start with a settings' first record).
    w = DEFAULT.pooled_weight
    pooled = [standing.evidence["processes"][k]["log_e"] for k in POOLED]
    assert standing.evidence["processes"]["alternatives"]["log_e"] == 0.0
    assert standing.evidence["log_e"] == pytest.approx(
        np.logaddexp.reduce([math.log(1 - w) + log_r[-1], *(math.log(w / len(POOLED)) + v for v in pooled)]))
    assert standing.evidence["probes_scored"] == 3000
    assert transition is None and standing.state == "trusted"


# --------------------------------------------------------------------------- cheaters

def test_blatant_cheater_is_flagged_on_its_second_probe():
    outcomes = scored([1e-6, 1e-6, 1e-6])
    standing, transition = assess("new", outcomes[:1])
    assert transition is None and standing.state == "new"  # one probe never flags alone
    standing, transition = assess("new", outcomes[:2])
    assert standing.state == "flagged" and standing.score == 0.0
    assert (transition.state_from, transition.state_to) == ("new", "flagged")
    assert transition.at == outcomes[1].at
    assert transition.evidence["smallest_p_values"] == {"q0": 1e-6, "q1": 1e-6}
    assert transition.evidence["failed"] == 2
    assert transition.evidence["log_e"] >= transition.evidence["log_threshold"] == pytest.approx(math.log(1e4))
    assert "2 probe(s) from q0 to q1" in transition.reason and "1.0e-06 on q0" in transition.reason


def test_flag_does_not_depend_on_when_assess_is_called():
    # A daemon that was down while the evidence crossed, and calls assess only after
    # 200 clean probes have driven the statistic back down, still flags, at the crossing.
    history = scored([1e-6, 1e-6] + [1.0] * 200)
    standing, transition = assess("trusted", history)
    assert standing.evidence["log_e"] < standing.evidence["log_threshold"]
    assert standing.state == "flagged" and transition.at == history[1].at
    assert standing.evidence["crossed_at_probe"] == "q1"


def test_single_damning_probe_does_not_flag_but_two_do():
    for state in ("new", "trusted"):
        assert assess(state, scored([0.0]))[1] is None
        assert assess(state, scored([0.0, 0.5]))[1] is None
        assert assess(state, scored([0.0, 0.5, 0.0]))[0].state == "flagged"


def test_mostly_cheating_hosts_are_flagged_within_five_probes():
    # p = 1e-6 on 80% of probes, uniform otherwise. Two cheating probes contribute
    # 2 ln(0.5e3) = 12.4 nats; each other probe costs at most ln 2 (at p = 1), the first
    # start's weight ln 2: 12.4 - 4 ln 2 >= ln 1e4. So two cheats in the first five flag.
    rng = np.random.default_rng(21)
    cheat = rng.random((1000, 40)) < 0.8
    p = np.where(cheat, 1e-6, rng.random((1000, 40)))
    flag = first_flag(p)
    two_in_five = cheat[:, :5].sum(axis=1) >= 2
    assert np.all((flag[two_in_five] >= 0) & (flag[two_in_five] <= 4))
    assert np.all(flag >= 0)


def test_cheater_failing_one_probe_in_five_is_flagged():
    # Worst case for detection: the four honest-looking probes have p = 1. Per cycle of
    # five, +ln 500 - 4 ln 2 = 3.44 nats, so the third cheating probe (probe 15) flags.
    pattern = np.tile([1.0, 1.0, 1.0, 1.0, 1e-6], 20)
    assert first_flag(pattern[None])[0] == 14
    standing, transition = assess("trusted", scored(pattern[:15]))
    assert standing.state == "flagged" and transition.evidence["failed"] == 3
    assert assess("trusted", scored(pattern[:14]))[0].state == "trusted"

    # Random positions, uniform honest p-values: every one of 500 hosts within 100 probes.
    rng = np.random.default_rng(22)
    p = np.where(rng.random((500, 100)) < 0.2, 1e-6, rng.random((500, 100)))
    assert np.all(first_flag(p) >= 0)


def test_host_turning_to_cheat_after_a_thousand_probes_is_flagged_within_four():
    # A change at probe s costs ln(s (s + 1)) = 13.8 nats at s = 1001: 4 x ln 500 = 24.9
    # covers it and ln 1e4.
    rng = np.random.default_rng(23)
    p = np.concatenate([rng.random((200, 1000)), np.full((200, 10), 1e-6)], axis=1)
    flag = first_flag(p)
    assert np.all((flag >= 1000) & (flag <= 1003))
    standing, transition = assess("trusted", scored(p[0, :flag[0] + 1]))
    assert standing.state == "flagged"
    assert set(transition.evidence["smallest_p_values"]) >= {f"q{i}" for i in range(1000, flag[0] + 1)}


# --------------------------------------------------------------------------- state machine

def test_new_host_becomes_trusted_after_consecutive_passes():
    n = DEFAULT.trust_after
    clean = scored([0.5] * (n - 1))
    assert assess("new", clean)[0].state == "new"
    # Transport errors and answers the validator could not score (verdict "error") neither
    # count toward the run nor break it; the unscored answer counts as available.
    unscorable = Outcome("u150", at(150), "error", None, ttfb_s=0.5, total_s=2.0, bytes=400)
    outcomes = clean[:3] + failed(5, 100) + [unscorable] + scored([0.5] * (n - 3), start=200)
    standing, transition = assess("new", outcomes)
    assert (transition.state_from, transition.state_to) == ("new", "trusted")
    assert transition.evidence["consecutive_passes"] == n
    assert transition.at == outcomes[-1].at
    assert standing.evidence["probes_scored"] == n
    with_error_only = assess("new", clean[:3] + [unscorable])[0].components["availability"]
    assert with_error_only == 1.0
    # An inconclusive or failed verdict breaks the run.
    for p in (1e-3, 1e-5):
        broken = scored([0.5] * (n - 1) + [p] + [0.5] * (n - 1))
        assert assess("new", broken)[0].state == "new"
        assert assess("new", broken + scored([0.5], start=500))[0].state == "trusted"


def test_flagged_host_stays_flagged_until_released():
    history = scored([1e-6, 1e-6] + [0.5] * 200)
    standing, transition = assess("flagged", history)
    assert transition is None and standing.state == "flagged" and standing.score == 0.0


def test_release_probation_and_return_to_trust():
    history = scored([1e-6, 1e-6])
    assert assess("new", history)[0].state == "flagged"
    with pytest.raises(InvalidTransition):
        release("trusted", at=at(10))
    t = release("flagged", at=at(10), by="alice", note="fixed their config")
    assert (t.state_from, t.state_to, t.at) == ("flagged", "probation", at(10))
    assert t.restarts_evidence and "alice" in t.reason and t.evidence["by"] == "alice"

    k = DEFAULT.probation_clean
    with pytest.raises(ValueError, match="since"):
        assess("probation", history)
    after = history + scored([0.5] * (k - 1), start=10)
    standing, transition = assess("probation", after, since=t.at)
    assert transition is None and standing.state == "probation"
    assert standing.evidence["probes_scored"] == k - 1  # the pre-release probes no longer count
    standing, transition = assess("probation", after + scored([0.5], start=10 + k), since=t.at)
    assert (transition.state_from, transition.state_to) == ("probation", "trusted")
    assert "since release" in transition.reason

    # Cheating again on probation: flagged again, on post-release evidence alone.
    relapse = history + scored([0.5] * 5 + [1e-6, 1e-6], start=10)
    standing, transition = assess("probation", relapse, since=t.at)
    assert (transition.state_from, transition.state_to) == ("probation", "flagged")
    assert set(transition.evidence["smallest_p_values"]) <= {f"q{i}" for i in range(10, 17)}


def test_disabled_is_sticky_and_only_admins_move_it():
    cheater, honest = scored([1e-6] * 5), scored([0.5] * 50)
    for state in ("new", "trusted", "probation", "flagged"):
        t = disable(state, at=at(1), by="bob")
        assert (t.state_from, t.state_to) == (state, "disabled")
    with pytest.raises(InvalidTransition):
        disable("disabled", at=at(1))
    for history in (cheater, honest):
        standing, transition = assess("disabled", history)
        assert transition is None and standing.state == "disabled" and standing.score == 0.0
    for state in ("new", "trusted", "probation", "flagged"):
        with pytest.raises(InvalidTransition):
            enable(state, at=at(1))
    t = enable("disabled", at=at(2))
    assert (t.state_from, t.state_to) == ("disabled", "new") and not t.restarts_evidence
    assert assess(t.state_to, cheater)[0].state == "flagged"  # old evidence still counts
    assert assess(t.state_to, honest)[0].state == "trusted"


def test_unknown_state_is_an_error():
    with pytest.raises(ValueError, match="unknown state"):
        assess("banned", [])
    with pytest.raises(ValueError, match="unknown state"):
        release("banned", at=at(0))


def test_assess_is_a_pure_function_of_its_inputs():
    rng = np.random.default_rng(31)
    outcomes = scored(rng.random(300)) + failed(20, 300)
    first = assess("new", outcomes, [4, 5, 3])
    shuffled = [outcomes[i] for i in rng.permutation(len(outcomes))]
    assert assess("new", shuffled, [4, 5, 3]) == first
    assert assess("new", outcomes, [4, 5, 3]) == first


# --------------------------------------------------------------------------- score

def test_availability_and_latency_move_the_score_never_the_state():
    p = [0.5] * 30
    good = scored(p)
    slow = scored(p, ttfb_s=40.0, total_s=100.0, bytes=100)
    flaky = [o for pair in zip(good, failed(30, 100)) for o in pair]
    results = {name: assess("new", h) for name, h in
               (("good", good), ("slow", slow), ("flaky", flaky))}
    for standing, transition in results.values():
        assert standing.state == "trusted" and transition.state_to == "trusted"
    assert results["good"][0].components["availability"] == 1.0
    assert results["good"][0].components["latency"] == 1.0
    assert results["good"][0].score == pytest.approx(1.0)
    assert results["slow"][0].components["latency"] == 0.0
    assert results["flaky"][0].components["availability"] < 0.6
    assert results["slow"][0].score < results["good"][0].score
    assert results["flaky"][0].score < results["good"][0].score
    # And a cheater with perfect availability and latency is still flagged.
    assert assess("trusted", scored([1e-6] * 2))[0].state == "flagged"


def test_availability_weights_recent_probes_more():
    config = ReputationConfig(half_life=1.0)
    # newest (ok) weighs 1, the one before (error) 1/2: 1 / 1.5
    standing, _ = assess("trusted", failed(1, 0) + scored([0.5], start=1), config=config)
    assert standing.components["availability"] == pytest.approx(2 / 3)
    recent_errors = scored([0.5] * 10) + failed(5, 10)
    old_errors = failed(5, 0) + scored([0.5] * 10, start=5)
    assert (assess("trusted", recent_errors)[0].components["availability"]
            < assess("trusted", old_errors)[0].components["availability"])
    # Only the last `window` probes count.
    windowed = ReputationConfig(window=10)
    assert assess("trusted", old_errors, config=windowed)[0].components["availability"] == 1.0


def test_latency_maps_targets_to_one_and_limits_to_zero():
    c = DEFAULT

    def latency(ttfb, bps):
        return assess("trusted", scored([0.5], ttfb_s=ttfb, total_s=10.0, bytes=int(bps * 10)))[0] \
            .components["latency"]

    assert latency(c.ttfb_target_s, c.throughput_target_bps) == 1.0
    assert latency(c.ttfb_limit_s, c.throughput_limit_bps) == 0.0
    assert latency(c.ttfb_target_s, c.throughput_limit_bps) == 0.5
    mid_ttfb = (c.ttfb_target_s + c.ttfb_limit_s) / 2
    assert latency(mid_ttfb, c.throughput_target_bps) == pytest.approx(0.75)
    assert latency(0.0, 1e9) == 1.0 and latency(1e9, 0.0) == 0.0


def test_feedback_has_weight_quarter_when_present_and_renormalises_when_absent():
    history = scored([0.5] * 30, ttfb_s=16.0)  # latency 0.75: the components differ
    plain = assess("trusted", history)[0]
    a, lat = plain.components["availability"], plain.components["latency"]
    assert "feedback" not in plain.components
    assert plain.score == pytest.approx((0.5 * a + 0.25 * lat) / 0.75)
    best = assess("trusted", history, [5, 5, 5])[0]
    worst = assess("trusted", history, [1, 1])[0]
    assert best.components["feedback"] == 1.0 and worst.components["feedback"] == 0.0
    assert best.score - worst.score == pytest.approx(0.25)
    assert best.score == pytest.approx(0.5 * a + 0.25 * lat + 0.25)
    # Recent ratings count more; a weight of 0 ignores feedback.
    assert assess("trusted", history, [1, 5])[0].components["feedback"] > 0.5
    off = ReputationConfig(weight_feedback=0.0)
    assert assess("trusted", history, [1], config=off)[0].score == pytest.approx(plain.score)
    # Unproven states scale the whole score (too few probes here to leave them).
    short = history[:5]
    trusted = assess("trusted", short, [5])[0].score
    for state in ("new", "probation"):
        standing, transition = assess(state, short, [5], since=T0)
        assert transition is None and standing.score == pytest.approx(0.5 * trusted) and trusted > 0.5
    for bad in (0, 6, 2.5e9, "5", True):
        with pytest.raises(ValueError, match="ratings"):
            assess("trusted", history, [bad])


def test_score_is_always_between_zero_and_one():
    rng = np.random.default_rng(41)
    for _ in range(300):
        n = int(rng.integers(0, 60))
        outcomes = []
        for i in range(n):
            if rng.random() < 0.3:
                outcomes.append(Outcome(f"e{i}", at(i), error="server_error",
                                        ttfb_s=float(rng.exponential(5)), total_s=float(rng.exponential(20))))
            else:
                p = float(rng.choice([0.0, 1e-7, rng.random(), 1.0]))
                outcomes += scored([p], start=i, ttfb_s=float(rng.exponential(10)),
                                   total_s=float(rng.choice([0.0, rng.exponential(20)])),
                                   bytes=int(rng.integers(0, 10**6)))
        feedback = list(rng.integers(1, 6, size=int(rng.integers(0, 4))))
        config = ReputationConfig(weight_availability=float(rng.random()), weight_latency=float(rng.random()),
                                  weight_feedback=float(rng.random()) + 1e-3)
        state = str(rng.choice(STATES))
        standing, _ = assess(state, outcomes, feedback, config, since=T0)
        assert 0.0 <= standing.score <= 1.0
        assert all(0.0 <= v <= 1.0 for v in standing.components.values())
        if standing.state in ("flagged", "disabled"):
            assert standing.score == 0.0
    assert assess("trusted", [])[0].score == 0.0  # nothing known yet


# --------------------------------------------------------------------------- inputs

def test_config_from_dict():
    assert ReputationConfig.from_dict(None) == ReputationConfig()
    c = ReputationConfig.from_dict({"alpha": 1e-3, "trust_after": 5, "half_life": 20})
    assert (c.alpha, c.trust_after, c.half_life) == (1e-3, 5, 20.0)
    assert isinstance(c.trust_after, int) and isinstance(c.half_life, float)
    with pytest.raises(ValueError, match="unknown key.*alhpa"):
        ReputationConfig.from_dict({"alhpa": 1e-3})
    with pytest.raises(ValueError, match="trust_after must be an integer"):
        ReputationConfig.from_dict({"trust_after": 2.5})
    with pytest.raises(ValueError, match="alpha must be a number"):
        ReputationConfig.from_dict({"alpha": "1e-4"})
    with pytest.raises(ValueError, match="alpha must be in"):
        ReputationConfig.from_dict({"alpha": 2})
    with pytest.raises(ValueError, match="ttfb_target_s < ttfb_limit_s"):
        ReputationConfig.from_dict({"ttfb_target_s": 40})


def test_outcome_rejects_inconsistent_records():
    with pytest.raises(ValueError, match="verdict"):
        Outcome("q", T0, "dishonest", 0.5)
    for verdict, p in (("pass", None), ("error", 0.5), (None, 0.5)):
        with pytest.raises(ValueError, match="p-value comes with"):
            Outcome("q", T0, verdict, p)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Outcome("q", T0, "pass", 1.5)
    with pytest.raises(ValueError, match="transport error"):
        Outcome("q", T0, "pass", 0.5, error="stream_cut")
