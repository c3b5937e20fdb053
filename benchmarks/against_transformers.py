#!/usr/bin/env python3
"""This project's sampling speed and start-up against Hugging Face transformers on PyTorch, in one run.

    python benchmarks/against_transformers.py --torch_python /tmp/torchvenv/bin/python
    python benchmarks/against_transformers.py --torch_python ... --parts startup   # or: speed

PyTorch and transformers are not this project's requirements: install them in a virtual
environment of their own and name its Python with --torch_python. Both engines make `--new`
tokens from one <|endoftext|> token, on random weights of 124M's shapes (speed does not depend on
the values), for each flag set (greedy, top_k 40, top_p 0.9) and batch size: one untimed call,
then the median of --runs timed calls, tokens/s counting every row's tokens. Ours goes through
gpt2's Python API (`generate(..., ignore_eot=True)`), transformers through `generate` of a
GPT2LMHeadModel with the same flags and no end-of-text stop. Each engine runs in its own process,
the engines take turns for --rounds rounds, and before each turn the machine's memory bandwidth
and GEMM rate are measured (see machine.py).

Start-up: the time from a command's start to its complete answer of --answer tokens (124M,
top_k 40, one prompt piped in), process start to exit, as a user waits for it, and to the
answer's first text. Ours is generate_interactive.py, in float32 and with --dtype int8;
transformers' is a script that imports torch and transformers, loads the same weights
(converted once into a transformers folder, safetensors) and its tokenizer, and writes the
answer. Ours runs first with an empty cache folder (GPT2_XLA_CACHE: its first run on a machine,
and after each TensorFlow or gpt2 upgrade; int8 then converts and stores its programs), then
twice with the cache that run left (int8: its stored programs, run without TensorFlow); the
engines alternate, --rounds times.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from machine import machine_bandwidth, machine_gemm  # noqa: E402

FLAG_SETS = {"greedy": dict(temperature=0), "top_k=40": dict(top_k=40), "top_p=0.9": dict(top_p=0.9)}
END_OF_TEXT = 50256


def median_rate(generate, batch, new_tokens, runs):
    """tokens/s of `generate()` (the median of `runs` timed calls) and the seconds of its first call."""
    start = time.perf_counter()
    generate()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times), first_s


def ours(model_dir, flag_sets, batches, new_tokens, runs):
    from gpt2 import GPT2

    model = GPT2.from_folder(model_dir)
    return {f"{flags} {batch}": median_rate(
        lambda: model.generate("", new_tokens, nsamples=batch, batch_size=batch, seed=1, ignore_eot=True,
                               **FLAG_SETS[flags]), batch, new_tokens, runs)
        for flags in flag_sets for batch in batches}


def transformers(model_dir, flag_sets, batches, new_tokens, runs):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with open(os.path.join(model_dir, "hparams.json")) as f:
        hparams = json.load(f)
    config = GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                        n_layer=hparams["n_layer"], n_head=hparams["n_head"])
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None  # as ignore_eot: always `new_tokens` tokens
    model.generation_config.pad_token_id = END_OF_TEXT
    their_flags = {"greedy": dict(do_sample=False), "top_k=40": dict(do_sample=True, top_k=40),
                   "top_p=0.9": dict(do_sample=True, top_k=0, top_p=0.9)}

    def generate(flags, batch):
        with torch.inference_mode():
            model.generate(torch.full((batch, 1), END_OF_TEXT), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           **their_flags[flags])

    return {f"{flags} {batch}": median_rate(lambda: generate(flags, batch), batch, new_tokens, runs)
            for flags in flag_sets for batch in batches}


ENGINES = {"ours": ours, "transformers": transformers}
PROMPT = "The meaning of life is"


def transformers_answer(folder, answer_tokens):
    """What the start-up measurement runs with PyTorch: import, load, continue stdin's prompt, print."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = torch.tensor([tokenizer.encode(sys.stdin.read())])
    torch.manual_seed(1)
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=True,
                             top_k=40, pad_token_id=END_OF_TEXT)
    print(tokenizer.decode(out[0, prompt.shape[1]:]))


