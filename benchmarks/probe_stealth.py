"""How well a host can tell the validator's probes from its users' requests.

Probes are built and sent by the validator's own code (derive_probes, the settings mix,
FlexstackClient's wire shape, the daemon's arrival times: validator.probing.probes), and
users' requests by the network's own Python client's transport, the real `requests`
library, posting the body the `flexstack` package builds. Both go over real HTTP to one
loopback server that records each request as a host sees it: request line, headers in
order, body. A host's view of each request becomes features in groups:

  fields      body keys and their order, `configs` keys, query string
  headers     header names in order, User-Agent, Accept*, Connection, Authorization scheme
  settings    temperature, top_k (log), top_p, max_tokens (log), stream
  lengths     characters of the conversation and its last message, messages, a system
              message, body bytes
  timing      arrival times in the host's merged stream: gaps to the previous and the next
              request (log), requests within 2 s, phase within a public 15-minute clock
  repository  whether any user message's content is, exactly, a string of this
              repository (its YAML/JSON string values and its raw text files)
  account     (not in the issue's list) how often the request's bearer token appears
              in the host's traffic: with one account every probe to a host carries it

For each group and for all the listed groups together (`overall`, without `account`;
`overall_with_account` with it) a logistic regression (scikit-learn, standardised
features) is trained on probes against held-out user requests from the same bank and
scored by ROC AUC, 5-fold stratified cross-validation (0.5: no better than chance; the
issue's goal is at most 0.6).

Scenarios:
  private     the default configuration with a private bank: the user-request corpus
              is split in two, one half imported as the probe bank
              (validator.probing.probes.import_requests), the other half are the users
  private-imported-mix
              the same, with the settings mix taken from the imported half's own
              `configs` (`validator probes import --mix-out`) instead of the default mix
  private-pool-K
              the private scenario with a pool of K accounts in the secrets file (each
              probe under the account its id selects, validator.probing.probes.account_index)
  repository  the same, but probes come from configs/prompts/general.yaml (what a
              validator left at the shipped bank sends)
  legacy      an emulation of the validator before this change: the shipped bank, the
              short mix with top_k 0, httpx's own headers with `Bearer validator`, both
              max_tokens fields, each host's probes together at a round boundary
              (within a 120 s spread) of the public clock

The users (an assumption, stated in the JSON): settings 40% the API's defaults, 15% the
Python client's defaults, 10% the documentation's example, 35% other values within the
documented ranges; half streamed; Poisson arrivals at the probes' rate; 200 accounts
with Zipf-distributed activity. Their prompts come from `--users FILE.jsonl` (exported
requests with `messages`) or, by default, from conversations composed here from
templates and fillers (each whole text is new, so none is a string of the repository).

    python benchmarks/probe_stealth.py [--quick] [--users FILE.jsonl] [--out FILE]

Writes benchmarks/results/probe_stealth.json (--quick: probe_stealth.quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from validator.models.sampling import Settings  # noqa: E402
from validator.probing.client import FlexstackClient, Timeouts, Wire  # noqa: E402
from validator.probing.probes import (Prompt, account_index, arrival_offsets, derive_probes, import_requests,  # noqa: E402
                                      load_bank, load_mix, load_probe_mix, schedule_phase, write_mix)

RESULTS = ROOT / "benchmarks" / "results"
INTERVAL_S = 900.0  # configs/validator.yaml
PROBES_PER_ROUND = 4
GROUPS = ("fields", "headers", "settings", "lengths", "timing", "repository")
PUBLIC_CLOCK_S = 900.0  # the old round boundary: time // interval
SCENARIOS = ("private", "private-imported-mix", "repository", "legacy", "private-pool-10", "private-pool-50")


# ------------------------------------------------------------------------ the host's ear

class Capture:
    """An HTTP/1.1 server on loopback that records every request as it arrives (request
    line, headers with their case and order, body) and answers each with a valid
    completion (a JSON envelope, or plain text when streamed)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self._handlers: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Capture":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *rest = head.decode("latin-1").rstrip("\r\n").split("\r\n")
                headers = [tuple(part.strip() for part in h.split(":", 1)) for h in rest if ":" in h]
                length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
                body = await reader.readexactly(length)
                method, target, _ = line.split(" ", 2)
                self.requests.append({"at": time.time(), "method": method, "target": target,
                                      "headers": headers, "body": body})
                stream = "stream=true" in target
                answer = b"Fine, thanks." if stream else json.dumps({
                    "data": {"is_success": True, "data": {"response": "Fine, thanks.", "status": "COMPLETED"}},
                    "errors": [], "error_description": "", "status": "success"}).encode()
                ctype = b"text/plain; charset=utf-8" if stream else b"application/json"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                             + str(len(answer)).encode() + b"\r\n\r\n" + answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(asyncio.current_task())


