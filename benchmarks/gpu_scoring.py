"""Scoring on the GPU with gemma-7b's dimensions: tokens per second, model FLOP
utilisation and peak memory, for batch sizes 1-64 and lengths 256-2048.

The model is `GemmaConfig()` (gemma-7b: 28 layers, hidden 3072, 16 heads of 256, MLP
24576, vocabulary 256,000) with random weights in bfloat16 on CUDA, SDPA attention (its
flash kernel for bf16 causal attention); nothing is downloaded. Each configuration
scores `batch` sequences of `length` tokens, the second half being the answer, through
the scorer's own batched feature path (`ReferenceModel.step_features`: one forward pass
per batch of up to 65,536 tokens, then per answer step the log-softmax reduced on the
device to what the verdict needs, with the sampled settings' support statistics: the
API's defaults, T 0.7, top_k 50, top_p 0.5), and, as the ceiling in the same run, a
plain forward pass of the same tokens (hidden states, then the answer steps' logits
reduced to one max each).

    python benchmarks/gpu_scoring.py                 # on a CUDA machine, about 3 minutes
    python benchmarks/gpu_scoring.py --tiny --device cpu   # smoke test of the script

Writes benchmarks/results/gpu_scoring.json; prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from validator.scoring.reference import ReferenceModel  # noqa: E402
from validator.models.sampling import Settings  # noqa: E402

# Dense bf16 tensor-core peaks (vendor figures, without sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
API_DEFAULTS = Settings(temperature=0.7, top_k=50, top_p=0.5, max_tokens=4096)


def build_model(tiny: bool, device: str):
    from transformers import AutoModelForCausalLM, GemmaConfig

    if tiny:
        cfg = GemmaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    else:
        cfg = GemmaConfig()  # gemma-7b's dimensions
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    return model, cfg


def scorer_for(model, device: str) -> ReferenceModel:
    """The scorer's own batched path around a bare model: step_features needs the model,
    its device, a pad id and the batch budget; no tokenizer is involved."""
    ref = ReferenceModel.__new__(ReferenceModel)
    ref.bind(model, device)
    ref.pad_id = 0
    return ref


def flops(cfg, batch: int, length: int, answer: int) -> float:
    """Model FLOPs of one scoring pass: 2 x parameters x tokens for the matmuls, causal
    attention scores and values, and the LM head on the answer steps only."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    dense = 2 * per_layer * layers * length
    attention = 2 * 2 * layers * heads * hd * length * length / 2  # QK^T and AV, causal half
    head = 2 * h * cfg.vocab_size * answer
    return batch * (dense + attention + head)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels picked, memory pooled)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


@torch.inference_mode()
def plain_forward(model, ids: torch.Tensor, answer: int) -> None:
    hidden = model.model(input_ids=ids).last_hidden_state[:, -answer - 1 : -1]
    head = model.get_output_embeddings()
    for a in range(0, hidden.shape[1], 512):  # the same slicing budget as the scorer
        head(hidden[:, a : a + 512]).float().max(dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="A tiny Gemma (smoke test).")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--lengths", default="256,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_scoring.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine (or --tiny --device cpu)")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, cfg = build_model(args.tiny, args.device)
    load_s = time.perf_counter() - t0
    ref = scorer_for(model, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: model with {params / 1e9:.2f} B parameters built in {load_s:.1f} s")
    print(f"{'batch':>5} {'length':>6} {'scorer tok/s':>13} {'MFU':>6} {'forward tok/s':>14} "
          f"{'MFU':>6} {'scorer/fwd':>10} {'peak GiB':>9}")

    rows = []
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.lengths.split(",")):
            answer = length // 2
            gen = torch.Generator().manual_seed(batch * 10_000 + length)
            seqs = torch.randint(1, cfg.vocab_size, (batch, length), generator=gen)
            items = [(s[:-answer].tolist(), s[-answer:].tolist(),
                      [[t] for t in s[-answer:].tolist()] + [[1]], API_DEFAULTS, 0) for s in seqs]
            ids = seqs.to(args.device)
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                scorer_s = timed(lambda: ref.step_features(items), args.device, args.repeats)
                forward_s = timed(lambda: plain_forward(model, ids, answer), args.device, args.repeats)
            except torch.OutOfMemoryError:
                print(f"{batch:>5} {length:>6}  out of memory")
                rows.append({"batch": batch, "length": length, "error": "out of memory"})
                continue
            peak_gib = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
            f = flops(cfg, batch, length, answer)
            row = {"batch": batch, "length": length, "answer_tokens": answer,
                   "scorer_s": round(scorer_s, 5), "forward_s": round(forward_s, 5),
                   "scorer_tokens_per_s": round(batch * length / scorer_s, 1),
                   "forward_tokens_per_s": round(batch * length / forward_s, 1),
                   "scorer_vs_forward": round(forward_s / scorer_s, 3),
                   "flop_per_pass": f,
                   "scorer_mfu": round(f / scorer_s / peak, 4) if peak else None,
                   "forward_mfu": round(f / forward_s / peak, 4) if peak else None,
                   "peak_memory_gib": round(peak_gib, 2) if peak_gib is not None else None}
            rows.append(row)
            mfu = lambda v: f"{100 * v:5.1f}%" if v is not None else "    -"  # noqa: E731
            print(f"{batch:>5} {length:>6} {row['scorer_tokens_per_s']:>13,.0f} {mfu(row['scorer_mfu'])} "
                  f"{row['forward_tokens_per_s']:>14,.0f} {mfu(row['forward_mfu'])} "
                  f"{row['scorer_vs_forward']:>10.2f} {peak_gib or 0:>9.1f}", flush=True)

    result = {"benchmark": "gpu_scoring", "device": name, "peak_bf16_flops": peak,
              "model": "GemmaConfig() random weights" if not args.tiny else "tiny Gemma",
              "parameters": params, "dtype": str(next(model.parameters()).dtype),
              "attention": "sdpa", "torch": torch.__version__, "settings": "T 0.7, top_k 50, top_p 0.5",
              "model_build_s": round(load_s, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
