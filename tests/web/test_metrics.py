"""GET /metrics over a real socket, parsed with prometheus-client's own parser, against
what the fixture stored (SQLite) and on PostgreSQL (its upserts of the running totals differ)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

FAMILIES = {"validator_probes_sent": "counter", "validator_probes_failed": "counter",
            "validator_scoring_latency_seconds": "histogram", "validator_queue_depth": "gauge",
            "validator_hosts": "gauge", "validator_host_score": "gauge", "validator_last_round": "gauge",
            "validator_host_state": "gauge", "validator_heartbeat_timestamp_seconds": "gauge"}


def scrape(served, token) -> dict:
    with served.server.client(token) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(family, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_metrics_match_the_database(served):
    fams = scrape(served, served.reader)
    assert {name: f.type for name, f in fams.items()} == FAMILIES
    net = served.net
    sent = samples(fams["validator_probes_sent"], "validator_probes_sent_total")
    assert sent == {(("host", h),): float(len(p)) for h, p in net.probes.items()}
    failed = samples(fams["validator_probes_failed"], "validator_probes_failed_total")
    assert failed == {(("host", "flaky-c"), ("reason", "first_byte_timeout")): 1.0,
                      (("host", "flaky-c"), ("reason", "server_error")): 1.0,
                      (("host", "down-d"), ("reason", "connect_error")): 3.0}
    assert samples(fams["validator_queue_depth"], "validator_queue_depth") == {(): 1.0}
    hosts = samples(fams["validator_hosts"], "validator_hosts")
    assert hosts == {(("state", "new"),): 2.0, (("state", "trusted"),): 1.0, (("state", "probation"),): 0.0,
                     (("state", "flagged"),): 1.0, (("state", "disabled"),): 1.0}
    scores = samples(fams["validator_host_score"], "validator_host_score")
    assert scores[(("host", "honest-a"),)] > scores[(("host", "flaky-c"),)] > 0 == scores[(("host", "cheat-b"),)]
    assert samples(fams["validator_last_round"], "validator_last_round") == {(): 1.0}
    states = samples(fams["validator_host_state"], "validator_host_state")
    assert states == {(("host", "honest-a"), ("state", "trusted")): 1.0, (("host", "cheat-b"), ("state", "flagged")): 1.0,
                      (("host", "flaky-c"), ("state", "new")): 1.0, (("host", "down-d"), ("state", "new")): 1.0,
                      (("host", "retired-e"), ("state", "disabled")): 1.0}
    assert samples(fams["validator_heartbeat_timestamp_seconds"], "validator_heartbeat_timestamp_seconds") == {}

    # 10 answers were scored now, 40 minutes to 2 hours after they arrived
    latency = fams["validator_scoring_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    count = samples(latency, "validator_scoring_latency_seconds_count")[()]
    total = samples(latency, "validator_scoring_latency_seconds_sum")[()]
    assert count == 10 and buckets["+Inf"] == 10
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert buckets["1800.0"] == 0 and buckets["14400.0"] == 10
    assert 10 * 2400 - 60 <= total <= 10 * 7200 + 600


def test_metrics_on_postgresql(pg_served):
    fams = scrape(pg_served, pg_served.admin)
    latency = fams["validator_scoring_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert buckets["60.0"] == 0 and buckets["120.0"] == 1 == buckets["+Inf"]
    assert samples(latency, "validator_scoring_latency_seconds_sum")[()] == pytest.approx(90, abs=30)
    failed = samples(fams["validator_probes_failed"], "validator_probes_failed_total")
    assert failed[(("host", "pg-one"), ("reason", "connect_error"))] == 1.0


def test_metrics_need_a_token(served):
    with served.server.client() as c:
        assert c.get("/metrics").status_code == 401