# ------------------------------------------------------------------------ users

TEMPLATES = [
    "How do I {verb} {thing} without {problem}?",
    "Can you explain {topic} to {audience} in {n} sentences?",
    "Write a short {form} about {thing} for {audience}.",
    "What's the difference between {topic} and {topic2}?",
    "my {thing} keeps {problem}, what should I check first",
    "Give me {n} ideas for {event} with {constraint}.",
    "Translate into {language}: \"{phrase}\"",
    "Summarise the pros and cons of {topic} for {audience}.",
    "Is it safe to {verb} {thing} when {condition}?",
    "Write a {code_lang} function that {task}.",
    "I have {n} hours before {event}. How should I plan {thing}?",
    "Fix the grammar: \"{phrase}\"",
    "Why does {thing} {behaviour} when {condition}?",
    "Compare {topic} with {topic2} in a small table.",
    "Suggest a name for {form} about {topic}.",
]
FILL = {
    "verb": ["clean", "repair", "store", "paint", "move", "sell", "insure", "upgrade", "sharpen", "recycle"],
    "thing": ["a bike chain", "my laptop battery", "a sourdough starter", "a wooden table", "tomato seedlings",
              "a leather jacket", "the garden hose", "an old phone", "a fish tank", "my running shoes",
              "the kitchen sink", "a vinyl record collection"],
    "problem": ["rusting", "overheating", "leaking", "getting mouldy", "making noise", "scratching it",
                "losing data", "spending too much"],
    "topic": ["compound interest", "photosynthesis", "inflation", "the water cycle", "machine learning",
              "vaccines", "black holes", "supply and demand", "climate models", "public key encryption",
              "the stock market", "sleep cycles"],
    "topic2": ["simple interest", "respiration", "deflation", "weather", "statistics", "antibiotics",
               "neutron stars", "price controls", "weather forecasts", "passwords", "bonds", "naps"],
    "audience": ["a ten-year-old", "my grandmother", "a new employee", "a history student", "a busy manager",
                 "someone who hates maths"],
    "n": ["two", "three", "five", "4", "10"],
    "form": ["poem", "product description", "thank-you note", "blog intro", "limerick", "speech opening"],
    "event": ["a birthday party", "a job interview", "a camping trip", "the exam", "a team offsite",
              "a first date"],
    "constraint": ["a tiny budget", "no car", "two toddlers", "rain forecast", "vegetarian guests"],
    "language": ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"],
    "phrase": ["where is the nearest train station", "we are running late, start without us",
               "the meeting moved to thursday", "thanks for the lovely dinner",
               "i has went to the shop yesterday", "can you send me the invoice again"],
    "condition": ["it is very cold outside", "the power goes out", "I am travelling abroad",
                  "the warranty has expired", "it has not been used for a year"],
    "behaviour": ["slow down", "smell odd", "turn off", "make a clicking sound", "lose colour"],
    "code_lang": ["Python", "JavaScript", "Go", "SQL", "Bash"],
    "task": ["removes duplicates from a list", "checks whether a string is a palindrome",
             "counts words in a file", "returns the median of numbers", "parses a date like 2024-03-14"],
}
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a friendly tutor who explains step by step."]


