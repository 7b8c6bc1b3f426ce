"""Decode benchmark: per-token latency and cache bytes of one model, run two ways, at contexts 1k..128k.

    python benchmarks/bench_decode.py                 # contexts 1k..32k: about a minute on 2 CPU cores
    python benchmarks/bench_decode.py --long          # adds 64k and 128k: about 3 minutes more
    python benchmarks/bench_decode.py --device cuda   # writes results/decode-cuda.json

The model: Llama-style (RoPE, 8 query heads over 2 key/value heads of 64, 2 layers, hidden 512,
vocabulary 4096), random weights, float32, batch 1.  The same weights run

- "global": attn_implementation="global_attention" (block size 256) with a GlobalAttentionCache,
  filled by the model's own prefill of the context (in chunks of --prefill-chunk tokens);
- "sdpa": attn_implementation="sdpa" with a DynamicCache, filled with random keys and values of the
  context's length (what a decode step costs does not depend on them, and a dense prefill of 128k
  tokens alone would take longer than this whole benchmark on a CPU).

Then greedy decode steps are timed, each a full forward of one token (logits included); reported:
the median per token of the least disturbed of --rounds rounds of --steps steps (other work on a
shared machine inflates timings, never deflates them), the bytes each cache holds at the context's
length, and how many times fewer bytes the global cache holds over the next b positions: best (a
context that is a multiple of b, the current block empty), worst (b - 1 raw tokens held) and mean.
A correctness gate runs first: prefill + decoding with the cache must give the logits of the whole sequence at once.
Writes benchmarks/results/decode-{cpu,cuda}.json.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import common
from globalattn.integrations.transformers import GlobalAttentionCache, register

RESULTS = Path(__file__).parent / "results"
CONTEXTS = [1024, 4096, 16384, 32768]
LONG_CONTEXTS = [65536, 131072]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--long", action="store_true", help=f"also contexts {LONG_CONTEXTS}")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point; the least disturbed one counts")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of rest between filling and timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/decode-<device type>.json")
    args = parser.parse_args()
    contexts = args.contexts + (LONG_CONTEXTS if args.long else [])
    device = torch.device(args.device)
    out_path = args.out or RESULTS / f"decode-{device.type}.json"

    torch.manual_seed(0)
    name = register()
    model = _model(args.block_size, max(contexts) + args.steps + 8, device)
    model.set_attn_implementation(name)
    _correctness_gate(model, args.block_size, device)
    machine = common.machine(device, modules=(torch, transformers), threads=True)
    print(f"machine: {machine}\n")

    header = (
        f"{'context':>8} | {'global ms/token':>15} {'sdpa ms/token':>13} {'speed-up':>8} | "
        f"{'global cache MB':>15} {'dynamic cache MB':>16} {'ratio best':>10} {'worst':>6} {'mean':>6}"
    )
    print(header + "\n" + "-" * len(header))
    rows = []
    sdpa_model = copy.deepcopy(model)
    sdpa_model.set_attn_implementation("sdpa")
    for context in contexts:
        ours = GlobalAttentionCache()
        _prefill(model, ours, context, args.prefill_chunk, device)
        dynamic = _random_dynamic_cache(model.config, context, device)
        ours_bytes = ours.nbytes  # both holding exactly `context` positions
        dynamic_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers)
        global_s = _decode_seconds(model, ours, args, device)
        sdpa_s = _decode_seconds(sdpa_model, dynamic, args, device)
        ratios = _ratios_over_one_block(model, ours, dynamic_bytes / context, args.block_size, device)
        row = {
            "context": context,
            "global_ms_per_token": global_s * 1e3,
            "sdpa_ms_per_token": sdpa_s * 1e3,
            "speedup": sdpa_s / global_s,
            "global_cache_bytes": ours_bytes,
            "dynamic_cache_bytes": dynamic_bytes,
            # dynamic / global bytes at every position of one block: best (the block just pooled),
            # worst (b - 1 raw tokens held) and the mean a long generation sees
            "ratio_best": max(ratios),
            "ratio_worst": min(ratios),
            "ratio_mean": statistics.fmean(ratios),
        }
        rows.append(row)
        print(
            f"{context:>8} | {row['global_ms_per_token']:>15.2f} {row['sdpa_ms_per_token']:>13.2f} "
            f"{row['speedup']:>7.1f}x | {ours_bytes / 2**20:>15.2f} {dynamic_bytes / 2**20:>16.1f} "
            f"{row['ratio_best']:>9.0f}x {row['ratio_worst']:>5.0f}x {row['ratio_mean']:>5.0f}x"
        )
        del ours, dynamic

    config = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")}
    config |= {"num_key_value_heads": model.config.num_key_value_heads, "vocab_size": model.config.vocab_size}
    report = {
        "machine": machine,
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on the machine skews the timings
        "dtype": "float32",
        "batch": 1,
        "block_size": args.block_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "model": config,
        "rows": rows,
    }
    common.write_json(out_path, report)
    print(f"\nwrote {out_path}")


def _model(block_size: int, max_positions: int, device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    config.global_attention_block_size = block_size
    return LlamaForCausalLM(config).to(device).eval()


def _cache_kwargs(model, cache) -> dict:
    """The forward's name for the cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


