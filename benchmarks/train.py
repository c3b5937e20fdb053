#!/usr/bin/env python3
"""Speed and memory of fine-tuning on this machine, on random weights of the real shapes.

    python benchmarks/train.py                                # 124M, sequence 1024 and 256
    python benchmarks/train.py --models 355M --lengths 1024 --optimizer sgd
    python benchmarks/train.py --no_xla                       # the step as a plain TensorFlow graph
    python benchmarks/train.py --tiny                         # a tiny model, to check that the script runs

Each model and sequence length runs in its own process (its peak memory is its own): a
`gpt2.train.Trainer` takes --steps steps on random tokens after one step that compiles, and the
script prints training tokens/s (median step), the fraction of the machine's float32 GEMM rate
(measured in the same process before the steps) at 3x the forward pass's operations (forward,
then backward for the activations and for the weights), and the process's peak resident memory.
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

from machine import forward_flops, machine_gemm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(model_dir, length, batch_size, steps, optimizer, xla):
    import tensorflow as tf

    from gpt2.checkpoint import load_params
    from gpt2.folders import read_hparams
    from gpt2.train import Hyper, Trainer

    hparams = read_hparams(model_dir)
    trainer = Trainer(load_params(model_dir, hparams), hparams, Hyper(optimizer), learning_rate=1e-4)
    if not xla:
        trainer._train = tf.function(trainer._train_step)
    batch = np.random.default_rng(0).integers(0, hparams.n_vocab, (1, batch_size, length + 1)).astype(np.int32)
    start = time.perf_counter()
    trainer.train_step(batch)
    first = time.perf_counter() - start
    gemm = machine_gemm()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batch)
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds)
    flops = 3 * batch_size * (forward_flops(hparams, length) + 2 * length * hparams.n_embd * hparams.n_vocab)
    print(json.dumps(dict(tok_s=batch_size * length / step, of_gemm=flops / step / (gemm * 1e9), first_s=first,
                          gemm=gemm, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 256])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--no_xla", action="store_true", help="compile the step as a plain graph instead of XLA")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short steps: checks the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.lengths[0], args.batch_size, args.steps, args.optimizer, not args.no_xla)

    from gpt2.testing import make_model_folder

    if args.tiny:
        args.models, args.lengths, args.steps = ["tiny"], [64], 2
    print(f"batch size {args.batch_size}, {args.optimizer}, {'plain graph' if args.no_xla else 'XLA'}, median of "
          f"{args.steps} steps after the first; random weights of the real shapes, float32\n")
    print("| model | sequence | tokens/s | of GEMM (3x forward) | first step s | peak memory | machine GEMM |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model_dir = os.path.join(args.models_dir, name)
        if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
            make_model_folder(model_dir, None if name == "tiny" else name)
        for length in args.lengths:
            out = subprocess.run([sys.executable, __file__, "--worker", model_dir, "--lengths", str(length),
                                  "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--optimizer",
                                  args.optimizer] + ["--no_xla"] * args.no_xla, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: the measurement failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {length} | {r['tok_s']:.0f} | {r['of_gemm']:.0%} | {r['first_s']:.1f} | "
                  f"{r['peak_gb']:.2f} GB | {r['gemm']:.0f} GFLOP/s |", flush=True)


if __name__ == "__main__":
    main()
