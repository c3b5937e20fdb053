#!/usr/bin/env python3
"""Speed of GPT-2 sampling on this machine, on random weights of the real shapes.

    python benchmarks/generate.py                 # 124M and 355M, batch 1 and 8
    python benchmarks/generate.py --models 1558M  # any of 124M 355M 774M 1558M
    python benchmarks/generate.py --tiny          # a tiny model, to check that the script runs

For each model it prints: load time, compile time, prefill tokens/s for a 512-token prompt,
decode tokens/s for 256 new tokens (median of --runs runs after a warm-up, with min and max),
first-token latency and peak resident memory. Each model runs in its own process, so that its
peak memory is its own. The same run measures the machine: its memory bandwidth (a NumPy float32
matrix-vector product over as many bytes as the model's parameters, at most 2 GiB) and its
float32 GEMM rate; decode rates are shown as a fraction of the bandwidth ceiling (every weight is
read once per step), prefill rates as a fraction of the GEMM rate. Speed does not depend on the
weights' values, so random ones measure it. The model folders are made once, in --models_dir.
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

HERE = os.path.dirname(os.path.abspath(__file__))


def parameter_count(hparams):
    from gpt2.checkpoint import variable_shapes
    return sum(int(np.prod(shape)) for shape in variable_shapes(hparams).values())


def median_seconds(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_bandwidth(n_bytes):
    """GB/s of a float32 matrix-vector product over n_bytes of matrix (capped at 2 GiB)."""
    matrix = np.ones((min(n_bytes, 2 << 30) // 4 // 4096, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    return matrix.nbytes / median_seconds(lambda: matrix @ vector) / 1e9


def machine_gemm(n=2048):
    """GFLOP/s of a float32 n x n matrix product."""
    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    return 2 * n ** 3 / median_seconds(lambda: a @ b) / 1e9


def prefill_flops(hparams, n_tokens):
    """Multiply-adds x 2 of one pass over n_tokens: the weight matrices, then attention's two products."""
    weights = parameter_count(hparams) - hparams.n_vocab * hparams.n_embd - hparams.n_ctx * hparams.n_embd
    return 2 * weights * n_tokens + 4 * hparams.n_layer * n_tokens ** 2 * hparams.n_embd


def worker(model_dir, batches, prompt_len, new_tokens, runs):
    """Measure one model in this process; print a JSON line with the numbers."""
    from gpt2 import GPT2
    from gpt2.sample import sample_chunks

    start = time.perf_counter()
    model = GPT2.from_folder(model_dir)
    load_s = time.perf_counter() - start
    prompt = np.random.default_rng(0).integers(0, model.hparams.n_vocab, prompt_len).tolist()
    results = {"load_s": load_s, "batches": {}}
    for batch in batches:
        def timed(length):
            start, first = time.perf_counter(), None
            for chunk in sample_chunks(model.params, model.hparams, [prompt] * batch, length, seed=1):
                first = first or time.perf_counter() - start
            return time.perf_counter() - start, first

        first_full, _ = timed(new_tokens)  # compiles the decoding loop and traces the prefill
        timed(1)
        full = [timed(new_tokens)[0] for _ in range(runs)]
        prefill = [timed(1) for _ in range(runs)]
        prefill_s = statistics.median(p[0] for p in prefill)
        decode = [batch * (new_tokens - 1) / (f - prefill_s) for f in full]
        results["batches"][batch] = {
            "compile_s": first_full - statistics.median(full),
            "prefill_tok_s": batch * prompt_len / prefill_s,
            "first_token_s": statistics.median(p[1] for p in prefill),
            "decode_tok_s": [statistics.median(decode), min(decode), max(decode)],
        }
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M", "355M"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="new tokens")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short runs: checks the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batches, args.prompt, args.new, args.runs)

    from gpt2.checkpoint import OPENAI_HPARAMS, read_hparams
    from gpt2.testing import make_model_folder

    if args.tiny:
        args.models, args.prompt, args.new, args.runs = ["tiny"], 32, 16, 2
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, median of {args.runs} runs (min-max); "
          f"random weights of the real shapes\n")
    rows = []
    for name in args.models:
        model_dir = os.path.join(args.models_dir, name)
        if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
            print(f"making {model_dir} (once) ...", flush=True)
            make_model_folder(model_dir, None if name == "tiny" else name)
        hparams = read_hparams(model_dir) if name == "tiny" else OPENAI_HPARAMS[name]
        param_bytes = 4 * parameter_count(hparams)
        bandwidth, gemm = machine_bandwidth(param_bytes), machine_gemm()
        out = subprocess.run([sys.executable, __file__, "--worker", model_dir, "--prompt", str(args.prompt),
                              "--new", str(args.new), "--runs", str(args.runs),
                              "--batches", *map(str, args.batches)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name}: the measurement failed:\n{out.stderr}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        ceiling = bandwidth * 1e9 / param_bytes
        print(f"{name}: {param_bytes / 1e9:.2f} GB of float32 weights; machine: {bandwidth:.1f} GB/s "
              f"(ceiling {ceiling:.1f} tokens/s at batch 1), GEMM {gemm:.0f} GFLOP/s; "
              f"load {result['load_s']:.1f} s, peak memory {result['peak_rss_gb']:.2f} GB "
              f"({result['peak_rss_gb'] * 1e9 / param_bytes:.2f}x the weights)")
        for batch, r in result["batches"].items():
            median, low, high = r["decode_tok_s"]
            prefill_gflops = prefill_flops(hparams, args.prompt) / args.prompt * r["prefill_tok_s"] / 1e9
            rows.append(f"| {name} | {batch} | {r['compile_s']:.1f} | {r['prefill_tok_s']:.0f} "
                        f"({prefill_gflops / gemm:.0%} of GEMM) | {median:.1f} ({low:.1f}-{high:.1f}) | "
                        f"{median / (int(batch) * ceiling):.0%} | {r['first_token_s']:.2f} |")
    print("\n| model | batch | compile s | prefill tokens/s | decode tokens/s | of bandwidth ceiling "
          "| first token s |\n| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
