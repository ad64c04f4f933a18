"""The production reference path on a GPU, in one run (about 8 minutes on one H200):

1. Gemma-3 270M (the shipped `gemma-3-270m` entry) in bfloat16
   on CUDA is the reference; it is calibrated with its GPU engines (transformers on the
   reference's device in float32 and bfloat16, eager attention, one request at a time)
   and llama.cpp (CPU), then general-bank answers of the catalogue's honest hosts and
   cheats generated on the CPU (transformers float32, llama.cpp) are audited against
   it: cross-hardware honest answers must have 0 failed, every cheat must be dishonest.
2. The aligner path on a gemma-7b-shaped model (GemmaConfig(): 28 layers, hidden 3072,
   vocabulary 256,000; random bfloat16 weights, nothing downloaded) at the budgets the
   reference derives from the free memory: peak memory and tokens/s for 16 sequences
   of 1,024 tokens and 64 of 2,048 (half prompt, half answer), greedy and sampled.

    python benchmarks/gpu_reference.py                 # on a CUDA machine
    python benchmarks/gpu_reference.py --dry-run       # on the CPU: small sizes, same code

Writes benchmarks/results/gpu_reference.json (--dry-run: gpu_reference.dry-run.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from validator.models.registry import ModelSpec, Registry  # noqa: E402
from validator.models.sampling import Settings  # noqa: E402
from validator.scoring.reference import ReferenceModel  # noqa: E402


def reference_registry(device: str, dtype: str, tmp: Path) -> Registry:
    """The shipped gemma-3-270m entry (its GGUF, converted once to the transformers
    directory the reference loads; llama.cpp hosts run the GGUF itself) in `dtype` on
    `device`."""
    shipped = Registry.load()
    raw = yaml.safe_load(shipped.path.read_text())
    entry = raw["models"]["gemma-3-270m"]
    raw["models"]["gemma-3-270m"] = {**entry, "dtype": dtype, "device": device,
                                     "calibration": str(tmp / "gemma-3-270m.json")}
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Registry.load(path)


def part_reference(args, device: str, tmp: Path) -> dict:
    from validator.network.catalogue import CATALOGUE, OfflineNetwork
    from validator.probing.probes import greedy_and_sampled, load_bank, load_mix
    from validator.service.audit import run_audit
    from validator.service.calibration import calibrate
    from validator.service.scorer import Scorer

    registry = reference_registry(device, "bfloat16", tmp)
    spec = registry.get("gemma-3-270m")
    t0 = time.perf_counter()
    ref = ReferenceModel.load(spec)
    load_s = time.perf_counter() - t0
    bank = tmp / "calibration-bank.yaml"
    bank.write_text(yaml.safe_dump({"prompts": [{"id": p.id, "kind": p.kind, "messages": p.messages}
                                                for p in load_bank("configs/prompts/calibration.yaml")[: args.calibration_prompts]]}))
    t0 = time.perf_counter()
    engines = ["transformers-float32", "transformers-bfloat16", "transformers-bfloat16-eager",
               "transformers-bfloat16-batch1", "llama.cpp"]
    result = calibrate(spec, bank, engines, log=lambda m: print(m, file=sys.stderr))
    calibrate_s = time.perf_counter() - t0
    spec.calibration.write_text(json.dumps(result, indent=2))

    probes = greedy_and_sampled(load_bank("configs/prompts/general.yaml")[: args.audit_prompts], load_mix("calibration"), seed=7)
    honest = ["honest-transformers-fp32", "honest-llama.cpp"]
    cheats = ["cheat-other-model", "cheat-requantised", "cheat-settings-ignored", "cheat-truncated"]
    # The other-model cheat serves SmolLM2-135M (its default other model is Gemma-3 270M
    # itself, the reference here).
    hosts = {n: CATALOGUE[n] for n in honest + cheats} | {"cheat-other-model": {"strategy": "other-model",
                                                                                "serves": "smollm2-135m"}}
    # The hosts run on the CPU (the same entry, float32 on the CPU): cross-hardware.
    host_dir = tmp / "hosts"
    host_dir.mkdir()
    network = OfflineNetwork.of(hosts, "gemma-3-270m", reference_registry("cpu", "float32", host_dir))
    t0 = time.perf_counter()
    records = [r for host in honest + cheats for r in network.records(host, probes)]
    answer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lines, hosts = run_audit((json.dumps(r) for r in records), Scorer(registry, models={"gemma-3-270m": ref}))
    audit_s = time.perf_counter() - t0
    out = {"reference": {"model": "gemma-3-270m", "dtype": "bfloat16", "device": device, "load_s": round(load_s, 1),
                         "budgets": ref.budgets.as_dict()},
           "calibration": {"engines": list(result["engines"]), "tolerances": result["tolerances"],
                           "answers": result["summary"], "seconds": round(calibrate_s, 1)},
           "audit": {"answers": len(records), "answer_s": round(answer_s, 1), "audit_s": round(audit_s, 1),
                     "hosts": {h: {k: hosts[h][k] for k in ("verdict", "records", "failed")} for h in hosts}}}
    out["holds"] = {"honest_0_failed": all(hosts[h]["failed"] == 0 for h in honest),
                    "every_cheat_dishonest": all(hosts[c]["verdict"] == "dishonest" for c in cheats)}
    return out


def gemma_7b_shaped(device: str, dry_run: bool):
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig()  # gemma-7b's dimensions
    if dry_run:
        cfg = GemmaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, head_dim=32)  # vocabulary stays 256,000
    with torch.device(device):
        model = GemmaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return model, cfg


def part_aligner(args, device: str) -> dict:
    """The aligner's batched pass (score_paths with candidate sets and kept keys/values)
    at the configured budgets."""
    torch.manual_seed(0)
    model, cfg = gemma_7b_shaped(device, args.dry_run)
    ref = ReferenceModel.__new__(ReferenceModel)
    ref.spec = ModelSpec("gemma-7b-shaped", {"hub": "none"}, dtype="bfloat16", device=device)
    ref.bind(model, device)
    ref.pad_id = 0
    ref.eos_ids = [1]
    runs = []
    sizes = [(2, 128), (4, 256)] if args.dry_run else [(16, 1024), (64, 2048)]
    for rows, length in sizes:
        for settings in (Settings(temperature=0.0, max_tokens=length), Settings(temperature=0.7, top_k=50, top_p=0.5, max_tokens=length)):
            g = torch.Generator().manual_seed(rows * length)
            items = []
            for _ in range(rows):
                ids = torch.randint(10, cfg.vocab_size, (length,), generator=g).tolist()
                prompt, path = ids[: length // 2], ids[length // 2 :]
                items.append((prompt, path, [[t] for t in path] + [ref.eos_ids], settings, 0))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
            t0 = time.perf_counter()
            ref.score_paths(items, keep_past=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
            runs.append({"rows": rows, "length": length, "sampled": not settings.greedy, "seconds": round(took, 2),
                         "tokens_per_s": round(rows * length / took),
                         "peak_gib_beyond_weights": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
                         if device.startswith("cuda") else None})
            print(runs[-1], file=sys.stderr)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": "GemmaForCausalLM, gemma-7b's config" + (" (dry run: 2 layers, hidden 128)" if args.dry_run else ""),
            "weights_gib": round(weights / 2**30, 2), "budgets": ref.budgets.as_dict(), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes: the same code, minutes not hours.")
    ap.add_argument("--calibration-prompts", type=int, default=None)
    ap.add_argument("--audit-prompts", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine (or --dry-run)")
    args.calibration_prompts = args.calibration_prompts or (2 if args.dry_run else 30)
    args.audit_prompts = args.audit_prompts or (2 if args.dry_run else 20)
    out_path = args.out or ROOT / "benchmarks/results" / ("gpu_reference.dry-run.json" if args.dry_run else "gpu_reference.json")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        reference = part_reference(args, device, Path(tmp))
    aligner = part_aligner(args, device)
    result = {"benchmark": "gpu_reference", "dry_run": args.dry_run,
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "reference": reference, "aligner": aligner}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"holds": reference["holds"], "seconds": result["seconds"], "out": str(out_path)}))


if __name__ == "__main__":
    main()
