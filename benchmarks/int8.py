#!/usr/bin/env python3
"""What int8 weights (gpt2.int8) cost in accuracy, against the float32 model, on random weights of the real shapes.

    python benchmarks/int8.py                  # 124M
    python benchmarks/int8.py --models 355M 1558M
    python benchmarks/int8.py --tiny           # a tiny model, to check that the script runs

For each model: a random prompt runs through both models, then float32's greedy continuation is
fed to both, token by token (so both always see the same tokens). At each position it prints how
far the int8 logits are from float32's, as the largest difference over the float32 logits'
standard deviation (median and worst over the positions), and in how many positions both pick
the same greedy token. Random weights give logits with less structure than trained ones, so
read these as the quantization's size, not as a text-quality measure.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def compare(model_dir, prompt_len, steps):
    """(relative logit errors, greedy agreements) over the steps, for one model folder."""
    from gpt2 import GPT2  # first: TensorFlow starts quietly
    from gpt2.engine import Request, Settings
    from gpt2.model import forward, logits
    from gpt2.testing import sample

    import tensorflow as tf

    float32 = GPT2.from_folder(model_dir)
    int8 = GPT2.from_folder(model_dir, "int8")
    hparams = float32.hparams
    prompt = np.random.default_rng(0).integers(0, hparams.n_vocab, prompt_len).tolist()
    tokens = prompt + sample(float32.engine(1), [prompt], steps, temperature=0)[0]
    want = logits(float32.params, forward(float32.params, hparams, tf.constant([tokens])))[0].numpy()
    # int8's logits after the prompt, then after each of float32's tokens, fed straight into its engine.
    engine = int8.engine(1, prompt[:-1])
    engine.admit([Request(prompt, steps, Settings())])
    live = np.ones(1, bool)
    got = [engine.forward(np.array(tokens[pos:pos + 1], np.int32), np.array([pos - len(engine.prefix)], np.int32),
                          live)[0] for pos in range(prompt_len - 1, prompt_len + steps - 1)]
    want = want[prompt_len - 1:prompt_len + steps - 1]
    errors = [np.abs(g - w).max() / w.std() for g, w in zip(got, want)]
    agree = [g.argmax() == w.argmax() for g, w in zip(got, want)]
    return errors, agree


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M"])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=128, help="positions compared after the prompt's last")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script")
    args = parser.parse_args()

    from gpt2.testing import make_model_folder

    if args.tiny:
        args.models, args.prompt, args.steps = ["tiny"], 8, 16
    print(f"prompt {args.prompt} random tokens, then float32's {args.steps} greedy tokens fed to both models\n")
    print("| model | logit error / spread, median | worst | same greedy token |\n| --- | --- | --- | --- |")
    for name in args.models:
        model_dir = os.path.join(args.models_dir, name)
        if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
            make_model_folder(model_dir, None if name == "tiny" else name)
        errors, agree = compare(model_dir, args.prompt, args.steps)
        print(f"| {name} | {statistics.median(errors):.2%} | {max(errors):.2%} | {sum(agree)} of {len(agree)} "
              f"({np.mean(agree):.1%}) |", flush=True)


if __name__ == "__main__":
    main()
