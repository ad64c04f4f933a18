"""Acceptance: honest engines are never failed; every cheat is caught within 20 answers.

All answers come from real models (conftest.py). Tolerances come from the committed
calibration file, which was computed on honest engines over a different prompt bank.
"""

from __future__ import annotations

import pytest

from validator.network.catalogue import CHEATS
from validator.service.audit import run_audit
from validator.service.scorer import Scorer
from validator.reputation import POOLED, HostRule, host_verdict

from .conftest import CHEAT_ANSWERS, MODEL


def _audit(records, registry, ref):
    import json

    # The re-run only feeds similarity metrics (checked in test_audit_cli); verdicts do not use it.
    lines, hosts = run_audit((json.dumps(r) for r in records), Scorer(registry, models={MODEL: ref}), rerun=False)
    return lines, hosts


@pytest.fixture(scope="session")
def honest_audit(honest_records, registry, ref):
    records = [r for recs in honest_records.values() for r in recs]
    return _audit(records, registry, ref)


def test_at_least_300_honest_answers_none_failed(honest_audit, honest_records):
    lines, hosts = honest_audit
    assert len(lines) >= 300
    assert all(line["verdict"] != "error" for line in lines)
    failed = [(line["host"], line["id"], line["reasons"]) for line in lines if line["verdict"] == "fail"]
    assert failed == []
    # Most honest answers pass outright; the rest are inconclusive, never failed.
    passed = sum(line["verdict"] == "pass" for line in lines)
    assert passed >= 0.9 * len(lines), f"only {passed} of {len(lines)} honest answers passed"


def test_no_honest_host_dishonest(honest_audit, honest_records):
    _, hosts = honest_audit
    assert set(hosts) == set(honest_records)
    for host, summary in hosts.items():
        assert summary["verdict"] != "dishonest", (host, summary)
        assert summary["failed"] == 0


def test_honest_engines_pooled_evidence_never_flags(honest_audit, honest_records):
    """Each honest engine's recorded answers read as one host's history by the daemon's
    reputation (the answers' e-values and the pooled log-prob and support-edge
    processes): never flagged, every sampled answer with its pooled record, the pooled
    z-score inside the honest range, and neither pooled process near 1/alpha."""
    import math

    from validator.reputation import assess

    from .test_compliance import pooled_host_outcomes

    lines, hosts = honest_audit
    for host in honest_records:
        mine = [line for line in lines if line["host"] == host]
        sampled = [line for line in mine if line["metrics"]["mode"] == "sampled"]
        assert sampled and all(line["metrics"]["pooled"]["mode"] == "sampled" for line in sampled)
        # the slack per sampler order follows the steps' spread (none where every step kept one token)
        assert all(len(line["metrics"]["pooled"]["slack"]) == 2 and min(line["metrics"]["pooled"]["slack"]) >= 0
                   for line in sampled)
        standing, transition = assess("new", pooled_host_outcomes(mine))
        assert transition is None or transition.state_to != "flagged", (host, transition)
        assert abs(hosts[host]["pooled"]["statistic_z"]) < 3, (host, hosts[host]["pooled"])
        for process in POOLED:
            assert standing.evidence["processes"][process]["log_e_max"] < math.log(1e2), (host, standing.evidence)


def test_honest_hosts_cover_greedy_sampled_and_stripped(honest_records):
    for host, records in honest_records.items():
        temps = {r["configs"]["temperature"] for r in records}
        assert 0.0 in temps and any(t > 0 for t in temps), host
    for a, b in zip(honest_records["honest-llama.cpp-stripped"], honest_records["honest-llama.cpp"]):
        assert a["response"] == b["response"].strip()


@pytest.mark.parametrize("cheat", CHEATS)
def test_cheat_flagged_within_20_answers(cheat, cheat_records, registry, ref):
    records = cheat_records[cheat]
    assert 12 <= len(records) <= CHEAT_ANSWERS
    lines, hosts = _audit(records, registry, ref)
    assert hosts[cheat]["verdict"] == "dishonest", (hosts[cheat], [l["reasons"] for l in lines][:5])
    # The first prefix of answers at which the host verdict turns dishonest.
    ps = [line["p_value"] for line in lines]
    verdicts = [line["verdict"] for line in lines]
    first = next(k for k in range(1, len(ps) + 1)
                 if host_verdict(ps[:k], verdicts[:k], HostRule())["verdict"] == "dishonest")
    print(f"{cheat}: dishonest after {first} answers; {hosts[cheat]['failed']} of {len(ps)} failed")
    assert first <= CHEAT_ANSWERS
