"""The checks of what callers pass, in one place, worded with the parameters' names.

The Python API calls them where it is called; the command line calls the same ones before it
loads anything, and shows each name as its flag (`top_p` becomes `--top_p`) through
`ArgumentError.worded`. No TensorFlow here: a command's flags are checked before TensorFlow starts.
"""
import numbers
import os
import random
from typing import NamedTuple

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


def check_stride(stride, n_ctx):
    """How far apart scoring windows start: `stride`, checked to be in 1..n_ctx - 1, or n_ctx // 2 for None."""
    if stride is None:
        return n_ctx // 2
    if whole("stride", stride, 1) >= n_ctx:
        raise ArgumentError(f"{{stride}} must be less than the model's context of {n_ctx} tokens, not {stride}",
                            "stride")
    return stride


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
    """`stop` as a list of strings (an empty one would end every sample before its first character)."""
    return strings("stop", stop, "text that ends a sample")


def strings(name, value, meaning):
    """`value` as a list of strings: None, a string, or a list of them, none empty (`meaning`: what each is)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise must(name, "a string or a list of strings", value)
    if not all(value):
        raise must(name, f"{meaning}, never an empty string", value)
    return list(value)


class Controls(NamedTuple):
    """The sampling controls besides temperature, top_k and top_p, as check_controls returns them (what each
    does, and in which order they apply: docs/commands.md)."""
    min_p: float
    repetition_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    no_repeat_ngram_size: int
    logit_bias: dict  # {token id: bias}, {} for none
    bad_words: list  # of non-empty strings, [] for none
    logprobs: object  # None (off) or a whole number from 0 to 20


def check_controls(min_p=0.0, repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0, frequency_penalty=0.0,
                   no_repeat_ngram_size=0, logit_bias=None, bad_words=None, logprobs=None):
    """The controls, checked, as Controls of Python ints, floats, a dict and a list; each default turns its
    control off. Token ids in logit_bias may be strings of digits (JSON's keys); check_token_ids checks them
    against a model's vocabulary."""
    if not is_real(min_p) or not 0 <= min_p < 1:
        raise must("min_p", "a number in [0, 1) (0 turns it off)", min_p)
    if not is_real(repetition_penalty) or not 0 < repetition_penalty < float("inf"):
        raise must("repetition_penalty", "a number > 0 (1 turns it off)", repetition_penalty)
    if not is_whole(repeat_last_n) or repeat_last_n < 0:
        raise must("repeat_last_n", "a whole number >= 0 (0: the whole text)", repeat_last_n)
    for name, penalty in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not is_real(penalty) or not -2 <= penalty <= 2:
            raise must(name, "a number from -2 to 2 (0 turns it off)", penalty)
    if not is_whole(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise must("no_repeat_ngram_size", "a whole number >= 0 (0 turns it off)", no_repeat_ngram_size)
    if logprobs is not None and not (is_whole(logprobs) and 0 <= logprobs <= 20):
        raise must("logprobs", "a whole number from 0 to 20 (the likeliest tokens shown besides each token)", logprobs)
    return Controls(float(min_p), float(repetition_penalty), int(repeat_last_n), float(presence_penalty),
                    float(frequency_penalty), int(no_repeat_ngram_size), check_logit_bias(logit_bias),
                    strings("bad_words", bad_words, "text never generated"),
                    None if logprobs is None else int(logprobs))


def check_logit_bias(logit_bias):
    """`logit_bias` as {int: float}: None, or a dict of token ids (whole numbers >= 0, or their digits as a string)
    to biases from -100 to 100."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, dict):
        raise must("logit_bias", "a dict of token ids to biases, such as {50256: -100}", logit_bias)
    checked = {}
    for key, bias in logit_bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not is_whole(token) or token < 0:
            raise ArgumentError(f"token ids in {{logit_bias}} must be whole numbers >= 0, not {key!r}", "logit_bias")
        if not is_real(bias) or not -100 <= bias <= 100:
            raise ArgumentError(f"biases in {{logit_bias}} must be numbers from -100 to 100, not {bias!r} (token "
                                f"{token})", "logit_bias")
        if token in checked:  # given as 5 and as "5"
            raise ArgumentError(f"{{logit_bias}} names token {token} twice: give it one bias", "logit_bias")
        checked[int(token)] = float(bias)
    return checked


def check_token_ids(logit_bias, n_vocab):
    """`logit_bias` as check_controls returns it, checked against a vocabulary of n_vocab tokens."""
    for token in logit_bias:
        if token >= n_vocab:
            raise ArgumentError(f"{{logit_bias}} names token {token}, but the model has {n_vocab} tokens, 0 to "
                                f"{n_vocab - 1}", "logit_bias")
    return logit_bias


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
