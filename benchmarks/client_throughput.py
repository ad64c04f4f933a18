"""Client throughput: probes per second and client CPU time per probe.

Starts `validator simulate` in a subprocess with N fast hosts (the `static` strategy: no
model), then sends the probes at the given concurrency, twice in this process:

- baseline: bare httpx POSTs on one pooled AsyncClient (no deadlines, no envelope checks);
- client:   validator.probing.client.FlexstackClient, one per host on that same kind of pool, with
            its deadlines, retries, envelope parsing and byte caps; half the probes streamed.

CPU time is this process's (the hosts run in the subprocess), so it is the client's own.
Prints the ratios and writes benchmarks/results/client_throughput.json.

    python benchmarks/client_throughput.py            # 2,000 probes, concurrency 100, 50 hosts
    python benchmarks/client_throughput.py --probes 300 --hosts 10 --concurrency 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from validator.probing.client import FlexstackClient, Timeouts  # noqa: E402
from validator.models.sampling import Settings  # noqa: E402

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
SETTINGS = Settings(temperature=0.0, top_k=50, top_p=0.5, max_tokens=64)


def start_hosts(n: int) -> tuple[subprocess.Popen, list[str]]:
    network = {"hosts": [{"name": f"fast-{i:03d}", "strategy": "static"} for i in range(n)]}
    path = Path(tempfile.mkdtemp()) / "network.yaml"
    path.write_text(yaml.safe_dump(network))
    proc = subprocess.Popen([sys.executable, "-m", "validator.cli", "simulate", "--network", str(path)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    urls = []
    while len(urls) < n:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("validator simulate exited early")
        urls.append(line.split()[1])
    return proc, urls


def limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                        keepalive_expiry=4.0)


async def run_baseline(urls: list[str], probes: int, concurrency: int) -> list[bool]:
    body = json.dumps({"messages": MSGS, "configs": {"model": "gemma-7b", **SETTINGS.as_configs()}})
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, limits=limits(concurrency), timeout=60) as http:
        async def one(i: int) -> bool:
            async with sem:
                r = await http.post(urls[i % len(urls)] + "/ai/text_completion",
                                    params={"stream": "false"}, content=body,
                                    headers={"Authorization": "Bearer t",
                                             "Content-Type": "application/json"})
                return r.status_code == 200 and bool(r.json()["data"]["data"]["response"])

        return await asyncio.gather(*(one(i) for i in range(probes)))


async def run_client(urls: list[str], probes: int, concurrency: int) -> list[bool]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, limits=limits(concurrency)) as http:
        clients = [FlexstackClient(u, token="t", http=http, timeouts=Timeouts()) for u in urls]

        async def one(i: int) -> bool:
            async with sem:
                rec = await clients[i % len(clients)].complete(MSGS, SETTINGS, stream=i % 2 == 1)
                return rec.ok

        return await asyncio.gather(*(one(i) for i in range(probes)))


def measure(fn, urls, probes, concurrency) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    ok = asyncio.run(fn(urls, probes, concurrency))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"probes": probes, "ok": sum(ok), "wall_s": round(wall, 3),
            "probes_per_s": round(probes / wall, 1),
            "cpu_ms_per_probe": round(1000 * cpu / probes, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/client_throughput.json")
    args = ap.parse_args()

    proc, urls = start_hosts(args.hosts)
    try:
        measure(run_client, urls, min(200, args.probes), args.concurrency)  # warm up both sides
        baseline = measure(run_baseline, urls, args.probes, args.concurrency)
        client = measure(run_client, urls, args.probes, args.concurrency)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)

    result = {
        "benchmark": "client_throughput",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "hosts": args.hosts, "concurrency": args.concurrency,
        "baseline_httpx": baseline, "client": client,
        "client_vs_baseline_throughput": round(client["probes_per_s"] / baseline["probes_per_s"], 3),
        "client_vs_baseline_cpu": round(client["cpu_ms_per_probe"] / baseline["cpu_ms_per_probe"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"baseline httpx: {baseline['probes_per_s']} probes/s, {baseline['cpu_ms_per_probe']} ms CPU/probe")
    print(f"client:         {client['probes_per_s']} probes/s, {client['cpu_ms_per_probe']} ms CPU/probe "
          f"({client['ok']}/{client['probes']} ok)")
    print(f"client / baseline: throughput x{result['client_vs_baseline_throughput']}, "
          f"CPU per probe x{result['client_vs_baseline_cpu']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