def composed_requests(count: int, seed: int = 11) -> list[str]:
    """JSONL lines of user requests composed from the templates (distinct texts)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        text = rng.choice(TEMPLATES)
        text = text.format(**{k: rng.choice(v) for k, v in FILL.items()})
        if text in seen:
            continue
        seen.add(text)
        messages = [{"role": "user", "content": text}]
        roll = rng.random()
        if roll < 0.2:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
        elif roll < 0.3:
            messages = [{"role": "user", "content": rng.choice(TEMPLATES).format(
                **{k: rng.choice(v) for k, v in FILL.items()})},
                {"role": "assistant", "content": "Sure, here is what I suggest."}] + messages
        out.append(json.dumps({"messages": messages}))
    return out


def user_settings(rng: random.Random) -> Settings:
    """The assumed users (module docstring)."""
    roll = rng.random()
    if roll < 0.40:
        return Settings(0.7, 50, 0.5, 512)  # the API's defaults
    if roll < 0.55:
        return Settings(0.7, 50, 0.95, 256)  # the Python client's defaults
    if roll < 0.65:
        return Settings(0.0, 10, 0.9, 1024)  # the documentation's example
    return Settings(round(rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0]), 2),
                    rng.choice([1, 5, 10, 20, 40, 50, 50, 100, 200, 1000]),
                    rng.choice([0.5, 0.7, 0.8, 0.9, 0.95, 1.0]),
                    rng.choice([64, 128, 256, 512, 512, 512, 1024, 2048]))


def send_users(url: str, prompts: list[Prompt], count: int, rng: random.Random) -> list[dict]:
    """`count` requests as the network's Python client posts them (requests.post with
    the body its TextGeneration builds); returns what each was."""
    import requests

    tokens = [f"eyJ{hashlib.sha256(str(i).encode()).hexdigest()[:40]}" for i in range(200)]
    weights = [1 / (i + 1) for i in range(len(tokens))]
    plan = []
    for _ in range(count):
        s = user_settings(rng)
        plan.append({"prompt": rng.choice(prompts), "settings": s, "stream": rng.random() < 0.5,
                     "token": rng.choices(tokens, weights)[0]})

    def post(item: dict) -> None:
        s = item["settings"]
        configs = dict(model="gemma-7b", temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       max_new_tokens=s.max_tokens)
        payload = {"messages": item["prompt"].messages, "configs": configs}
        target = f"{url}/ai/text_completion" + ("?stream=true" if item["stream"] else "")
        with requests.post(target, json=payload, headers={"Authorization": "Bearer " + item["token"]},
                           stream=item["stream"]) as response:
            response.raise_for_status()
            response.content

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, plan))
    return plan


# ------------------------------------------------------------------------ probes

HTTPX_HEADERS = (("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"),
                 ("User-Agent", "python-httpx/0.28.1"))


def pool_size(scenario: str) -> int:
    """Accounts the operator's probes go out under: `private-pool-K` has K (a pool in the
    secrets file, each probe under its keyed account as the daemon does), others one."""
    return int(scenario.rsplit("-", 1)[1]) if scenario.startswith("private-pool-") else 1


async def send_probes(url: str, scenario: str, bank: list[Prompt], mix, rounds: int) -> None:
    if scenario == "legacy":
        wire, tokens = Wire(HTTPX_HEADERS, ("max_tokens", "max_new_tokens")), ["validator"]
    else:
        wire = Wire()
        tokens = [f"eyJoperator-account-{i}-" + hashlib.sha256(str(i).encode()).hexdigest()[:20]
                  for i in range(pool_size(scenario))]
    clients = [FlexstackClient(url, token=t, wire=wire, timeouts=Timeouts(retries=0)) for t in tokens]
    try:
        for r in range(rounds):
            probes = derive_probes("stealth-bench-secret", r, "host-1", bank, mix, PROBES_PER_ROUND)
            await asyncio.gather(*(
                clients[account_index("stealth-bench-secret", p.id, len(clients))].complete(
                    p.messages, p.wire_settings, model="gemma-7b", stream=p.stream) for p in probes))
    finally:
        for client in clients:
            await client.aclose()


def probe_times(scenario: str, rounds: int, rng: random.Random) -> list[float]:
    """When the host sees each probe (seconds), in the order they were sent."""
    out = []
    secret = "stealth-bench-secret"
    phase = schedule_phase(secret, INTERVAL_S)
    for r in range(rounds):
        if scenario == "legacy":  # together, at a random point of the first 120 s of the public round
            at = r * INTERVAL_S + rng.uniform(0, 120)
            out += [at + rng.uniform(0, 0.05) for _ in range(PROBES_PER_ROUND)]
        else:
            out += [r * INTERVAL_S + phase + o
                    for o in arrival_offsets(secret, r, "host-1", PROBES_PER_ROUND, INTERVAL_S)]
    return out


# ------------------------------------------------------------------------ features

def repository_strings() -> tuple[set[str], str]:
    """Every string value of the repository's YAML/JSON(L) files, and its raw text."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    strings: set[str] = set()
    raw = []

    def walk(x):
        if isinstance(x, str):
            strings.add(x.strip())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 8 << 20:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        raw.append(text)
        try:
            if path.suffix in (".yaml", ".yml"):
                walk(yaml.safe_load(text))
            elif path.suffix == ".json":
                walk(json.loads(text))
            elif path.suffix == ".jsonl":
                for line in text.splitlines():
                    if line.strip():
                        walk(json.loads(line))
        except (yaml.YAMLError, ValueError):
            pass
    return strings, "\n".join(raw)


