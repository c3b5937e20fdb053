#!/usr/bin/env python3
"""What int8 weights (gpt2.int8) cost in accuracy, against the float32 model, on random weights of the real shapes.

    python benchmarks/int8.py                  # 124M
    python benchmarks/int8.py --models 355M 1558M
    python benchmarks/int8.py --tiny           # a tiny model, to check that the script runs
    python benchmarks/int8.py --interpreters   # LiteRT's interpreter against TensorFlow's, per step

For each model: a random prompt runs through both models, then float32's greedy continuation is
fed to both, token by token (so both always see the same tokens). At each position it prints how
far the int8 logits are from float32's, as the largest difference over the float32 logits'
standard deviation (median and worst over the positions), and in how many positions both pick
the same greedy token. Random weights give logits with less structure than trained ones, so
read these as the quantization's size, not as a text-quality measure.

--interpreters: the same stored programs (124M's int8, batch 1) run in one process by the two
interpreters that can run them: LiteRT's (the ai-edge-litert package, which gpt2.int8 uses: it
needs no TensorFlow) and TensorFlow's own tf.lite.Interpreter. They take turns for --rounds
rounds; each turn times --steps steps after a 16-token prompt, each step split into the 12 block
programs, the output layer's programs and the rest (choosing the token with top_k 40, Python).
Printed: the medians of the turns' mean milliseconds per step.
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


def interpreters(model_dir, steps, rounds):
    """Milliseconds per step (blocks, output layer, rest) of LiteRT's and TensorFlow's interpreters, taking turns."""
    import time
    import tensorflow as tf
    from gpt2 import GPT2, int8
    from gpt2.engine import Request, Settings
    from gpt2.folders import read_hparams

    GPT2.from_folder(model_dir, "int8")  # stores the programs, if not yet
    hparams = read_hparams(model_dir)
    folder = int8.stored_folder(model_dir, hparams)
    models = {"ai-edge-litert": int8.open_stored(folder, hparams)}
    int8.Interpreter = tf.lite.Interpreter
    models["tf.lite.Interpreter"] = int8.open_stored(folder, hparams)
    prompt = np.random.default_rng(0).integers(0, hparams.n_vocab, 16).tolist()

    def turn(model):
        engine = int8.Int8Engine(model, 1)
        engine.admit([Request(prompt, steps + 1, Settings(top_k=40, seed=1))])
        times = {"blocks": 0.0, "output layer": 0.0, "step": 0.0}
        for block in model.blocks:  # time each program's run
            block.run = timed(block.run, times, "blocks")
        for piece in model.head:
            piece.run = timed(piece.run, times, "output layer")
        start = time.perf_counter()
        engine.step(steps)
        times["step"] = time.perf_counter() - start
        for program in model.blocks + model.head:
            del program.run
        return {part: seconds / steps * 1e3 for part, seconds in times.items()}

    per_turn = {name: [] for name in models}
    for name, model in models.items():
        turn(model)  # untimed: first resizes
    for _ in range(rounds):
        for name, model in models.items():
            per_turn[name].append(turn(model))
    print(f"124M int8, batch 1, top_k 40, {steps} steps after a 16-token prompt; ms per step, median of {rounds} "
          "turns each\n")
    print("| interpreter | blocks | output layer | rest | step | steps/s |\n| --- | --- | --- | --- | --- | --- |")
    for name, turns in per_turn.items():
        ms = {part: statistics.median(t[part] for t in turns) for part in turns[0]}
        print(f"| {name} | {ms['blocks']:.2f} | {ms['output layer']:.2f} | "
              f"{ms['step'] - ms['blocks'] - ms['output layer']:.2f} | {ms['step']:.2f} | {1e3 / ms['step']:.1f} |")


def timed(run, times, part):
    import time

    def run_timed(**inputs):
        start = time.perf_counter()
        out = run(**inputs)
        times[part] += time.perf_counter() - start
        return out
    return run_timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["124M"])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=128, help="positions compared after the prompt's last")
    parser.add_argument("--models_dir", default=os.path.join(HERE, "models"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script")
    parser.add_argument("--interpreters", action="store_true", help="LiteRT's interpreter against TensorFlow's")
    parser.add_argument("--rounds", type=int, default=6, help="--interpreters: turns of each interpreter")
    args = parser.parse_args()

    from gpt2.testing import make_model_folder

    if args.interpreters:
        name = "tiny" if args.tiny else "124M"
        model_dir = os.path.join(args.models_dir, name)
        if not os.path.isfile(os.path.join(model_dir, "vocab.bpe")):
            make_model_folder(model_dir, None if args.tiny else name)
        return interpreters(model_dir, args.steps, 2 if args.tiny else args.rounds)

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
