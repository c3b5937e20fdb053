#!/usr/bin/env python3
"""Speed and memory of fine-tuning on this machine, on random weights of the real shapes.

    python benchmarks/train.py                                # 124M, sequence 1024 and 256
    python benchmarks/train.py --models 355M --lengths 1024 --optimizer sgd
    python benchmarks/train.py --no_xla                       # the step as a plain TensorFlow graph
    python benchmarks/train.py --strategy mirrored            # through tf.distribute's MirroredStrategy
    python benchmarks/train.py --tiny                         # a tiny model, to check that the script runs
    python benchmarks/train.py --memory --models 124M 355M    # peak memory of one step under each option

Each model and sequence length runs in its own process (its peak memory is its own): a
`gpt2.train.Trainer` takes --steps steps on random tokens after one step that compiles, and the
script prints training tokens/s (median step), the fraction of the machine's float32 GEMM rate
(measured in the same process before the steps) at 3x the forward pass's operations (forward,
then backward for the activations and for the weights), and the process's peak resident memory.

With --memory, each option of the memory ladder (MEMORY_OPTIONS, or those named by --options)
runs in its own process for each model: one step, which compiles and runs, and its peak memory
(the process's peak resident memory; on a GPU, TensorFlow's peak of GPU memory as well). An
option whose weights, gradients and optimizer state alone would not fit the memory available is
not run: its row gives that computed size, marked as an estimate.
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

from machine import forward_flops, machine_gemm, parameter_count  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The memory ladder: each option alone (as flags of this script), then the combinations for the big models.
MEMORY_OPTIONS = {
    "adamw": [],
    "recompute": ["--recompute"],
    "bfloat16": ["--dtype", "bfloat16"],
    "sgd": ["--optimizer", "sgd"],
    "adafactor": ["--optimizer", "adafactor"],
    "only_train_transformer_layers": ["--only_train_transformer_layers"],
    "lora_rank 8": ["--lora_rank", "8"],
    "recompute, bfloat16, adafactor": ["--recompute", "--dtype", "bfloat16", "--optimizer", "adafactor"],
    "recompute, bfloat16, lora_rank 8": ["--recompute", "--dtype", "bfloat16", "--lora_rank", "8"],
    "recompute, lora_rank 8": ["--recompute", "--lora_rank", "8"],  # on CPUs, where bfloat16 takes more memory
}


def state_bytes(hparams, args):
    """Bytes of the weights (float32), the trained ones' gradients and optimizer state, and the
    bfloat16 copy of the weights: what training holds before activations (computed, not measured)."""
    n = parameter_count(hparams)
    embeddings = (hparams.n_vocab + hparams.n_ctx + 2) * hparams.n_embd  # wte, wpe, ln_f
    trained = n - embeddings if args.only_train_transformer_layers else n
    if args.lora_rank:  # lora_a [n_in, r] and lora_b [r, n_out] for c_attn, c_proj, c_fc, mlp c_proj
        e = hparams.n_embd
        trained = hparams.n_layer * args.lora_rank * ((e + 3 * e) + (e + e) + (e + 4 * e) + (4 * e + e))
        n += trained
    slots = {"adamw": 8, "adam": 8, "sgd": 0, "adafactor": 0}[args.optimizer]  # adafactor's are a row and a column
    return 4 * n + (4 + slots) * trained + (2 * n if args.dtype != "float32" else 0)


def worker(model_dir, args):
    import tensorflow as tf

    from gpt2.weights import load_params
    from gpt2.folders import read_hparams
    from gpt2.train import Hyper, Memory, Trainer

    length, batch_size, steps, xla = args.lengths[0], args.batch_size, args.steps, not args.no_xla
    hparams = read_hparams(model_dir)
    memory = Memory(args.recompute, args.dtype, args.only_train_transformer_layers, args.lora_rank)
    # MirroredStrategy over this machine's devices (one CPU here): what the strategy's path costs a step.
    strategy = tf.distribute.MirroredStrategy() if args.strategy == "mirrored" else None
    trainer = Trainer(load_params(model_dir, hparams), hparams, Hyper(args.optimizer), learning_rate=1e-4,
                      memory=memory, strategy=strategy)
    if not xla:
        trainer._train = tf.function(trainer._train_step)
    batch = np.random.default_rng(0).integers(0, hparams.n_vocab, (1, batch_size, length + 1)).astype(np.int32)
    start = time.perf_counter()
    trainer.train_step(batch)
    first = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if args.memory:
        gpus = tf.config.list_logical_devices("GPU")
        gpu_gb = tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 1e9 if gpus else None
        print(json.dumps(dict(peak_gb=peak_gb, gpu_gb=gpu_gb, first_s=first)))
        return
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


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 256])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no_xla", action="store_true", help="compile the step as a plain graph instead of XLA")
    parser.add_argument("--strategy", choices=["one", "mirrored"], default="one",
                        help="mirrored: the step through tf.distribute.MirroredStrategy (a plain graph, as with "
                             "several replicas), on all of this machine's devices")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short steps: checks the script")
    parser.add_argument("--memory", action="store_true", help="peak memory of one step under each option")
    parser.add_argument("--options", nargs="+", choices=list(MEMORY_OPTIONS), default=list(MEMORY_OPTIONS),
                        help="with --memory: these options only")
    # The memory ladder, as gpt2.finetune's arguments: for the speed table, or one option's worker.
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--only_train_transformer_layers", action="store_true")
    parser.add_argument("--lora_rank", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def ladder_flags(args):
    """The memory ladder's flags that give `args`' settings."""
    flags = ["--optimizer", args.optimizer, "--dtype", args.dtype, "--lora_rank", str(args.lora_rank)]
    frozen = ["--only_train_transformer_layers"] * args.only_train_transformer_layers
    return flags + ["--recompute"] * args.recompute + frozen


def main():
    args = make_parser().parse_args()
    if args.worker:
        return worker(args.worker, args)
    if args.tiny:
        args.models, args.lengths, args.steps = ["tiny"], [64], 2
    if args.memory:
        return memory_table(args)
    print(f"batch size {args.batch_size}, {' '.join(ladder_flags(args))}, {'plain graph' if args.no_xla or args.strategy == 'mirrored' else 'XLA'}, "
          f"strategy {args.strategy}, "
          f"median of {args.steps} steps after the first; random weights of the real shapes\n")
    print("| model | sequence | tokens/s | of GEMM (3x forward) | first step s | peak memory | machine GEMM |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model_dir = model_folder(args.models_dir, name)
        for length in args.lengths:
            out = subprocess.run([sys.executable, __file__, "--worker", model_dir, "--lengths", str(length),
                                  "--batch_size", str(args.batch_size), "--steps", str(args.steps), *ladder_flags(args),
                                  "--strategy", args.strategy] + ["--no_xla"] * args.no_xla,
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: the measurement failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {length} | {r['tok_s']:.0f} | {r['of_gemm']:.0%} | {r['first_s']:.1f} | "
                  f"{r['peak_gb']:.2f} GB | {r['gemm']:.0f} GFLOP/s |", flush=True)


def model_folder(models_dir, name):
    from gpt2.testing import make_model_folder

    model_dir = os.path.join(models_dir, name)
    if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
        make_model_folder(model_dir, None if name == "tiny" else name)
    return model_dir


def memory_table(args):
    from gpt2.api import available_memory
    from gpt2.folders import OPENAI_HPARAMS, read_hparams

    length = args.lengths[0]
    print(f"batch size {args.batch_size}, sequence {length}, one step (it compiles, then runs); random weights of "
          f"the real shapes; {available_memory() / 1e9:.1f} GB available at the start\n")
    print("| model | options | weights, gradients, optimizer state (computed) | peak memory | GPU peak "
          "| first step s (compiles) |\n| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        hparams = OPENAI_HPARAMS.get(name) or read_hparams(model_folder(args.models_dir, name))
        for option in args.options:
            flags = MEMORY_OPTIONS[option]
            state_gb = state_bytes(hparams, make_parser().parse_args(flags)) / 1e9
            room = available_memory() / 1e9
            if state_gb > room:
                print(f"| {name} | {option} | {state_gb:.1f} GB | not run: over the {room:.1f} GB available "
                      f"(estimate: {state_gb:.1f} GB and activations) | | |", flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", model_folder(args.models_dir, name), "--memory",
                                  "--lengths", str(length), "--batch_size", str(args.batch_size), "--steps", "0",
                                  *flags], capture_output=True, text=True)
            if out.returncode:  # out of memory, as a rule: the row says so and the table goes on
                last = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
                print(f"| {name} | {option} | {state_gb:.2f} GB | failed (exit status {out.returncode}: {last}) | | |",
                      flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gpu = f"{r['gpu_gb']:.2f} GB" if r["gpu_gb"] is not None else "no GPU"
            print(f"| {name} | {option} | {state_gb:.2f} GB | {r['peak_gb']:.2f} GB | {gpu} | {r['first_s']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