def features(req: dict, at: float, times: np.ndarray, token_share: dict[str, float],
             repo: tuple[set[str], str]) -> dict[str, dict[str, float]]:
    body = json.loads(req["body"])
    configs = body.get("configs", {})
    s = Settings.from_configs(configs)
    messages = body["messages"]
    headers = req["headers"]
    names = [k for k, _ in headers]
    get = {k.lower(): v for k, v in headers}
    auth = get.get("authorization", "")
    i = int(np.searchsorted(times, at))
    prev_gap = at - times[i - 1] if i > 0 else 1e4
    next_gap = times[i + 1] - at if i + 1 < len(times) else 1e4
    near = int(np.searchsorted(times, at + 2.0) - np.searchsorted(times, at - 2.0)) - 1
    phase = 2 * math.pi * (at % PUBLIC_CLOCK_S) / PUBLIC_CLOCK_S
    strings, raw = repo
    # The user's own turns: system prompts such as "You are a helpful assistant." are
    # boilerplate that real users and this repository share alike.
    in_repo = any(m["content"].strip() in strings or m["content"] in raw for m in messages if m["role"] == "user")
    one_hot = lambda prefix, value: {f"{prefix}={value}": 1.0}  # noqa: E731
    return {
        "fields": {**one_hot("body", ",".join(body)), **one_hot("configs", ",".join(configs)),
                   **one_hot("query", req["target"].partition("?")[2])},
        "headers": {**one_hot("names", ",".join(names)), **one_hot("ua", get.get("user-agent", "")),
                    **one_hot("accept", get.get("accept", "")),
                    **one_hot("encoding", get.get("accept-encoding", "")),
                    **one_hot("connection", get.get("connection", "")),
                    **one_hot("auth", auth.split(" ")[0] + (" placeholder" if auth == "Bearer validator" else ""))},
        "settings": {"temperature": s.temperature, "top_k": math.log1p(s.top_k), "top_p": s.top_p,
                     "max_tokens": math.log(s.max_tokens), "stream": float("stream=true" in req["target"])},
        "lengths": {"chars": math.log1p(sum(len(m["content"]) for m in messages)),
                    "last": math.log1p(len(messages[-1]["content"])), "messages": float(len(messages)),
                    "system": float(messages[0]["role"] == "system"), "bytes": math.log(len(req["body"]))},
        "timing": {"prev_gap": math.log1p(prev_gap), "next_gap": math.log1p(next_gap), "near": float(near),
                   "phase_sin": math.sin(phase), "phase_cos": math.cos(phase)},
        "repository": {"exact_match": float(in_repo)},
        "account": {"token_share": math.log(token_share.get(auth, 1e-6))},
    }


