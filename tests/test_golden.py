"""Sample i of a seed is the text it has always been: token ids pinned in tests/golden/samples.json.

The file was written by the decoders as they were before the decoding engine (gpt2.decode's
compiled loop and gpt2.int8's step, at commit 41c019f), for a fixed set of models, prompts, seeds,
sample numbers and flags. A change that alters a sample fails here: that is a change of what
users get for their seed, to make on purpose and say, never to paper over by writing the file again.

    python tests/test_golden.py write   # only to pin a new case: it rewrites the whole file
"""
import json
import os
import sys

import pytest

import gpt2
from gpt2.testing import make_model_folder, sample

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "samples.json")

# Two random-weight models: the tests' tiny one (657 tokens: a row of logits is one lane of
# gpt2.sampling's), and one with GPT-2's 50257 tokens (25 lanes, so top_k's few-lanes path runs).
MODELS = {"tiny": dict(seed=0), "wide": dict(seed=1, n_vocab=50257, n_layer=3)}
PROMPTS = ["", "The river ran past the mill", "def greet(name):\n    return 'Hello, ' + name\n" * 3]
FLAGS = [dict(temperature=0), dict(), dict(top_k=40), dict(top_p=0.9), dict(top_k=200),
         dict(top_k=40, top_p=0.9, temperature=0.8), dict(temperature=1.6, top_p=0.95)]
SEEDS = [(7, 0), (2026, 5)]  # (seed, first sample): samples first .. first + NSAMPLES - 1 of the seed
LENGTH = 24
NSAMPLES = 3


def cases():
    """(model name, dtype, prompt, flags, seed, first sample): every combination the file pins."""
    for name in MODELS:
        for dtype in ("float32", "int8"):
            for prompt in PROMPTS:
                for flags in FLAGS:
                    for seed, first in SEEDS:
                        yield name, dtype, prompt, flags, seed, first


def key(name, dtype, prompt, flags, seed, first):
    return json.dumps([name, dtype, prompt, flags, seed, first], sort_keys=True)


def samples(model, prompt, flags, seed, first):
    """The token ids of samples first .. first + NSAMPLES - 1 of `seed`, each cut at <|endoftext|>."""
    context = model.context(prompt, LENGTH)
    engine = model.engine(NSAMPLES, context[:-1])
    return sample(engine, [context] * NSAMPLES, LENGTH, seed=seed, sample=first, stop_token=model.encoder.eot_token,
                  **flags)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden-models")
    return {(name, dtype): load(folder, name, dtype) for name in MODELS for dtype in ("float32", "int8")}


def load(folder, name, dtype):
    model_dir = os.path.join(folder, name)
    if not os.path.isdir(model_dir):
        os.makedirs(model_dir)
        make_model_folder(model_dir, **MODELS[name])
    return gpt2.GPT2.from_folder(model_dir, dtype)


def test_samples_are_the_pinned_tokens(models):
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    assert len(golden) == len(list(cases()))
    differ = []
    for case in cases():
        name, dtype, prompt, flags, seed, first = case
        got = samples(models[name, dtype], prompt, flags, seed, first)
        if got != golden[key(*case)]:
            differ.append(case)
    assert not differ, f"{len(differ)} of {len(golden)} cases differ, first: {differ[:3]}"


if __name__ == "__main__" and sys.argv[1:] == ["write"]:
    import tempfile
    folder = tempfile.mkdtemp()
    loaded = {(name, dtype): load(folder, name, dtype) for name in MODELS for dtype in ("float32", "int8")}
    golden = {key(*case): samples(loaded[case[:2]], *case[2:]) for case in cases()}
    with open(GOLDEN, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(golden.items())) + "\n}\n")
    print(f"{len(golden)} cases written to {GOLDEN}")
