"""The Python API: load a model once, then generate or score text from code.

    import gpt2
    model = gpt2.load("124M")                 # downloads it on first use
    model.generate("The river", length=40, top_k=40, seed=1)      # -> ["...", ...]
    for piece in model.stream("The river", length=40):            # text as it is made
        print(piece, end="", flush=True)
    model.score("The river ran past the mill.").perplexity

The command-line scripts are thin callers of this module.

TensorFlow starts when a float model is loaded (the modules that need it are imported there): an
int8 model whose programs are stored runs without it (gpt2.int8).
"""
import collections
import os
from typing import List, NamedTuple, Tuple

import numpy as np

from .arguments import (GENERATION_STRATEGIES, ArgumentError, check_controls, check_first_sample, check_generation,
                        check_path, check_sampling, check_seed, check_stop, check_stride, check_text, check_token_ids,
                        new_seed, whole)
from .download import model_folder
from .encoder import TextStream, read_encoder
from .errors import GPT2Error
from .folders import default_models_dir, read_hparams
from .engine import Replicas, Request, Settings, decode_requests, decoding_memory, shared_prefix_length
from .int8 import Int8Engine, Int8Model, load_int8

# Seconds of decoding per compiled call while streaming: text comes five times a second and
# Ctrl-C is felt at once, while a call's own cost (mostly handling its 130 arguments; timed in
# docs/performance.md) is shared by the tokens of a fifth of a second instead of paid for each.
STREAM_SECONDS = 0.2
# Tokens per compiled call otherwise: large enough that the calls cost nothing, small enough to stop soon.
BATCH_CHUNK = 32


def load(model_name="124M", models_dir=None, *, dtype="float32", base_url=None, download=True, strategy="one",
         progress=True):
    """The model `model_name`: one of OpenAI's (124M, 355M, 774M, 1558M), a model folder in
    models_dir or at that path (OpenAI's layout or Hugging Face's), or a GPT-2 of the Hugging Face
    Hub ("openai-community/gpt2", "distilgpt2", a fine-tune's "org/name").

    One of OpenAI's models that is not in models_dir yet is downloaded first, with a progress bar
    (unless progress=False; download=False: not at all); a Hub model is fetched into huggingface_hub's
    cache (download=False: taken from the cache only). models_dir defaults to $GPT2_MODELS_DIR,
    else ./models. dtype: "float32" (as stored), "float16" / "bfloat16" for half the memory (faster on GPUs), or "int8"
    (weights quantized to int8: a quarter of the memory, faster on a CPU; for generating only).
    strategy: the devices that `generate` spreads each batch over: "one" (the default device),
    "mirrored" (all of this machine's GPUs, each with a copy of the weights), "auto" (mirrored
    where there are several GPUs), or a tf.distribute.Strategy.
    """
    check_generation(dtype, strategy)  # before any download
    models_dir = default_models_dir() if models_dir is None else check_path("models_dir", models_dir)
    return GPT2.from_folder(model_folder(model_name, models_dir, download, base_url, progress), dtype, strategy)


