#!/usr/bin/env python3
"""Speed of pipeline.py (Apache Beam's local runner) against score.py and generate_unconditional.py on the same work.

    python benchmarks/pipeline.py                   # 124M: 2,000 documents, 64 samples
    python benchmarks/pipeline.py --documents 400 --workers 1 2
    python benchmarks/pipeline.py --tiny            # a tiny model and a small corpus: checks the script

Scoring: a corpus of documents of mixed lengths (English sentences, lengths drawn from a
log-normal from a few tokens to twice the context), scored by `score.py` (each document a file)
and by `pipeline.py score` (one .jsonl) with 1 and 2 worker processes (Beam's direct runner,
multi_processing). Generation: unconditional samples of --length tokens by
`generate_unconditional.py --batch_size B` and by `pipeline.py generate` (a prompt record per
sample). Each command runs whole, as a user runs it: start-up (TensorFlow, Beam's workers) and
XLA compilation (from the compilation cache once warm: one untimed run of each first) included.
Prints tokens (samples) per second and each pipeline's rate as a fraction of the plain command's.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))


def write_corpus(folder, encoder, n_documents, n_ctx, seed=0):
    """n_documents of mixed lengths as folder/corpus.jsonl and as folder/files/<i>.txt; returns their tokens."""
    from gpt2.testing import SAMPLE_TEXT

    sentences = [s.strip() + "." for s in SAMPLE_TEXT.replace("\n", " ").split(".") if s.strip()]
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(n_ctx / 3), 1.0, n_documents), 8, 2 * n_ctx).astype(int)
    os.makedirs(os.path.join(folder, "files"))
    tokens = 0
    with open(os.path.join(folder, "corpus.jsonl"), "w", encoding="utf-8") as corpus:
        for i, length in enumerate(lengths):
            text, n = "", 0
            while n < length:
                text += " " + sentences[rng.integers(len(sentences))]
                n = len(encoder.encode(text))
            tokens += n
            corpus.write(json.dumps({"id": str(i), "text": text}) + "\n")
            with open(os.path.join(folder, "files", f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
    return tokens


def timed(command):
    """Seconds that `command` took (it must succeed)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])}... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="124M")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=128, help="new tokens per sample")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a small corpus: checks the script")
    args = parser.parse_args()

    from gpt2.encoder import read_encoder
    from gpt2.folders import read_hparams
    from gpt2.testing import make_model_folder

    if args.tiny:
        args.model_name, args.documents, args.samples, args.length, args.workers = "tiny", 20, 8, 16, [1]
    model_dir = os.path.join(args.models_dir, args.model_name)
    if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
        make_model_folder(model_dir, None if args.model_name == "tiny" else args.model_name)
    hparams = read_hparams(model_dir)
    model = ["--model_name", args.model_name, "--models_dir", args.models_dir, "--batch_size", str(args.batch_size)]
    python = sys.executable
    with tempfile.TemporaryDirectory() as work:
        tokens = write_corpus(work, read_encoder(model_dir), args.documents, hparams.n_ctx)
        files = sorted(os.path.join(work, "files", name) for name in os.listdir(os.path.join(work, "files")))
        with open(os.path.join(work, "prompts.jsonl"), "w") as f:
            f.writelines(json.dumps({"prompt": "", "seed": 1, "first_sample": i}) + "\n" for i in range(args.samples))
        score_py = [python, os.path.join(ROOT, "score.py"), *files, *model]
        unconditional = [python, os.path.join(ROOT, "generate_unconditional.py"), "--nsamples", str(args.samples),
                         "--length", str(args.length), "--seed", "1", "--output", os.path.join(work, "u.jsonl"),
                         *model]

        def pipeline(task, workers):
            runner = [] if workers == 1 else ["--direct_num_workers", str(workers),
                                              "--direct_running_mode", "multi_processing"]
            source = "corpus.jsonl" if task == "score" else "prompts.jsonl"
            return [python, os.path.join(ROOT, "pipeline.py"), task, "--input", os.path.join(work, source),
                    "--output", os.path.join(work, "out", f"{task}-{workers}"), "--length", str(args.length),
                    *model, *runner]

        for command in () if args.tiny else (score_py, unconditional, pipeline("score", 1), pipeline("generate", 1)):
            timed(command)  # compiles (or fills the compilation cache), untimed
        print(f"{args.model_name}, {args.documents} documents ({tokens} tokens, 8 to {2 * hparams.n_ctx} each), "
              f"{args.samples} samples of {args.length} tokens, batch size {args.batch_size}; each command whole, "
              f"start-up included; {os.cpu_count()} cores\n")
        print("| work | command | seconds | rate | of the plain command |\n| --- | --- | --- | --- | --- |")
        for task, plain_command, label, amount, unit in (
                ("score", score_py, "score.py (a file per document)", tokens, "{:.0f} tokens/s"),
                ("generate", unconditional, "generate_unconditional.py", args.samples, "{:.2f} samples/s")):
            plain = timed(plain_command)
            print(f"| {task} | {label} | {plain:.1f} | {unit.format(amount / plain)} | 100% |", flush=True)
            for workers in args.workers:
                seconds = timed(pipeline(task, workers))
                print(f"| {task} | pipeline.py, {workers} worker process{'es' if workers > 1 else ''} | {seconds:.1f} | "
                      f"{unit.format(amount / seconds)} | {plain / seconds:.0%} |", flush=True)
                if task == "generate":
                    same_samples(os.path.join(work, "u.jsonl"), os.path.join(work, "out", f"generate-{workers}"))


def same_samples(unconditional, prefix):
    """Exit unless the pipeline made the texts that generate_unconditional.py made (the same seed and numbers)."""
    with open(unconditional, encoding="utf-8") as f:
        wanted = {r["sample_index"]: r["text"] for r in map(json.loads, f)}
    made = {}
    for path in glob.glob(prefix + "-*-of-*.jsonl"):
        with open(path, encoding="utf-8") as f:
            made.update((r["sample_index"], r["text"]) for r in map(json.loads, f))
    if made != wanted:
        sys.exit(f"pipeline.py made other samples than generate_unconditional.py ({prefix})")


if __name__ == "__main__":
    main()
