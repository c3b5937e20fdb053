#!/usr/bin/env python3
"""int8 and float32 sampling speed against llama.cpp's q8_0 and f32 weights (llama-cpp-python), in one run.

    python benchmarks/against_llama_cpp.py --llama_python /tmp/llamavenv/bin/python --gguf 124M-q8_0.gguf \
        --gguf_f32 124M-f32.gguf

llama-cpp-python is not this project's requirement: install it in a virtual environment of its own
(`pip install llama-cpp-python` builds llama.cpp for this processor) and name its Python with
--llama_python. --gguf is the same weights in llama.cpp's format: made from the transformers folder
that benchmarks/against_transformers.py writes (models/124M-transformers, with "n_ctx" added to
its config.json) by llama.cpp's convert_hf_to_gguf.py with `--outtype q8_0` (and `--outtype f32`
for --gguf_f32, which adds float32 against llama.cpp's f32 rows); the factory's
vocabulary is not GPT-2's, so that script does not recognize its pre-tokenizer and has to be told
it is GPT-2's (its get_vocab_base_pre returning "gpt-2"). Tokenizing plays no part here: both
engines start from the token <|endoftext|> alone.

Both engines make --new tokens at batch 1 (llama-cpp-python samples one sequence), for each flag
set: one untimed call, then the median of --runs timed calls; ours is
`gpt2.load(..., dtype="int8").generate(..., ignore_eot=True)` (and dtype float32) on the same random weights of
124M's shapes (models/124M), llama.cpp's is `Llama.generate` with the same top_k / top_p /
temperature and its other rules off (min_p 0, no repetition penalty). Each engine runs in its own
process, the engines take turns for --rounds rounds, and before each turn the machine's memory
bandwidth is measured (see machine.py); the table shows each engine's tokens/s and its share of
its ceiling: that bandwidth over its weights' bytes (int8: one byte per weight; q8_0: 34 bytes per
32 weights; float32 and f32: four).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from machine import machine_bandwidth, median_seconds, parameter_count  # noqa: E402

END_OF_TEXT = 50256
FLAG_SETS = {"greedy": dict(temperature=0), "top_k=40": dict(top_k=40), "top_p=0.9": dict(top_p=0.9)}


def ours(args, dtype):
    from gpt2 import GPT2

    model = GPT2.from_folder(os.path.join(args.models_dir, "124M"), dtype)
    return {flags: args.new / median_seconds(
        lambda: model.generate("", args.new, seed=1, ignore_eot=True, **FLAG_SETS[flags]), args.runs)
        for flags in args.flags}


def llama_cpp(args, gguf):
    from llama_cpp import Llama

    model = Llama(model_path=gguf, n_ctx=args.new + 16, n_threads=len(os.sched_getaffinity(0)), seed=1,
                  verbose=False)
    their_flags = {"greedy": dict(temp=0.0), "top_k=40": dict(temp=1.0, top_k=40, top_p=1.0),
                   "top_p=0.9": dict(temp=1.0, top_k=0, top_p=0.9)}

    def generate(flags):
        for made, _ in enumerate(model.generate([END_OF_TEXT], min_p=0.0, repeat_penalty=1.0, reset=True,
                                                **their_flags[flags]), 1):
            if made == args.new:  # Llama.generate goes on past the end-of-text token
                return

    return {flags: args.new / median_seconds(lambda: generate(flags), args.runs) for flags in args.flags}


# name -> (what it measures, given the arguments; bytes per weight)
ENGINES = {"ours, int8": (lambda args: ours(args, "int8"), 1),
           "llama.cpp, q8_0": (lambda args: llama_cpp(args, args.gguf), 34 / 32),
           "ours, float32": (lambda args: ours(args, "float32"), 4),
           "llama.cpp, f32": (lambda args: llama_cpp(args, args.gguf_f32), 4)}
PAIRS = [("ours, int8", "llama.cpp, q8_0"), ("ours, float32", "llama.cpp, f32")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama_python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--gguf", required=True, help="124M's random weights as a q8_0 GGUF file (see above)")
    parser.add_argument("--gguf_f32", help="the same as an f32 GGUF file: adds float32 against llama.cpp's f32")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--flags", nargs="+", default=list(FLAG_SETS), choices=FLAG_SETS)
    parser.add_argument("--new", type=int, default=256, help="new tokens")
    parser.add_argument("--runs", type=int, default=2, help="timed calls per engine and flag set, each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(ENGINES[args.worker][0](args)))
        return

    model_dir = os.path.join(args.models_dir, "124M")
    if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
        from gpt2.testing import make_model_folder
        print(f"making {model_dir} (once) ...", flush=True)
        make_model_folder(model_dir, "124M")
    from gpt2.folders import read_hparams

    weights = parameter_count(read_hparams(model_dir))
    pairs = PAIRS if args.gguf_f32 else PAIRS[:1]
    engines = [engine for pair in pairs for engine in pair]
    rates = {engine: {} for engine in engines}  # engine -> flags -> [tokens/s per round]
    shares = {engine: {} for engine in engines}  # the same, over each turn's ceiling
    bandwidths = []
    for round_number in range(args.rounds):
        for engine in engines:
            bandwidths.append(machine_bandwidth(500 << 20))
            python = args.llama_python if engine.startswith("llama") else sys.executable
            out = subprocess.run([python, __file__, "--worker", engine, "--llama_python", args.llama_python,
                                  "--gguf", args.gguf, *(["--gguf_f32", args.gguf_f32] if args.gguf_f32 else []),
                                  "--models_dir", args.models_dir, "--flags", *args.flags,
                                  "--new", str(args.new), "--runs", str(args.runs)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{engine}: the measurement failed:\n{out.stderr}")
            for flags, rate in json.loads(out.stdout.strip().splitlines()[-1]).items():
                rates[engine].setdefault(flags, []).append(rate)
                shares[engine].setdefault(flags, []).append(rate / (bandwidths[-1] * 1e9 / (weights * ENGINES[engine][1])))
            print(f"round {round_number + 1}, {engine}: " + ", ".join(
                f"{flags} {r[-1]:.1f}" for flags, r in rates[engine].items()), flush=True)
    print(f"\n124M, random weights, batch 1, {args.new} new tokens from <|endoftext|>, tokens/s (share of the "
          f"engine's ceiling): median over {args.rounds} rounds of each round's median of {args.runs} calls; machine: "
          f"{statistics.median(bandwidths):.1f} GB/s (median)\n")
    print("| flags | " + " | ".join(engines) + " | " + " | ".join(f"{ours} / {theirs}" for ours, theirs in pairs)
          + " |\n|" + " --- |" * (1 + len(engines) + len(pairs)))
    for flags in args.flags:
        rate = {engine: statistics.median(rates[engine][flags]) for engine in engines}
        print(f"| {flags} | " + " | ".join(f"{rate[e]:.1f} ({statistics.median(shares[e][flags]):.0%})" for e in engines)
              + " | " + " | ".join(f"{rate[ours] / rate[theirs]:.2f}x" for ours, theirs in pairs) + " |")


if __name__ == "__main__":
    main()