class GPT2:
    """A loaded GPT-2: its hparams, weights (`params`: a tree of tensors, or an int8.Int8Model),
    `encoder`, the folder it came from (`model_dir`), and the tf.distribute `strategy` whose replicas
    `generate` spreads batches over."""

    def __init__(self, hparams, params, encoder, model_dir, strategy="one"):
        if encoder.n_vocab != hparams.n_vocab:
            raise GPT2Error(f"the vocabulary has {encoder.n_vocab} tokens but the model has {hparams.n_vocab} "
                            "(hparams.json or config.json): "
                            "the model folder mixes files of different models, download it again")
        self.hparams, self.params, self.encoder, self.model_dir = hparams, params, encoder, model_dir
        self.int8 = isinstance(params, Int8Model)
        if self.int8:  # on the CPU, as one replica, without TensorFlow
            self.strategy, self.replicas, self._replica_params = None, 1, params
        else:
            from .decode import replicated
            from .strategies import distribution
            self.strategy = distribution(strategy, GENERATION_STRATEGIES)
            self.replicas = self.strategy.num_replicas_in_sync
            # Each replica reads its own copy of the weights; one replica reads `params` themselves.
            self._replica_params = replicated(params, self.strategy) if self.replicas > 1 else params

    @classmethod
    def from_folder(cls, model_dir, dtype="float32", strategy="one"):
        """The model in a folder of OpenAI's layout (hparams.json, model.ckpt.*, encoder.json, vocab.bpe)
        or Hugging Face's (config.json, model.safetensors, vocab.json and merges.txt or tokenizer.json)."""
        model_dir = check_path("model_dir", model_dir)
        check_generation(dtype, strategy)
        hparams = read_hparams(model_dir)
        if dtype == "int8":
            params = load_int8(model_dir, hparams)
        else:
            from . import tensorflow_start  # noqa: F401  (first: TensorFlow starts quietly, with its compilation cache)
            from .weights import load_params
            params = load_params(model_dir, hparams, dtype)
        return cls(hparams, params, read_encoder(model_dir), model_dir, strategy)

    def save(self, model_dir, write_more=None, save_format="openai"):
        """Write this model (its weights as they are now) as a model folder; returns its path.

        save_format "openai": OpenAI's layout, which every tool that reads OpenAI's checkpoints
        loads; "huggingface": Hugging Face's (float32 safetensors), which transformers'
        GPT2LMHeadModel and AutoTokenizer load as it is, and the Hub takes; "both": one folder with
        both. The folder appears whole or not at all. `write_more(folder)` may add files to it first.
        """
        self._need_float("saving")
        from .weights import save_model
        return save_model(check_path("model_dir", model_dir), self.hparams, self.params, self.encoder, write_more,
                          save_format)

    def encode(self, text):
        return self.encoder.encode(text)

    def decode(self, tokens):
        return self.encoder.decode(tokens)

    def sample_length(self, length, prompt):
        """New tokens per sample: `length`, checked to fit the context, or by default as OpenAI's
        scripts: half the context after a prompt, all of it for unconditional text (prompt "")."""
        n_ctx = self.hparams.n_ctx
        if length is None:
            return n_ctx // 2 if prompt else n_ctx
        whole("length", length, 1)
        if length > n_ctx:
            raise ArgumentError(f"{{length}} {length} is more than the model's context of {n_ctx} tokens: "
                                f"ask for {n_ctx} or fewer", "length")
        return length

    def context(self, prompt, length, truncate_prompt=False):
        """The tokens that start a sample of `length` new tokens: the prompt's, or <|endoftext|> alone
        for an empty prompt.

        The model sees n_ctx tokens at most; the last new token is never fed back to it, so a prompt
        of n tokens leaves room for n_ctx + 1 - n new ones. With `truncate_prompt`, a prompt that is
        too long keeps only its last tokens; otherwise it is an error that says how many are left.
        """
        tokens = self.encode(prompt) if check_text("prompt", prompt) else [self.encoder.eot_token]
        n_ctx = self.hparams.n_ctx
        room = n_ctx + 1 - self.sample_length(length, prompt)
        if len(tokens) <= room:
            return tokens
        if truncate_prompt:
            return tokens[len(tokens) - room:]
        raise ArgumentError(f"the prompt is {len(tokens)} tokens, which leaves room for "
                            f"{max(n_ctx + 1 - len(tokens), 0)} new tokens of the model's {n_ctx}, but {{length}} "
                            f"is {length}: shorten the prompt, lower {{length}}, or set {{truncate_prompt}} to keep "
                            f"only the prompt's last {room} tokens", "length", "truncate_prompt")

    def generate(self, prompt="", length=None, *, temperature=1.0, top_k=0, top_p=1.0, seed=None, nsamples=1,
                 batch_size=1, stop=None, truncate_prompt=False, ignore_eot=False, first_sample=0, min_p=0.0,
                 repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0, frequency_penalty=0.0,
                 no_repeat_ngram_size=0, logit_bias=None, bad_words=None, logprobs=None):
        """`nsamples` continuations of `prompt` (a str; "" for unconditional text), as a list of str.

        A list of prompts gives a list with one such list per prompt; prompts of different lengths
        share batches. `length`: new tokens per sample (default: n_ctx // 2, or n_ctx without a
        prompt). `temperature`, `top_k`, `top_p`: see docs/commands.md. `seed`: the same seed gives the same
        samples (None: a fresh one); sample i of a seed is the same whatever the batch size, and
        `first_sample` starts the numbering elsewhere. `batch_size`: rows computed at once.
        `stop`: a string or list of strings that ends a sample (not included). A sample also ends
        at <|endoftext|> unless `ignore_eot`.
        `min_p`, `repetition_penalty`, `repeat_last_n`, `presence_penalty`, `frequency_penalty`,
        `no_repeat_ngram_size`, `logit_bias` ({token id: bias}) and `bad_words` (strings never
        generated): see docs/commands.md, which says in which order the rules apply.
        `logprobs=N` (0 to 20): each sample is a Sample instead of a str, with its tokens, their
        log-probabilities under the model's own distribution (before temperature, penalties and
        filters) and each token's N most likely alternatives with theirs.
        """
        prompts = check_prompts(prompt)
        whole("nsamples", nsamples, 1)
        whole("batch_size", batch_size, 1)
        flags = self.sampling_flags(length, temperature, top_k, top_p, seed, first_sample, stop, check_controls(
            min_p, repetition_penalty, repeat_last_n, presence_penalty, frequency_penalty, no_repeat_ngram_size,
            logit_bias, bad_words, logprobs))
        length = self.sample_length(length, prompts[0])
        rows = [Row(self.context(p, length, truncate_prompt), length, flags, first_sample + i, ignore_eot)
                for i, p in enumerate(p for p in prompts for _ in range(nsamples))]
        texts = self.generate_rows(rows, batch_size)
        if isinstance(prompt, str):
            return texts
        return [texts[i * nsamples:(i + 1) * nsamples] for i in range(len(prompts))]

    def sample_row(self, prompt="", length=None, *, seed, sample_index=0, truncate_prompt=False, ignore_eot=False,
                   temperature=1.0, top_k=0, top_p=1.0, stop=None, **controls):
        """The Row of one sample, its arguments (generate's) checked: generate_rows makes of it what
        `generate(prompt, length, seed=seed, first_sample=sample_index, ...)[0]` gives. Rows of
        other prompts and flags share batches there (gpt2.beam's GenerateSamples)."""
        [prompt] = check_prompts(prompt, several=False)
        flags = self.sampling_flags(length, temperature, top_k, top_p, seed, sample_index, stop,
                                    check_controls(**controls))
        length = self.sample_length(length, prompt)
        return Row(self.context(prompt, length, truncate_prompt), length, flags, sample_index, ignore_eot)

    def generate_rows(self, rows, batch_size=1):
        """The sample of each Row (a str, or a Sample where its flags ask for logprobs), its rows
        computed batch_size at a time: a row that ends makes room for the next at once."""
        # Each replica takes an equal share of a batch's rows.
        self._check_memory(-(-min(batch_size, len(rows)) // self.replicas), max(len(row.context) for row in rows),
                           max(row.length for row in rows), batch_size)
        requests = [Request(row.context, row.length, self.settings(row.flags, row.sample, row.ignore_eot))
                    for row in rows]
        streams = [TextStream(self.encoder, row.flags["stop"], self._stop_token(row.ignore_eot)) for row in rows]
        samples = [Sample("", [], [], []) for _ in rows]
        contexts = [row.context for row in rows]
        engine = self.engine(min(batch_size, len(rows)), contexts[0][:shared_prefix_length(contexts)])
        for made in decode_requests(engine, requests, chunk_size=BATCH_CHUNK,
                                    is_finished=lambda index: streams[index].finished):
            streams[made.index].feed(made.tokens)
            if made.logprobs:
                self._add_logprobs(samples[made.index], made, rows[made.index].ignore_eot)
        return [sample._replace(text=stream.finish()) if row.flags["controls"].logprobs is not None else stream.finish()
                for row, stream, sample in zip(rows, streams, samples)]

    def stream(self, prompt="", length=None, *, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None,
               truncate_prompt=False, ignore_eot=False, first_sample=0, min_p=0.0, repetition_penalty=1.0,
               repeat_last_n=0, presence_penalty=0.0, frequency_penalty=0.0, no_repeat_ngram_size=0, logit_bias=None,
               bad_words=None, logprobs=None):
        """One sample of `prompt`, yielded as pieces of text while it is generated.

        Pieces are whole characters, and text that may be the start of a `stop` string is held
        back until it is clear. Flags as for `generate`. Stop iterating to stop generating. With
        `logprobs=N`, each piece is a Sample: its text (perhaps "", while text is held back) and
        the tokens that came with it, with their log-probabilities.
        """
        [prompt] = check_prompts(prompt, several=False)
        flags = self.sampling_flags(length, temperature, top_k, top_p, seed, first_sample, stop, check_controls(
            min_p, repetition_penalty, repeat_last_n, presence_penalty, frequency_penalty, no_repeat_ngram_size,
            logit_bias, bad_words, logprobs))
        with_logprobs = flags["controls"].logprobs is not None
        length = self.sample_length(length, prompt)
        context = self.context(prompt, length, truncate_prompt)
        text_stream = TextStream(self.encoder, flags["stop"], self._stop_token(ignore_eot))
        request = Request(context, length, self.settings(flags, first_sample, ignore_eot))
        # A fifth of a second's tokens a step: the first step (the first token) compiles the loop
        # or reads it from the compilation cache, and the text then flows without a pause.
        for made in decode_requests(self.engine(1, context[:-1]), [request], chunk_seconds=STREAM_SECONDS):
            piece = text_stream.feed(made.tokens)
            if with_logprobs:
                yield self._add_logprobs(Sample(piece, [], [], []), made, ignore_eot)
            elif piece:
                yield piece
            if text_stream.finished:
                break
        piece = text_stream.finish(pending_only=True)
        if piece:
            yield Sample(piece, [], [], []) if with_logprobs else piece

    def sampling_flags(self, length, temperature, top_k, top_p, seed, first_sample, stop, controls):
        """The sampling arguments, checked (`controls`: check_controls' Controls); a fresh seed for None."""
        check_sampling(length, temperature, top_k, top_p)
        check_first_sample(first_sample)
        check_token_ids(controls.logit_bias, self.hparams.n_vocab)
        seed = check_seed(seed)
        return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=new_seed() if seed is None else seed,
                    stop=check_stop(stop), controls=controls)

    def settings(self, flags, sample, ignore_eot):
        controls = flags["controls"]
        return Settings(temperature=flags["temperature"], top_k=flags["top_k"], top_p=flags["top_p"],
                        seed=flags["seed"], sample=sample, stop_token=self._stop_token(ignore_eot),
                        min_p=controls.min_p, repetition_penalty=controls.repetition_penalty,
                        repeat_last_n=controls.repeat_last_n, presence_penalty=controls.presence_penalty,
                        frequency_penalty=controls.frequency_penalty,
                        no_repeat_ngram_size=controls.no_repeat_ngram_size,
                        logit_bias=tuple(sorted(controls.logit_bias.items())),
                        bad_words=self.bad_word_tokens(controls.bad_words), logprobs=controls.logprobs)

    def bad_word_tokens(self, words):
        """The token sequences of `words` that the rows never complete: each word's, and, for a word
        that does not start with a space, those of the word after a space (" word"), as it is
        written within a text. Other spellings of a word in tokens are not banned (as in Hugging
        Face's bad_words_ids)."""
        sequences = []
        for word in words:
            for spelling in [word] if word.startswith(" ") else [word, " " + word]:
                tokens = tuple(self.encode(spelling))
                if tokens not in sequences:
                    sequences.append(tokens)
        return tuple(sequences)

    def _add_logprobs(self, sample, made, ignore_eot):
        """`sample` with made's tokens (its stop token left out) and their log-probabilities added."""
        n = len(made.tokens) - (made.ended and made.tokens[-1] == self._stop_token(ignore_eot))
        sample.tokens.extend(int(t) for t in made.tokens[:n])
        sample.logprobs.extend(float(v) for v in made.logprobs.chosen[:n])
        sample.top_logprobs.extend([(int(t), float(v)) for t, v in zip(tokens, values)]
                                   for tokens, values in zip(made.logprobs.top_tokens[:n],
                                                             made.logprobs.top_logprobs[:n]))
        return sample

    def engine(self, rows, prefix=()):
        """A gpt2.engine engine of `rows` rows on this model's weights, spread over the strategy's
        replicas, each with its copy of the weights. Its rows must start with `prefix`, which runs
        once for all of them (where that is faster)."""
        if self.int8:
            return Int8Engine(self.params, rows, prefix)
        from .decode import XlaEngine
        replicas = self.replicas
        if replicas == 1:
            return XlaEngine(self.params, self.hparams, rows, prefix)
        copies = self.strategy.experimental_local_results(self._replica_params)
        devices = self.strategy.extended.worker_devices
        shares = [rows // replicas + (i < rows % replicas) for i in range(replicas)]
        return Replicas([XlaEngine(params, self.hparams, share, prefix, device)
                         for params, share, device in zip(copies, shares, devices) if share])

    def _need_float(self, what):
        if self.int8:
            raise GPT2Error(f"{what} needs the model's float weights, and this one was loaded with int8 weights "
                            "(for generating): load it with dtype float32")

    def _check_memory(self, rows, context_len, length, batch_size):
        """Refuse a batch that would not fit in memory, before TensorFlow allocates it.

        Without this, a batch of 4096 rows of 1024 tokens on 124M (about 600 GB) grows toward the
        machine's limit instead of failing at once. On a GPU the memory that counts is the GPU's, which TensorFlow
        does not tell, and its allocation fails at once instead.
        """
        available = None if not self.int8 and "GPU" in self.params["wte"].device else available_memory()
        if available is None:
            return
        # int8 weights keep a float32 cache.
        need = decoding_memory(self.hparams, rows, context_len, length, 4 if self.int8 else self.params["wte"].dtype.size)
        if need <= available:
            return
        fits = available * rows // need
        advice = (f"use {{batch_size}} {fits} or less" if fits else
                  f"not even one sample of {length} tokens fits: lower {{length}} or free some memory")
        raise ArgumentError(f"{{batch_size}} {batch_size} with {{length}} {length} needs about {byte_size(need)} of "
                            f"memory beyond the model's weights, but {byte_size(available)} is available: {advice}",
                            "batch_size", "length")

    def _stop_token(self, ignore_eot):
        return None if ignore_eot else self.encoder.eot_token

    def score(self, text, stride=None, *, batch_size=1):
        """How likely GPT-2 finds `text`: a Score with its `tokens`, the natural-log probability of
        each (`logprobs`), and `nll` (mean, nats per token), `perplexity`, `bits_per_byte`.

        Every token is scored once, t_1 given <|endoftext|> alone; a text longer than the context
        goes in windows of n_ctx tokens that start `stride` tokens apart (default n_ctx // 2), so
        each token has at least n_ctx - stride tokens before it (see gpt2.score). A list of texts
        gives a list of Scores. `batch_size`: windows computed at once (the scores do not change).
        """
        if not isinstance(text, str):
            return [self.score(t, stride, batch_size=batch_size) for t in check_prompts(text, name="text")]
        from .score import Score
        chunks = list(self.score_pieces([text], stride, batch_size=batch_size))
        return Score(np.concatenate([tokens for tokens, _ in chunks]),
                     np.concatenate([logprobs for _, logprobs in chunks]), len(text.encode("utf-8")))

    def perplexity(self, text, stride=None, *, batch_size=1):
        """exp(mean negative log-likelihood per token) of `text` (or a list of them), as `score` computes it."""
        scores = self.score(text, stride, batch_size=batch_size)
        return scores.perplexity if isinstance(text, str) else [s.perplexity for s in scores]

    def window_stride(self, stride):
        """How far apart scoring windows start: `stride` checked, or n_ctx // 2 for None (gpt2.arguments.check_stride)."""
        return check_stride(stride, self.hparams.n_ctx)

    def score_windows(self, windows, rows):
        """The log-probabilities of windows of any texts (gpt2.score.score_windows), `rows` at a time."""
        self._need_float("scoring")
        from .score import score_windows
        return score_windows(self.params, self.hparams, windows, rows)

    def score_pieces(self, pieces, stride=None, *, batch_size=1):
        """`score` for a text too large for memory, given as pieces of text (strings, read as needed;
        gpt2.score.text_pieces cuts a file where the pieces encode as the whole).

        Yields (tokens, logprobs) arrays as the windows are computed, in the text's order.
        """
        self._need_float("scoring")
        from .score import score_tokens
        stride = self.window_stride(stride)
        whole("batch_size", batch_size, 1)
        pending = collections.deque()  # tokens encoded, not yet scored

        def text_tokens():
            for piece in pieces:
                tokens = self.encode(piece)
                pending.extend(tokens)
                yield from tokens
            if not pending and not scored:
                raise GPT2Error("nothing to score: the text is empty")

        scored = False
        for logprobs, _, _ in score_tokens(self.params, self.hparams, text_tokens(), self.encoder.eot_token,
                                           stride=stride, batch_size=batch_size):
            scored = True
            yield np.array([pending.popleft() for _ in logprobs], np.int64), logprobs


def available_memory():
    """Bytes of memory this process can still take: the system's MemAvailable, or less where a
    control group (a container) limits it; None where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    cgroups = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2, then v1
               ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
    for limit, usage in cgroups:
        try:
            with open(limit) as f_limit, open(usage) as f_usage:
                room = int(f_limit.read()) - int(f_usage.read())
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        available = room if available is None else min(available, room)
        break
    return available


def byte_size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_prompts(prompt, several=True, name="prompt"):
    """The prompts as a list: `prompt` is a string, or (with `several`) a list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    if several and isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ArgumentError(f"{{{name}}} must be a string{' or a non-empty list of strings' if several else ''}, "
                        f"not {prompt!r}", name)


class Row(NamedTuple):
    """One sample to make (see GPT2.sample_row): its prompt's tokens, new tokens, checked flags
    (GPT2.sampling_flags), sample number and whether <|endoftext|> ends it."""
    context: List[int]
    length: int
    flags: dict
    sample: int
    ignore_eot: bool


class Sample(NamedTuple):
    """A sample (or, from `stream`, a piece of one) with its tokens' log-probabilities (logprobs=N)."""
    text: str
    tokens: List[int]  # the tokens made, its stop token left out (a stop string's may be among them)
    logprobs: List[float]  # each token's log-probability, under the model's own distribution
    top_logprobs: List[List[Tuple[int, float]]]  # each token's N most likely alternatives: (token, log-probability)

    def logprob_fields(self):
        """Its tokens, their log-probabilities and each one's likeliest tokens with theirs ([token,
        log-probability] pairs, the likeliest first), as JSON records hold them (--output x.jsonl)."""
        return {"tokens": [int(token) for token in self.tokens],
                "logprobs": [float(logprob) for logprob in self.logprobs],
                "top_logprobs": [[[int(token), float(logprob)] for token, logprob in likeliest]
                                 for likeliest in self.top_logprobs]}
