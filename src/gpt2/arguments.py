"""The checks of what callers pass, in one place, worded with the parameters' names.

The Python API calls them where it is called; the command line calls the same ones before it
loads anything, and shows each name as its flag (`top_p` becomes `--top_p`) through
`ArgumentError.worded`. No TensorFlow here: a command's flags are checked before TensorFlow starts.
"""
import numbers
import os
import random

from .errors import GPT2Error

DTYPES = ("float32", "float16", "bfloat16")  # the weights' dtypes that every use of a model takes
# ... and int8: weights quantized for generating on a CPU (gpt2.int8), not for scoring or training.
GENERATION_DTYPES = DTYPES + ("int8",)
# The tf.distribute strategies (see gpt2.strategies) that training and generation take by name.
TRAINING_STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
GENERATION_STRATEGIES = ("auto", "one", "mirrored")


class ArgumentError(GPT2Error, ValueError):
    """An impossible argument. The message is written with parameter names as {name} marks."""

    def __init__(self, template, *names):
        self.template, self.names = template, names
        super().__init__(self.worded(""))

    def worded(self, prefix):
        """The message with each parameter name after `prefix` ("" for the API, "--" for flags)."""
        text = self.template
        for name in self.names:
            text = text.replace("{" + name + "}", prefix + name)
        return text


def must(name, requirement, value):
    return ArgumentError(f"{{{name}}} must be {requirement}, not {value!r}", name)


def is_whole(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def whole(name, value, minimum):
    """`value`, checked to be a whole number (not a bool) of at least `minimum`."""
    if not is_whole(value) or value < minimum:
        raise must(name, f"a whole number of at least {minimum}", value)
    return int(value)


def check_sampling(length, temperature, top_k, top_p):
    """How tokens are chosen; `length` may be None (the default length)."""
    if length is not None:
        whole("length", length, 1)
    if not is_real(temperature) or not 0 <= temperature < float("inf"):
        raise must("temperature", "a number >= 0 (0 means always the most likely token)", temperature)
    if not is_whole(top_k) or top_k < 0:
        raise must("top_k", "a whole number >= 0 (0 turns it off)", top_k)
    if not is_real(top_p) or not 0 < top_p <= 1:
        raise must("top_p", "a number in (0, 1] (1 turns it off)", top_p)


def check_seed(seed):
    """`seed`, checked to be None or a whole number that fits 64 bits."""
    if seed is not None and not (is_whole(seed) and -2 ** 63 <= seed < 2 ** 63):
        raise must("seed", "a whole number (64 bits)", seed)
    return seed


def check_first_sample(first_sample):
    """`first_sample`, the number of a seed's first sample: a whole number that leaves the rows counted on from
    it room in 64 bits."""
    if not is_whole(first_sample) or not 0 <= first_sample < 2 ** 62:
        raise must("first_sample", "a whole number from 0 to 2**62 - 1", first_sample)
    return first_sample


def new_seed():
    return random.SystemRandom().randrange(2 ** 31)


def check_stop(stop):
    """`stop` as a list of strings: None, a string, or a list of them, none empty (an empty one
    would end every sample before its first character)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise must("stop", "a string or a list of strings", stop)
    if not all(stop):
        raise must("stop", "text that ends a sample, never an empty string", stop)
    return list(stop)


def check_path(name, path):
    """`path` (a str or os.PathLike) as a str."""
    if not isinstance(path, (str, os.PathLike)):
        raise must(name, "a path (a string or os.PathLike)", path)
    return os.fspath(path)


def check_text(name, text):
    if not isinstance(text, str):
        raise must(name, "a string", text)
    return text


def check_tokens(tokens, n_vocab):
    """`tokens` as a list of ints: a list, tuple or 1-D NumPy array of ids of a vocabulary of n_vocab tokens."""
    requirement = f"token ids: whole numbers from 0 to {n_vocab - 1}"
    if getattr(tokens, "ndim", None) == 1 and tokens.dtype.kind in "iu":  # a NumPy array, checked at NumPy's speed
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= n_vocab):
            raise must("tokens", requirement, tokens[(tokens < 0) | (tokens >= n_vocab)][0].item())
        return tokens.tolist()
    if not isinstance(tokens, (list, tuple)):
        raise must("tokens", "a list of " + requirement, tokens)
    for token in tokens:
        if not is_whole(token) or not 0 <= token < n_vocab:
            raise must("tokens", requirement, token)
    return [int(token) for token in tokens]


def check_dtype(dtype, dtypes=DTYPES):
    if dtype not in dtypes:
        raise must("dtype", f"one of {', '.join(dtypes)}", dtype)
    return dtype


def check_generation(dtype, strategy):
    """The dtype and strategy of a model loaded for generating, checked together."""
    check_dtype(dtype, GENERATION_DTYPES)
    check_strategy(strategy, GENERATION_STRATEGIES)
    if dtype == "int8" and strategy not in ("one", "auto"):
        raise ArgumentError("int8 weights run on this machine's CPU, as one replica: use {strategy} one, or "
                            "{dtype} float16 on GPUs", "strategy", "dtype")


def check_strategy(strategy, names):
    """A `strategy` name, checked to be one of `names`; other objects are for gpt2.strategies to check
    (a tf.distribute.Strategy, from Python), where TensorFlow has started."""
    if isinstance(strategy, str) and strategy not in names:
        raise must("strategy", f"one of {', '.join(names)} (or, from Python, a tf.distribute.Strategy)", strategy)
    return strategy
