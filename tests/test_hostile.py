"""Hostile hosts (issue 20): whatever a host sends, the round goes on for every other
host, the hostile host's calls are stored with their error class, and its availability
falls.

- The store bounds what a host controls to its columns (both backends).
- The real Daemon referees one round over the `hostile` family of simulated hosts
  (validator.network.hostile, real loopback HTTP and raw sockets) beside honest ones, on
  SQLite and on PostgreSQL.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from validator.store import Dispatch

from .test_store import pg_db, store, url  # noqa: F401 - fixtures: both backends


# ------------------------------------------------------------------ the store


def _one_probe(store, host: str = "h") -> str:
    store.add_host(host, "http://127.0.0.1:9/v1", "smollm2-135m")
    pid = f"{host}-1-0"
    store.ensure_probes(1, host, [{"id": pid, "index": 0, "prompt_id": "p", "stream": False,
                                   "messages": [{"role": "user", "content": "hi"}],
                                   "configs": {"temperature": 0.0, "max_tokens": 8}}])
    return pid


def _stored(store, pid: str):
    with store.session(readonly=True) as s:
        return s.scalars(select(Dispatch).where(Dispatch.probe_id == pid)).one()


def test_a_served_by_longer_than_its_column_is_stored_cut_with_a_marker(store):
    """300 characters into String(256) failed the insert on PostgreSQL (and so the round)."""
    pid = _one_probe(store)
    served_by = "gpu-" + "h" * 296
    assert store.record_dispatch(pid, {"ok": True, "text": "hi", "served_by": served_by}, "v")
    d = _stored(store, pid)
    assert len(d.served_by) == 256 and d.served_by.startswith("gpu-hhh")
    assert d.served_by.endswith("[300 chars]")


def test_strings_a_host_controls_are_bounded_and_storable(store):
    pid = _one_probe(store)
    record = {"ok": False, "error": "e" * 200, "detail": "the host said \ud800\x00",
              "served_by": "a\x00b\ud800c"}
    assert store.record_dispatch(pid, record, "v")
    d = _stored(store, pid)
    assert len(d.error) == 64 and d.error.endswith("[200 chars]")
    assert d.served_by == "a\ufffdb\ufffdc"  # NUL and a lone surrogate: neither fits a column
    assert d.detail.startswith("the host said \ufffd")  # a 4xx's message is the host's words
    with store.session(readonly=True) as s:
        assert store._tallies(s, f"error:{d.error}") == [("h", f"error:{d.error}", 1.0)]
