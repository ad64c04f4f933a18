"""Shared fixtures. Every answer the tests score comes from a real model: SmolLM2-135M
(transformers in float32 and bfloat16, llama.cpp on its GGUF) and Gemma-3 270M (llama.cpp)
as the "other model", answered by the hosts of validator.network.catalogue (the
simulator's strategies, run offline), recorded in tests/data and regenerated whenever
what decides them changes (tests/answers.py)."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from validator.network.catalogue import CHEATS, HONEST, OfflineNetwork, catalogue_network  # noqa: E402
from validator.probing.probes import greedy_and_sampled, load_bank, load_mix  # noqa: E402
from validator.scoring.reference import ReferenceModel  # noqa: E402
from validator.models.registry import Registry  # noqa: E402
from validator.scoring.verdict import Tolerances  # noqa: E402

from .answers import load_or_generate  # noqa: E402

MODEL = "smollm2-135m"
HONEST_PROMPTS = 38  # x (greedy + sampled) x 4 honest hosts = 304 honest answers
CHEAT_ANSWERS = 20  # every cheat must be caught within this many answers
# Cheats that need a model to answer get fewer: each was caught within 2 (see
# benchmarks/README.md), and generating answers is most of the test run's time. Truncated
# and replayed answers cost (almost) no generation and keep all 20.
GENERATED_CHEAT_ANSWERS = 12


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()


@pytest.fixture(scope="session")
def spec(registry):
    return registry.get(MODEL)


@pytest.fixture(scope="session")
def ref(spec) -> ReferenceModel:
    return ReferenceModel.load(spec)


@pytest.fixture(scope="session")
def tolerances(spec) -> Tolerances:
    return Tolerances.from_file(spec.calibration)


@pytest.fixture(scope="session")
def probes():
    """Probes from the general bank (calibration used a different bank)."""
    prompts = load_bank("configs/prompts/general.yaml")[:HONEST_PROMPTS]
    return greedy_and_sampled(prompts, load_mix("calibration"), seed=7)


@pytest.fixture(scope="session")
def hosts(registry) -> OfflineNetwork:
    return catalogue_network(MODEL, registry=registry)


def cheat_probes(name: str, probes: list) -> list:
    """The probes a cheat answers for the tests: its first GENERATED_CHEAT_ANSWERS;
    greedy-when-sampling only sampled ones (the probes alternate greedy and sampled);
    truncated all of them, so that its llama.cpp batch is the honest host's (generated
    once) before CHEAT_ANSWERS are kept."""
    if name == "cheat-greedy-when-sampling":
        return [p for p in probes[: 2 * GENERATED_CHEAT_ANSWERS] if not p[1].greedy]
    if name == "cheat-truncated":
        return probes
    return probes[: CHEAT_ANSWERS if name == "cheat-replayed" else GENERATED_CHEAT_ANSWERS]


@pytest.fixture(scope="session")
def recorded_answers(hosts, probes) -> dict[str, dict[str, list[dict]]]:
    """Real engines' answers, generated once and kept in tests/data (tests/answers.py)."""
    def generate():
        return {"honest": {name: hosts.records(name, probes) for name in HONEST},
                "cheat": {name: hosts.records(name, cheat_probes(name, probes))[:CHEAT_ANSWERS]
                          for name in CHEATS}}

    plan = {"honest": HONEST, "cheats": CHEATS, "cheat_answers": CHEAT_ANSWERS,
            "generated_cheat_answers": GENERATED_CHEAT_ANSWERS,
            "cheat_probes": {name: [getattr(p, "id", None) for p, _ in cheat_probes(name, probes)]
                             for name in CHEATS}}
    return load_or_generate(hosts, probes, plan, generate)


@pytest.fixture(scope="session")
def honest_records(recorded_answers) -> dict[str, list[dict]]:
    return recorded_answers["honest"]


@pytest.fixture(scope="session")
def cheat_records(recorded_answers) -> dict[str, list[dict]]:
    return recorded_answers["cheat"]


# PostgreSQL is part of this project's environment (CI's machine runs it), so a missing
# server fails the tests; set VALIDATOR_SKIP_POSTGRES=1 to skip them on a machine without one.
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname={db} connect_timeout=3"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"


@contextmanager
def fresh_postgres_database():
    """A new, uniquely named PostgreSQL database (its name), dropped afterwards."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN.format(db="test"), autocommit=True)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL at 127.0.0.1:5432 (user postgres, db test) unreachable: {exc}"
        if os.environ.get("VALIDATOR_SKIP_POSTGRES"):
            pytest.skip(message + " (VALIDATOR_SKIP_POSTGRES is set)")
        pytest.fail(message + "; start it, or set VALIDATOR_SKIP_POSTGRES=1 to skip these tests")
    name = f"validator_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_db():
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with fresh_postgres_database() as name:
        yield name


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """An empty database of each backend."""
    import psycopg

    from validator.store import Store

    if request.param == "sqlite":
        return Store.default_url(tmp_path / "state" / "validator.db")
    db = request.getfixturevalue("pg_db")
    with psycopg.connect(PG_ADMIN.format(db=db), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return PG_URL.format(db=db)


@pytest.fixture
def store(url):
    """A migrated, empty store of each backend."""
    from validator.store import Store, upgrade

    upgrade(url)
    s = Store(url)
    yield s
    s.close()
