"""Write audit records (JSONL) answered by real honest and cheating hosts.

Hosts are named from validator.network.catalogue.CATALOGUE (the simulator's strategies,
run offline, their engine calls batched).

    python benchmarks/make_records.py --out examples/records.jsonl --prompts 6 \
        --hosts honest-llama.cpp,honest-transformers-bf16,cheat-other-model,cheat-layers-removed,cheat-hotter,cheat-truncated,cheat-replayed,cheat-greedy-when-sampling
    python benchmarks/make_records.py --out benchmarks/results/audit_records.jsonl --prompts 25 --first 0

Prompts come from the general bank, by default starting after the ones the tests use
(the speed benchmarks' records start at the first, `--first 0`); each is
asked once greedily and once sampled (settings from a mix in configs/settings.yaml:
`calibration`, the short answers the committed records were made with, unless --mix
names another; `--mix default` gives answers of the length users ask for, up to 512 and
1024 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from validator.network.catalogue import CATALOGUE, catalogue_network  # noqa: E402
from validator.probing.probes import greedy_and_sampled, load_bank, load_mix  # noqa: E402
from validator.models.registry import Registry  # noqa: E402

DEFAULT_HOSTS = "honest-llama.cpp,honest-transformers-bf16,cheat-hotter,cheat-other-model"


def make_records(prompts: int, hosts: list[str], model: str = "smollm2-135m", first: int = 40,
                 mix: str = "calibration", max_tokens: int | None = None) -> list[dict]:
    bank = load_bank("configs/prompts/general.yaml")[first : first + prompts]
    settings = [(w, replace(s, max_tokens=min(s.max_tokens, max_tokens or s.max_tokens))) for w, s in load_mix(mix)]
    probes = greedy_and_sampled(bank, settings, seed=2026)
    network = catalogue_network(model, hosts, Registry.load())
    records = []
    for host in hosts:
        # Greedy-when-sampling differs from an honest host only on sampled probes.
        asked = [p for p in probes if not p[1].greedy] if host == "cheat-greedy-when-sampling" else probes
        print(f"answering {len(asked)} probes as {host} ...", file=sys.stderr)
        records += network.records(host, asked)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--first", type=int, default=40, help="index of the first prompt in the bank")
    ap.add_argument("--hosts", default=DEFAULT_HOSTS, help="comma separated: " + ", ".join(CATALOGUE))
    ap.add_argument("--mix", default="calibration", help="settings mix (configs/settings.yaml)")
    ap.add_argument("--max-tokens", type=int, help="cap every setting's max_tokens")
    args = ap.parse_args()
    records = make_records(args.prompts, args.hosts.split(","), first=args.first, mix=args.mix,
                           max_tokens=args.max_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
