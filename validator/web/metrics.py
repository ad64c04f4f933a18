"""GET /metrics (Prometheus text format), read from the database at scrape time, so
`validator serve` reports what every validator sharing the database did without
sharing memory with any daemon. The counters and the latency histogram come from the
running totals the store keeps (`tallies`), so a scrape does not grow with the history.

- validator_probes_sent_total{host}: probes sent and recorded (answered or failed)
- validator_probes_failed_total{host,reason}: failed calls by error class
- validator_scoring_latency_seconds: histogram of answer stored -> score stored
- validator_queue_depth: answers awaiting scoring
- validator_hosts{state}: live hosts by state (every state, zeros included)
- validator_host_score{host}: each live host's score
- validator_host_state{host,state}: 1 for each live host's current state
- validator_heartbeat_timestamp_seconds{validator}: last heartbeat of each validator that
  has not stopped cleanly (Unix time; `time() - ...` is how long it has been silent)
- validator_last_round: highest round claimed or probed
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from validator.store import SCORING_LATENCY_BUCKETS, STATES, Store
from validator.web.auth import Principal, reader

router = APIRouter()


class StoreCollector(Collector):
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        sent = CounterMetricFamily("validator_probes_sent", "Probes sent to a host and recorded "
                                   "(answered or failed).", labels=["host"])
        failed = CounterMetricFamily("validator_probes_failed", "Probes whose call failed, by error "
                                     "class (validator.probing.client).", labels=["host", "reason"])
        per_host: dict[str, int] = {}
        for host, error, n in self.store.dispatch_counts():
            per_host[host] = per_host.get(host, 0) + n
            if error is not None:
                failed.add_metric([host, error], n)
        for host, n in per_host.items():
            sent.add_metric([host], n)
        yield sent
        yield failed

        cumulative, total, count = self.store.scoring_latency()
        buckets = [(repr(b), c) for b, c in zip(SCORING_LATENCY_BUCKETS, cumulative)] + [("+Inf", count)]
        yield HistogramMetricFamily("validator_scoring_latency_seconds", "Seconds from an answer being "
                                    "stored to its score being stored.", buckets=buckets, sum_value=total)

        status = self.store.status()
        yield GaugeMetricFamily("validator_queue_depth", "Answers awaiting scoring.",
                                value=status["queue_depth"])
        by_state = GaugeMetricFamily("validator_hosts", "Live hosts by state.", labels=["state"])
        for state in STATES:
            by_state.add_metric([state], status["hosts_by_state"].get(state, 0))
        yield by_state
        score = GaugeMetricFamily("validator_host_score", "A live host's score (0..1).", labels=["host"])
        state = GaugeMetricFamily("validator_host_state", "1 for a live host's current state.",
                                  labels=["host", "state"])
        for h in self.store.list_hosts():
            if h["score"] is not None:
                score.add_metric([h["name"]], h["score"])
            state.add_metric([h["name"], h["state"]], 1)
        yield score
        yield state
        beat = GaugeMetricFamily("validator_heartbeat_timestamp_seconds", "Last heartbeat of a validator "
                                 "that has not stopped cleanly (Unix time).", labels=["validator"])
        for v in self.store.validators():
            if v["stopped_at"] is None:
                beat.add_metric([v["name"]], v["heartbeat_at"].timestamp())
        yield beat
        if status["last_round"] is not None:
            yield GaugeMetricFamily("validator_last_round", "Highest round claimed or probed.",
                                    value=status["last_round"])


def registry_for(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


@router.get("/metrics", tags=["status"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
                       401: {"description": "No valid token (unless serve.public_reads)."}})
def metrics(request: Request, _: Principal = Depends(reader)) -> Response:
    """Prometheus metrics, computed from the database at scrape time."""
    return Response(generate_latest(request.app.state.web.metrics), media_type=CONTENT_TYPE_LATEST)