def auc(rows: list[dict[str, float]], labels: list[int], folds: int = 5) -> float:
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(DictVectorizer(sparse=False), StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    return round(float(cross_val_score(model, rows, labels, cv=cv, scoring="roc_auc").mean()), 3)


# ------------------------------------------------------------------------ a scenario

def scenario(name: str, corpus: list[str], rounds: int, repo, seed: int, tmp: Path) -> dict:
    rng = random.Random(seed)
    lines = corpus[:]
    rng.shuffle(lines)
    half = len(lines) // 2
    users_bank, _ = import_requests(lines[half:])
    mix = load_mix("calibration") if name == "legacy" else load_probe_mix("default")
    if name.startswith("private"):
        # The exported requests carry their settings; the probe half's become the mix
        # (`validator probes import --mix-out`) in the private-imported-mix scenario.
        exported = [json.dumps({**json.loads(line), "configs": user_settings(rng).as_configs()}) for line in lines[:half]]
        bank, report = import_requests(exported)
        if name == "private-imported-mix":
            write_mix(report.settings, tmp / "mix.yaml")
            mix = load_probe_mix("imported", tmp / "mix.yaml")
    else:
        bank = load_bank("configs/prompts/general.yaml")
    n_probes = rounds * PROBES_PER_ROUND
    with Capture() as host:
        asyncio.run(send_probes(host.url, name, bank, mix, rounds))
        probe_reqs = list(host.requests)
        send_users(host.url, users_bank, n_probes, rng)
        user_reqs = host.requests[len(probe_reqs):]
    # The order requests arrive at is the simulation's, not the capture's: the requests
    # themselves are what was captured; their times are drawn (users: Poisson at the
    # probes' rate) or the daemon's (probes).
    p_times = probe_times(name, rounds, rng)
    span = rounds * INTERVAL_S
    u_times = sorted(rng.uniform(0, span) for _ in range(len(user_reqs)))
    times = np.array(sorted(p_times + u_times))
    auths = [dict((k.lower(), v) for k, v in r["headers"]).get("authorization", "") for r in probe_reqs + user_reqs]
    counts = {a: n / len(auths) for a, n in zip(*np.unique(auths, return_counts=True))}
    rows = [features(r, t, times, counts, repo) for r, t in zip(probe_reqs, p_times)]
    rows += [features(r, t, times, counts, repo) for r, t in zip(user_reqs, u_times)]
    labels = [1] * len(probe_reqs) + [0] * len(user_reqs)
    out = {"probes": len(probe_reqs), "users": len(user_reqs), "probe_bank": len(bank),
           "user_bank": len(users_bank), "auc": {}}
    for group in (*GROUPS, "account"):
        out["auc"][group] = auc([r[group] for r in rows], labels)
    merged = lambda groups: [{f"{g}.{k}": v for g in groups for k, v in r[g].items()} for r in rows]  # noqa: E731
    out["auc"]["overall"] = auc(merged(GROUPS), labels)
    out["auc"]["overall_with_account"] = auc(merged((*GROUPS, "account")), labels)
    probe_settings = [Settings.from_configs(json.loads(r["body"])["configs"]) for r in probe_reqs]
    out["probe_max_tokens"] = dict(sorted(
        {str(k): sum(s.max_tokens == k for s in probe_settings) for k in {s.max_tokens for s in probe_settings}}.items(),
        key=lambda kv: int(kv[0])))
    out["probe_headers"] = probe_reqs[0]["headers"][:-2]
    out["user_headers"] = user_reqs[0]["headers"][:-2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 rounds (240 probes) instead of 150")
    ap.add_argument("--users", type=Path, help="JSONL of exported user requests (`messages`) as the bank")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rounds = 60 if args.quick else 150
    corpus = (args.users.read_text(encoding="utf-8").splitlines() if args.users
              else composed_requests(600))
    t0 = time.perf_counter()
    repo = repository_strings()
    result = {"benchmark": "probe_stealth", "command": "python " + " ".join(sys.argv),
              "what": "ROC AUC of a logistic regression telling probes from held-out user requests "
                      "(5-fold stratified cross-validation); 0.5 = chance; goal <= 0.6",
              "users_source": str(args.users) if args.users else "composed from templates (benchmarks/probe_stealth.py)",
              "user_model": {"settings": "40% API defaults (0.7, 50, 0.5, 512), 15% Python client defaults "
                                         "(0.7, 50, 0.95, 256), 10% documentation example (0, 10, 0.9, 1024), "
                                         "35% other documented values",
                             "stream": 0.5, "arrivals": "Poisson at the probes' rate",
                             "accounts": "200 bearer tokens, Zipf activity",
                             "client": "requests.post as the flexstack package calls it"},
              "scenarios": {}}
    import tempfile

    for i, name in enumerate(SCENARIOS):
        with tempfile.TemporaryDirectory() as tmp:
            result["scenarios"][name] = scenario(name, corpus, rounds, repo, seed=100 + i, tmp=Path(tmp))
        print(name, json.dumps(result["scenarios"][name]["auc"]), file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or RESULTS / ("probe_stealth.quick.json" if args.quick else "probe_stealth.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
