#!/usr/bin/env python3
"""Speed of GPT-2 sampling on this machine, on random weights of the real shapes.

    python benchmarks/generate.py                   # 124M and 355M, batch 1 and 8, each flag set
    python benchmarks/generate.py --flags top_k=40  # some of greedy, sample, top_k=40, top_p=0.9 and two
                                                    # with penalties (see FLAG_SETS)
    python benchmarks/generate.py --models 1558M    # any of 124M 355M 774M 1558M
    python benchmarks/generate.py --dtype bfloat16
    python benchmarks/generate.py --dtype int8      # weights quantized to int8 (gpt2.int8)
    python benchmarks/generate.py --distinct        # each row of a batch with its own prompt
    python benchmarks/generate.py --tiny            # a tiny model, to check that the script runs

For each model, flag set and batch size it prints: compile time, prefill tokens/s for a
512-token prompt (the engine's admit and its first step), decode tokens/s for 256 new tokens
(median of --runs runs after a warm-up, with min and max) and first-token latency; and for each model its load time and peak resident memory.
The flag sets are those users run: greedy (temperature 0), top_k 40 and top_p 0.9 (temperature
1), and with --flags also plain sampling from all tokens ("sample"). The rows of a batch are
samples of one prompt, as the command-line scripts make them (its tokens are computed and cached
once for all rows), or with --distinct each row has a prompt of its own. Each model runs in its
own process, so that its peak memory is its own. The same process measures the machine right
before each run, so that both see the same machine on these shared hosts: its memory bandwidth
(a NumPy float32 matrix-vector product over as many bytes as the model's weights, at most 2 GiB)
before each decode run, its float32 GEMM rate before each prefill run. Each decode rate is shown
as a fraction of the bandwidth ceiling (every weight is read once per step), each prefill rate
(prompt tokens computed per second) as a fraction of the GEMM rate: medians of the per-run
fractions. Speed does not depend on the weights' values, so random ones measure it. The model
folders are made once, in --models_dir. With --dtype int8 the ceiling is over one byte a weight,
and the int8 programs are kept in the compilation cache (converted and quantized once): load s
then reads them from there. int8 compiles nothing, so its compile s is
only what its first call took beyond the later ones.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

from gpt2.arguments import GENERATION_DTYPES  # noqa: E402
from machine import forward_flops, machine_bandwidth, machine_gemm, parameter_count  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FLAG_SETS = {"greedy": dict(temperature=0), "sample": {}, "top_k=40": dict(top_k=40), "top_p=0.9": dict(top_p=0.9),
             "top_k=40,repetition_penalty=1.2": dict(top_k=40, repetition_penalty=1.2),
             "top_k=40,presence_penalty=0.5,frequency_penalty=0.5": dict(top_k=40, presence_penalty=0.5,
                                                                         frequency_penalty=0.5)}


def worker(model_dir, flag_sets, batches, prompt_len, new_tokens, runs, dtype, distinct):
    """Measure one model in this process; print a JSON line with the numbers."""
    from gpt2 import GPT2
    from gpt2.engine import Request, Settings, decode_requests, shared_prefix_length

    start = time.perf_counter()
    model = GPT2.from_folder(model_dir, dtype)
    load_s = time.perf_counter() - start
    weight_bytes = parameter_count(model.hparams) * (1 if model.int8 else model.params["wte"].dtype.size)
    rng = np.random.default_rng(0)
    prompts = {batch: rng.integers(0, model.hparams.n_vocab, (batch, prompt_len)).tolist() if distinct
               else [rng.integers(0, model.hparams.n_vocab, prompt_len).tolist()] * batch for batch in batches}
    # What a prefill computes: the tokens that all rows' prompts start with once, each row's own
    # tokens (at least its last one, fed by its first step) once per row.
    n_shared = {batch: shared_prefix_length(prompts[batch]) for batch in batches}
    prefill_tokens = {batch: prompt_len + (batch - 1) * (prompt_len - n_shared[batch]) for batch in batches}
    gemm_flops = {batch: forward_flops(model.hparams, prompt_len) + (batch - 1) * (
        forward_flops(model.hparams, prompt_len) - forward_flops(model.hparams, n_shared[batch])) for batch in batches}

    def timed(flags, batch, length):
        """Seconds to make `length` tokens in each of `batch` rows (the engine's prefill included), and to the first."""
        start, first = time.perf_counter(), None
        engine = model.engine(batch, prompts[batch][0][:n_shared[batch]])
        requests = [Request(prompt, length, Settings(seed=1, sample=i, **FLAG_SETS[flags]))
                    for i, prompt in enumerate(prompts[batch])]
        for _ in decode_requests(engine, requests):
            first = first or time.perf_counter() - start
        return time.perf_counter() - start, first

    cases = [(flags, batch) for flags in flag_sets for batch in batches]
    warm_up = {}
    for flags, batch in cases:  # compiles the decoding loop and traces the prefill
        warm_up[flags, batch] = timed(flags, batch, new_tokens)[0]
        timed(flags, batch, 1)
    # The weights, caches and compiled code are all in memory now; the bandwidth measurement's
    # matrix, allocated from here on, must not count as the model's memory.
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    runs_of = {case: {"full": [], "prefill": [], "bandwidth": [], "gemm": []} for case in cases}
    for _ in range(runs):
        for (flags, batch), r in runs_of.items():
            r["bandwidth"].append(machine_bandwidth(weight_bytes))
            r["full"].append(timed(flags, batch, new_tokens)[0])
            r["gemm"].append(machine_gemm())
            r["prefill"].append(timed(flags, batch, 1))
    results = {"load_s": load_s, "peak_rss_gb": peak_rss_gb, "weight_bytes": weight_bytes, "cases": []}
    for (flags, batch), r in runs_of.items():
        prefill_s = [p[0] for p in r["prefill"]]
        decode = [batch * (new_tokens - 1) / (f - p) for f, p in zip(r["full"], prefill_s)]
        prefill = [prefill_tokens[batch] / p for p in prefill_s]
        results["cases"].append({
            "flags": flags, "batch": batch,
            "compile_s": warm_up[flags, batch] - statistics.median(r["full"]),
            "prefill_tok_s": statistics.median(prefill),
            "of_gemm": statistics.median(gemm_flops[batch] / p / (g * 1e9) for p, g in zip(prefill_s, r["gemm"])),
            "first_token_s": statistics.median(p[1] for p in r["prefill"]),
            "decode_tok_s": [statistics.median(decode), min(decode), max(decode)],
            # tokens/s over the ceiling of this run: batch * (bandwidth / weight bytes) tokens/s
            "of_bandwidth": statistics.median(d / (batch * bw * 1e9 / weight_bytes)
                                              for d, bw in zip(decode, r["bandwidth"])),
            "bandwidth_gb_s": statistics.median(r["bandwidth"]),
            "gemm_gflop_s": statistics.median(r["gemm"]),
        })
    print(json.dumps(results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M", "355M"])
    parser.add_argument("--flags", nargs="+", default=["greedy", "top_k=40", "top_p=0.9"], choices=FLAG_SETS,
                        help="how tokens are chosen")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="new tokens")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=GENERATION_DTYPES)
    parser.add_argument("--distinct", action="store_true", help="a prompt of its own for each row of a batch")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short runs: checks the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.flags, args.batches, args.prompt, args.new, args.runs, args.dtype,
                      args.distinct)

    from gpt2.testing import make_model_folder

    if args.tiny:
        args.models, args.prompt, args.new, args.runs = ["tiny"], 32, 64, 2
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, median of {args.runs} runs (min-max); "
          f"random weights of the real shapes, {args.dtype}\n")
    rows = []
    for name in args.models:
        model_dir = os.path.join(args.models_dir, name)
        if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
            print(f"making {model_dir} (once) ...", flush=True)
            make_model_folder(model_dir, None if name == "tiny" else name)
        out = subprocess.run([sys.executable, __file__, "--worker", model_dir, "--prompt", str(args.prompt),
                              "--new", str(args.new), "--runs", str(args.runs), "--dtype", args.dtype,
                              "--flags", *args.flags, "--batches", *map(str, args.batches)]
                             + ["--distinct"] * args.distinct,
                             capture_output=True, text=True,
                             # compile s: compiled, not read from disk (int8: see above)
                             env=os.environ if args.dtype == "int8" else {**os.environ, "GPT2_XLA_CACHE": "off"})
        if out.returncode:
            sys.exit(f"{name}: the measurement failed:\n{out.stderr}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        weight_bytes = result["weight_bytes"]
        print(f"{name}: {weight_bytes / 1e9:.2f} GB of {args.dtype} weights; load {result['load_s']:.1f} s, "
              f"peak memory {result['peak_rss_gb']:.2f} GB ({result['peak_rss_gb'] * 1e9 / weight_bytes:.2f}x "
              f"the weights)")
        for r in result["cases"]:
            median, low, high = r["decode_tok_s"]
            prompts = "one per row" if args.distinct and r["batch"] > 1 else "one"
            rows.append(f"| {name} | {args.dtype} | {r['flags']} | {r['batch']} | {prompts} | {r['compile_s']:.1f} | "
                        f"{r['prefill_tok_s']:.0f} ({r['of_gemm']:.0%} of GEMM) | {median:.1f} ({low:.1f}-{high:.1f}) | "
                        f"{r['of_bandwidth']:.0%} | {r['first_token_s']:.2f} | {r['bandwidth_gb_s']:.1f} GB/s, "
                        f"{r['gemm_gflop_s']:.0f} GFLOP/s |")
    print("\n| model | dtype | flags | batch | prompts | compile s | prefill tokens/s | decode tokens/s "
          "| of bandwidth ceiling | first token s | machine (median) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