@torch.no_grad()
def _prefill(model, cache, context: int, chunk: int, device) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    for start in range(0, context, chunk):
        model.model(input_ids=ids[:, start : start + chunk], use_cache=True, **_cache_kwargs(model, cache))


def _random_dynamic_cache(config, context: int, device) -> DynamicCache:
    cache = DynamicCache()
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, context, head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, device=device), torch.randn(shape, device=device), layer)
    return cache


@torch.no_grad()
def _decode_seconds(model, cache, args, device) -> float:
    """Seconds of one greedy decode step (a forward of one token): the median of ``args.steps`` steps
    in the least disturbed of ``args.rounds`` rounds (other work on a shared machine only slows steps
    down), after ``args.settle`` seconds of rest and two untimed warm-up steps."""
    # After a long prefill or a big allocation this VM ran decode steps 20-30x slower for a few
    # seconds (memory being reclaimed, or the host throttling): let the machine settle first.
    time.sleep(args.settle)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)

    def step() -> None:
        nonlocal token
        logits = model(input_ids=token, use_cache=True, **_cache_kwargs(model, cache)).logits
        token = logits[:, -1:].argmax(-1)

    for _ in range(2):  # untimed warm-up steps
        step()
    rounds = [[common.seconds(step, device) for _ in range(args.steps)] for _ in range(args.rounds)]
    return min(statistics.median(times) for times in rounds)


@torch.no_grad()
def _ratios_over_one_block(model, cache, dynamic_bytes_per_token: float, block_size: int, device) -> list[float]:
    """Decode one block's worth of tokens more, and at each step the bytes a DynamicCache of the same
    length would hold over the bytes ``cache`` holds.  A context that is a multiple of b is the best
    case (the current block empty); b - 1 tokens later is the worst."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    ratios = []
    for _ in range(block_size):
        model(input_ids=token, use_cache=True, **_cache_kwargs(model, cache))
        ratios.append(dynamic_bytes_per_token * cache.get_seq_length() / cache.nbytes)
    return ratios


@torch.no_grad()
def _correctness_gate(model, block_size: int, device) -> None:
    """Prefill (crossing blocks, ending mid-block) + decoding with the cache == the whole sequence at once."""
    length, prompt = 2 * block_size + 40, block_size + 17
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    whole = model(input_ids=ids).logits
    cache = GlobalAttentionCache()
    steps = [model(input_ids=ids[:, :prompt], **_cache_kwargs(model, cache)).logits]
    for t in range(prompt, length):
        steps.append(model(input_ids=ids[:, t : t + 1], **_cache_kwargs(model, cache)).logits)
    error = (torch.cat(steps, dim=1) - whole).abs().max().item()
    if error > 1e-3:
        sys.exit(f"correctness gate failed: cached decoding differs from the whole sequence by {error:.3g}")
    print(f"correctness gate: prefill + {length - prompt} decode steps == whole sequence (max |diff| {error:.1e})")


if __name__ == "__main__":
    main()