def make_transformers_folder(model_dir, folder, torch_python):
    """The checkpoint of model_dir as a transformers folder (weights, config, tokenizer files), once."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return
    import numpy as np
    import tensorflow as tf

    # OpenAI's names (model/h0/attn/c_attn/w, [1, n_in, n_out]) as transformers' (transformer.h.0.attn.c_attn.weight)
    checkpoint = os.path.join(model_dir, "model.ckpt")
    weights = {}
    for name, _ in tf.train.list_variables(checkpoint):
        parts = name.split("/")[1:]
        if parts[0].startswith("h"):
            parts[:1] = ["h", parts[0][1:]]
        parts[-1] = {"g": "weight", "b": "bias", "w": "weight"}.get(parts[-1], parts[-1])
        if parts[-1] in ("wte", "wpe"):
            parts.append("weight")
        value = tf.train.load_variable(checkpoint, name)
        weights[".".join(["transformer"] + parts)] = value[0] if name.endswith("/w") else value  # w: [1, n_in, n_out]
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "weights.npz"), **weights)
    subprocess.run([torch_python, __file__, "--worker", "convert", "--torch_python", torch_python,
                    "--models_dir", os.path.dirname(model_dir)], check=True)


def convert(model_dir, folder):
    """In the PyTorch Python: weights.npz (see make_transformers_folder) into a transformers folder."""
    import shutil

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with open(os.path.join(model_dir, "hparams.json")) as f:
        hparams = json.load(f)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"],
                                       n_embd=hparams["n_embd"], n_layer=hparams["n_layer"], n_head=hparams["n_head"]))
    weights = {name: torch.tensor(value) for name, value in np.load(os.path.join(folder, "weights.npz")).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is wte (tied)
        sys.exit(f"the conversion missed {missing} and left {unexpected}")
    model.save_pretrained(folder)
    os.remove(os.path.join(folder, "weights.npz"))
    shutil.copy(os.path.join(model_dir, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copy(os.path.join(model_dir, "vocab.bpe"), os.path.join(folder, "merges.txt"))


def seconds_to_answer(command, env=None):
    """(seconds to the answer's first text, seconds to the exit) of `command` from its start, PROMPT piped in.

    The first text is the first byte after the line "=== SAMPLE 1 ===" where the command prints
    one (ours, which streams the answer), else the whole output (transformers prints it at the end).
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    process.stdin.write(PROMPT.encode())
    process.stdin.close()
    out, first = b"", None
    while piece := os.read(process.stdout.fileno(), 1 << 16):
        out += piece
        banner = out.find(b" SAMPLE 1 ")
        line_end = out.find(b"\n", banner) if banner >= 0 else -1
        if first is None and 0 <= line_end < len(out) - 1:
            first = time.perf_counter() - start
    errors = process.stderr.read().decode()
    process.wait()
    seconds = time.perf_counter() - start
    if process.returncode or not out.strip():
        sys.exit(f"{command[1]} failed:\n{errors}")
    return first or seconds, seconds


STARTUP_CASES = {  # name -> (our --dtype, whether the run starts with an empty cache), or None: transformers
    "ours float32, first run": ("float32", True), "ours float32, later runs": ("float32", False),
    "ours int8, first run": ("int8", True), "ours int8, later runs": ("int8", False), "transformers": None}


def startup(args, model_dir):
    """Start-up seconds per round: ours in float32 and int8, each with an empty cache and then with the
    cache that run left; transformers each time, in turn."""
    folder = os.path.join(args.models_dir, "124M-transformers")
    make_transformers_folder(model_dir, folder, args.torch_python)
    ours = [sys.executable, os.path.join(HERE, "..", "generate_interactive.py"), "--model_name", "124M",
            "--models_dir", args.models_dir, "--length", str(args.answer), "--top_k", "40", "--seed", "1"]
    theirs = [args.torch_python, __file__, "--worker", "answer", "--torch_python", args.torch_python,
              "--models_dir", args.models_dir, "--answer", str(args.answer)]
    times = {case: [] for case in STARTUP_CASES}  # case -> [(first text s, answer s)]
    for round_number in range(args.rounds):
        for dtype in ("float32", "int8"):
            with tempfile.TemporaryDirectory() as cache:
                env = {"GPT2_XLA_CACHE": cache}
                for first_run in (True, False, False):
                    times[f"ours {dtype}, {'first run' if first_run else 'later runs'}"].append(
                        seconds_to_answer(ours + ["--dtype", dtype], env))
                    if not first_run:
                        times["transformers"].append(seconds_to_answer(theirs))
        print(f"round {round_number + 1}: " + ", ".join(f"{k} {v[-1][1]:.2f} s" for k, v in times.items()), flush=True)
    theirs_s = statistics.median(answer for _, answer in times["transformers"])
    print(f"\nFrom the command's start to a complete {args.answer}-token answer (124M, top_k 40, prompt piped in), "
          f"and to its first text, seconds, median of {len(times['transformers'])} runs of transformers and "
          f"{args.rounds} first or {2 * args.rounds} later runs of ours:\n")
    print("| run | first text | answer | transformers' answer | ours / transformers |\n| --- | --- | --- | --- | --- |")
    for case in STARTUP_CASES:
        if case != "transformers":
            first = statistics.median(f for f, _ in times[case])
            mine = statistics.median(answer for _, answer in times[case])
            print(f"| {case.split(', ')[0][5:]}, {case.split(', ')[1]} | {first:.2f} | {mine:.2f} | {theirs_s:.2f} | "
                  f"{mine / theirs_s:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch_python", required=True, help="a Python with torch and transformers installed")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--flags", nargs="+", default=list(FLAG_SETS), choices=FLAG_SETS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new", type=int, default=256, help="new tokens")
    parser.add_argument("--runs", type=int, default=2, help="timed calls per engine, flag set and batch, each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--answer", type=int, default=40, help="tokens of the start-up measurement's answer")
    parser.add_argument("--parts", nargs="+", default=["speed", "startup"], choices=["speed", "startup"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                        help="the speed part's engines (ours alone: run from another checkout, before and after)")
    parser.add_argument("--worker", choices=[*ENGINES, "answer", "convert"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = os.path.join(args.models_dir, "124M")
    if args.worker == "answer":
        return transformers_answer(os.path.join(args.models_dir, "124M-transformers"), args.answer)
    if args.worker == "convert":
        return convert(model_dir, os.path.join(args.models_dir, "124M-transformers"))
    if args.worker:
        print(json.dumps(ENGINES[args.worker](model_dir, args.flags, args.batches, args.new, args.runs)))
        return

    if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
        from gpt2.testing import make_model_folder
        print(f"making {model_dir} (once) ...", flush=True)
        make_model_folder(model_dir, "124M")
    if "startup" in args.parts:
        startup(args, model_dir)
    if "speed" not in args.parts:
        return
    rates = {engine: {} for engine in args.engines}  # engine -> "flags batch" -> [tokens/s per round]
    first_calls = {engine: {} for engine in args.engines}  # the same, seconds of each round's first call
    machine = []
    for round_number in range(args.rounds):
        for engine in args.engines:
            machine.append((machine_bandwidth(500 << 20), machine_gemm()))
            python = args.torch_python if engine == "transformers" else sys.executable
            out = subprocess.run([python, __file__, "--worker", engine, "--torch_python", args.torch_python,
                                  "--models_dir", args.models_dir, "--flags", *args.flags, "--batches",
                                  *map(str, args.batches), "--new", str(args.new), "--runs", str(args.runs)],
                                 capture_output=True, text=True,
                                 env={**os.environ, "GPT2_XLA_CACHE": "off"})  # first calls compile
            if out.returncode:
                sys.exit(f"{engine}: the measurement failed:\n{out.stderr}")
            for case, (rate, first_s) in json.loads(out.stdout.strip().splitlines()[-1]).items():
                rates[engine].setdefault(case, []).append(rate)
                first_calls[engine].setdefault(case, []).append(first_s)
            print(f"round {round_number + 1}, {engine}: " + ", ".join(
                f"{case} {r[-1]:.1f}" for case, r in rates[engine].items()), flush=True)
    print(f"\n124M, random weights, {args.new} new tokens from <|endoftext|>, tokens/s: median over {args.rounds} "
          f"rounds of each round's median of {args.runs} calls; machine: "
          f"{statistics.median(b for b, _ in machine):.1f} GB/s, {statistics.median(g for _, g in machine):.0f} "
          "GFLOP/s (median)\n")
    both = len(args.engines) == 2
    columns = [f"{engine} (first call s)" for engine in args.engines] + ["ours / transformers"] * both
    print("| flags | batch | " + " | ".join(columns) + " |\n|" + " --- |" * (2 + len(columns)))
    for case in rates[args.engines[0]]:
        flags, batch = case.split()
        rate = {engine: statistics.median(rates[engine][case]) for engine in args.engines}
        print(f"| {flags} | {batch} | " + " | ".join(
            f"{rate[engine]:.1f} ({statistics.median(first_calls[engine][case]):.1f})" for engine in args.engines)
              + " |" + (f" {rate['ours'] / rate['transformers']:.2f}x |" if both else ""))


if __name__ == "__main__":
    main()
