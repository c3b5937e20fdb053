#!/usr/bin/env python3
"""Encoding throughput of gpt2.encoder against tiktoken on the same vocabulary and text.

Usage: python benchmarks/encoder.py [--megabytes 4] [--repeats 5]
The text is Python's own standard library sources (varied English, code, whitespace runs); the
vocabulary is a factory-made one of GPT-2's size (50257 tokens), in OpenAI's file formats.
"""
import argparse
import glob
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import tiktoken  # noqa: E402

from gpt2.encoder import END_OF_TEXT, PATTERN, Encoder, bytes_to_unicode  # noqa: E402
from gpt2.testing import make_vocab  # noqa: E402


def corpus(megabytes):
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        size += len(parts[-1].encode())
        if size >= megabytes * 2 ** 20:
            break
    return "".join(parts)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    text = corpus(args.megabytes)
    megabytes = len(text.encode()) / 2 ** 20
    encoder_json, merges = make_vocab(50257)
    ours = Encoder(encoder_json, merges)

    # tiktoken on its own, built from the same merges as tiktoken's own gpt2 loader builds it.
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder_json.items() if token != END_OF_TEXT}
    reference = tiktoken.Encoding("reference", pat_str=PATTERN, mergeable_ranks=ranks,
                                  special_tokens={END_OF_TEXT: encoder_json[END_OF_TEXT]})

    assert ours.encode(text) == reference.encode_ordinary(text)
    ours_median, ours_min = best_of(lambda: ours.encode(text), args.repeats)
    ref_median, ref_min = best_of(lambda: reference.encode_ordinary(text), args.repeats)
    n_tokens = len(ours.encode(text))
    print(f"text: {megabytes:.2f} MB, {n_tokens} tokens; median of {args.repeats} runs (best in brackets)")
    print(f"gpt2.encoder : {megabytes / ours_median:6.2f} MB/s ({megabytes / ours_min:.2f})")
    print(f"tiktoken     : {megabytes / ref_median:6.2f} MB/s ({megabytes / ref_min:.2f})")
    print(f"ratio        : {ref_median / ours_median:6.1%} of tiktoken's throughput")


if __name__ == "__main__":
    main()
