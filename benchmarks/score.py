#!/usr/bin/env python3
"""Speed of scoring text on this machine, on random weights of the real shapes.

    python benchmarks/score.py                     # 124M, 20,000 tokens, stride 512
    python benchmarks/score.py --models 355M --batch_size 4
    python benchmarks/score.py --tiny              # a tiny model, to check that the script runs

Scores a sequence of random token ids (speed does not depend on the text or the weights' values)
in windows of n_ctx tokens, `stride` apart, as `model.score` does, and prints tokens scored per
second (median of --runs runs after a warm-up) and the fraction of the machine's float32 GEMM rate
(a NumPy matrix product, measured before each run) that the computation reached. The operations
counted are those computed: every window's tokens through the transformer (attention over the whole
window), and the output layer for the tokens each window scores.
"""
import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

from gpt2.arguments import DTYPES  # noqa: E402
from machine import forward_flops, machine_gemm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(model_dir, n_tokens, stride, batch_size, runs, dtype):
    from gpt2 import GPT2
    from gpt2.score import score_tokens, windows

    model = GPT2.from_folder(model_dir, dtype)
    hparams = model.hparams
    tokens = np.random.default_rng(0).integers(0, hparams.n_vocab, n_tokens).tolist()
    eot = model.encoder.eot_token
    flops = sum(forward_flops(hparams, len(window)) + 2 * n * hparams.n_embd * hparams.n_vocab
                for _, window, n in windows([eot] + tokens, hparams.n_ctx, stride))

    def run():
        start = time.perf_counter()
        n = sum(len(scored.logprobs) for scored in score_tokens(model.params, hparams, tokens, eot, stride=stride,
                                                                  batch_size=batch_size))
        assert n == n_tokens
        return time.perf_counter() - start

    warm_up = run()
    seconds, gemm = [], []
    for _ in range(runs):
        gemm.append(machine_gemm())
        seconds.append(run())
    fractions = [flops / s / (g * 1e9) for s, g in zip(seconds, gemm)]
    return dict(warm_up=warm_up, tok_s=[n_tokens / s for s in seconds], of_gemm=statistics.median(fractions),
                gemm=statistics.median(gemm), peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M"])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a short text: checks the script")
    args = parser.parse_args()

    from gpt2.testing import make_model_folder

    if args.tiny:
        args.models, args.tokens, args.stride, args.runs = ["tiny"], 500, 64, 2
    print(f"{args.tokens} tokens, stride {args.stride}, batch size {args.batch_size}, {args.dtype}, median of "
          f"{args.runs} runs (min-max); random weights of the real shapes\n")
    print("| model | tokens/s | of GEMM | first run s | peak memory | machine GEMM |\n| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model_dir = os.path.join(args.models_dir, name)
        if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
            make_model_folder(model_dir, None if name == "tiny" else name)
        r = measure(model_dir, args.tokens, args.stride, args.batch_size, args.runs, args.dtype)
        print(f"| {name} | {statistics.median(r['tok_s']):.0f} ({min(r['tok_s']):.0f}-{max(r['tok_s']):.0f}) | "
              f"{r['of_gemm']:.0%} | {r['warm_up']:.1f} | {r['peak_gb']:.2f} GB | {r['gemm']:.0f} GFLOP/s |",
              flush=True)


if __name__ == "__main__":
    main()
