"""What the commands do. The top-level scripts and the console commands only hand their flags here.

The flags keep the names and meaning of OpenAI's scripts: model_name, seed, nsamples, batch_size,
length, temperature, top_k, top_p, models_dir.

Every flag is checked before TensorFlow starts (gpt2.api, which imports it, is imported when a
model is loaded), and Ctrl-C at any moment, start-up included, ends a command with one line and
exit status 130.
"""
import os
import signal
import sys
import threading


def _interrupted_while_importing(signum, frame):
    sys.stderr.write("interrupted\n")
    os._exit(130)


# Ctrl-C while the imports below and fire's run (tqdm and fire take a while on a busy machine)
# would end in a traceback, run() not being there yet to catch it, or be lost: a KeyboardInterrupt
# that lands in the import machinery's callbacks is printed and ignored. Until run() calls fire, it
# ends the command at once, as Ctrl-C at any other moment does.
_previous_handler = None
if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    _previous_handler = signal.signal(signal.SIGINT, _interrupted_while_importing)

import contextlib  # noqa: E402
import difflib  # noqa: E402
import errno  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

from tqdm import tqdm  # noqa: E402

from .arguments import (GENERATION_DTYPES, ArgumentError, check_controls, check_dtype,  # noqa: E402
                        check_generation, check_sampling, check_seed, check_stop, new_seed, whole)
from .errors import GPT2Error, Interrupted  # noqa: E402
from .folders import check_model_name, find_model_dir  # noqa: E402


PROMPT = "Model prompt >>> "
MORE = "... "
# A --prompt_file longer than this is shown by its first lines and its size.
SHOWN_LINES = 10
SHOWN_CHARS = 2000


def banner(n):
    return "=" * 40 + " SAMPLE " + str(n) + " " + "=" * 40


class WriteFailed(GPT2Error):
    """A write to --output or stdout failed (a full disk), with what was written whole before it."""


def check_flags(model_name, nsamples, batch_size, seed, length, temperature, top_k, top_p, stop, dtype,
                strategy="one", unconditional=False, **controls):
    """After checking every flag (an ArgumentError names the first bad one): the seed to use (one for the whole
    run), and the `controls` (check_controls' keywords) set away from their defaults, as generate's keywords.

    A command passes on, and records, only these, so that a run or a record without them is as it was before
    they existed. logprobs is not among them: it asks generate for more than text.
    """
    check_model_name(model_name)
    whole("nsamples", nsamples, 0 if unconditional else 1)
    whole("batch_size", batch_size, 1)
    if nsamples % batch_size:
        raise ArgumentError(f"{{nsamples}} ({nsamples}) must be a multiple of {{batch_size}} ({batch_size})",
                            "nsamples", "batch_size")
    check_sampling(length, temperature, top_k, top_p)
    controls, defaults = check_controls(**controls), check_controls()
    check_stop(stop)
    check_generation(dtype, strategy)
    seed = check_seed(seed)
    changed = {name: value for name, value, default in zip(controls._fields, controls, defaults)
               if value != default and name != "logprobs"}
    return (new_seed() if seed is None else seed), changed


def check_shard(shard):
    """(K, N) of --shard K/N (0 <= K < N); (0, 1) for None."""
    if shard is None:
        return 0, 1
    parts = str(shard).split("/")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts) and int(parts[0]) < int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise ArgumentError(f"{{shard}} must be K/N, this process's number K from 0 to N - 1 and the number of "
                        f"processes N (such as 0/4), not {shard!r}", "shard")


def load_model(model_name, models_dir, dtype, strategy="one"):
    from .encoder import encoder_read_ahead

    try:  # the tokenizer's files need no TensorFlow: they are read while it starts
        reading = encoder_read_ahead(find_model_dir(model_name, models_dir))
    except (GPT2Error, OSError, TypeError, ValueError):  # not downloaded yet, or not a model:
        reading = contextlib.nullcontext()  # load fetches it or says what is wrong
    with reading:
        with interrupted_at_once():
            from .api import load
            if needs_tensorflow(model_name, models_dir, dtype):
                start_tensorflow(dtype)  # only once the flags are known to be right
        return load(model_name, models_dir, dtype=dtype, strategy=strategy)


def start_tensorflow(dtype):
    if dtype == "int8":
        from .int8 import programs_maker
        programs_maker()  # which starts TensorFlow, or says in one line that it cannot
        return
    try:
        from . import tensorflow_start  # noqa: F401
    except ImportError as error:
        raise GPT2Error(f"{dtype} models run on TensorFlow, and it cannot be imported here ({error}): install it "
                        "(pip install tensorflow)") from None


def needs_tensorflow(model_name, models_dir, dtype):
    """Whether loading the model starts TensorFlow: all but an int8 model whose programs are stored (gpt2.int8)."""
    if dtype != "int8":
        return True
    from .folders import read_hparams
    from .int8 import stored_folder
    try:
        model_dir = find_model_dir(model_name, models_dir)
        folder = stored_folder(model_dir, read_hparams(model_dir))
    except (GPT2Error, OSError, TypeError, ValueError):  # not downloaded yet, or not a model: load says what
        return True
    return not (folder and os.path.isdir(folder))


@contextlib.contextmanager
def interrupted_at_once():
    """Ctrl-C ends the command at once, with "interrupted" and status 130, while TensorFlow imports.

    TensorFlow's C code can turn a KeyboardInterrupt raised inside it into another error (seen in
    CI: "AttributeError: 'tuple' object has no attribute '_type_spec'" from its import, a
    traceback); an import has nothing to save. The line goes to the stderr of before the import,
    which silences TensorFlow's C++ start-up lines by pointing file descriptor 2 elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stderr = os.dup(2)

    def interrupted(signum, frame):
        os.write(stderr, b"interrupted\n")
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(stderr)


def shown_prompt(text, file_name):
    """A prompt read from a file as the prompt line shows it: whole, or if it is long (a whole book
    would scroll for minutes) its first lines and its size."""
    if text.count("\n") < SHOWN_LINES and len(text) <= SHOWN_CHARS:
        return PROMPT + text.replace("\n", "\n" + MORE)
    head = "\n".join(text.split("\n", SHOWN_LINES)[:SHOWN_LINES])[:SHOWN_CHARS]
    return (PROMPT + head.replace("\n", "\n" + MORE) + f"\n{MORE}[... {file_name} has {len(text.encode('utf-8')):,} "
            f"bytes and {text.count(chr(10)) + 1:,} lines in all]")


def read_prompt():
    """One prompt from stdin; a line that ends with a backslash continues on the next line."""
    lines = [input(PROMPT)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input(MORE))
    return "\n".join(lines)


def interact_model(model_name="124M", seed=None, nsamples=1, batch_size=1, length=None, temperature=1, top_k=0,
                   top_p=1, models_dir=None, truncate_prompt=False, ignore_eot=False, stop=None, prompt_file=None,
                   dtype="float32", min_p=0.0, repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0,
                   frequency_penalty=0.0, no_repeat_ngram_size=0, logit_bias=None, bad_words=None):
    """Continue each prompt typed (or piped) in, until end of input (Ctrl-D) or Ctrl-C at the prompt.

    model_name: 124M, 355M, 774M, 1558M, a model folder in models_dir (or its path), or a GPT-2 of the
    Hugging Face Hub (org/name, fetched into its cache on first use).
    seed: a whole number; the same seed and flags give the same samples. None: a new one each run.
    nsamples: samples per prompt; batch_size: samples computed at once (nsamples must be a multiple).
    length: new tokens per sample; None: half the model's context (n_ctx // 2).
    temperature: 1 samples as trained, lower is more predictable, 0 always takes the likeliest token.
    top_k: sample from the k likeliest tokens only; 0 turns it off.
    top_p: sample from the smallest set of likeliest tokens whose probability reaches top_p; 1 turns it off.
    models_dir: the folder of model folders ($GPT2_MODELS_DIR, else models).
    truncate_prompt: keep only the last tokens of a prompt too long for the context, instead of an error.
    ignore_eot: go on past <|endoftext|> instead of ending the sample there.
    stop: a string, or a list of strings, that ends a sample where it appears (it is not printed).
    prompt_file: read the first prompt from this file, then go on with prompts from stdin.
    dtype: float32 (the checkpoint's), float16 / bfloat16: half the memory, faster on GPUs, or int8: a
    quarter of the memory and faster than float32 on a CPU (weights quantized as they load).
    min_p: drop the tokens less likely than min_p times the likeliest one (after top_k, top_p); 0 turns it off.
    repetition_penalty: make each token already in the text less likely (CTRL's rule; 1.2 is common); 1: off.
    repeat_last_n: only the text's last n tokens count for repetition_penalty; 0: the whole text.
    presence_penalty, frequency_penalty: from -2 to 2, taken off the logit of each token the sample has
    used, once / once per use (OpenAI's); 0 turns them off.
    no_repeat_ngram_size: n: never repeat a sequence of n tokens of the text; 0 turns it off.
    logit_bias: {token id: bias}, biases from -100 to 100 added to the logits ({50256: -100}: no <|endoftext|>).
    bad_words: a string, or a list of them, never generated.

    A prompt line that ends with a backslash continues on the next line. Ctrl-C while a sample is
    being written stops that sample and returns to the prompt.
    """
    seed, controls = check_flags(model_name, nsamples, batch_size, seed, length, temperature, top_k, top_p, stop,
                                 dtype, min_p=min_p, repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=logit_bias, bad_words=bad_words)
    first_prompt = None
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                first_prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GPT2Error(f"cannot read --prompt_file {prompt_file}: {getattr(e, 'strerror', None) or e}") from e
    model = load_model(model_name, models_dir, dtype)
    length = model.sample_length(length, prompt="any")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                 truncate_prompt=truncate_prompt, ignore_eot=ignore_eot, **controls)
    next_sample = 0  # samples are numbered on across prompts, so a repeated prompt gets new ones
    while True:
        try:
            if first_prompt is not None:
                raw_text, first_prompt = first_prompt, None
                print(shown_prompt(raw_text, prompt_file))
            else:
                raw_text = read_prompt()
            while not raw_text:
                print("Prompt should not be empty!")
                raw_text = read_prompt()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            model.context(raw_text, length, truncate_prompt)
        except GPT2Error as e:
            print(f"error: {flag_wording(e)}")
            continue
        try:
            for generated in range(1, nsamples + 1, batch_size):
                if batch_size == 1:
                    print(banner(generated))
                    for piece in model.stream(raw_text, length, first_sample=next_sample, **flags):
                        print(piece, end="", flush=True)
                    print()
                else:
                    texts = model.generate(raw_text, length, nsamples=batch_size, batch_size=batch_size,
                                           first_sample=next_sample, **flags)
                    for n, text in enumerate(texts, generated):
                        print(banner(n))
                        print(text, flush=True)
                next_sample += batch_size
            print("=" * 80)
        except KeyboardInterrupt:
            print("\n[interrupted]", flush=True)


def sample_model(model_name="124M", seed=None, nsamples=0, batch_size=1, length=None, temperature=1, top_k=0,
                 top_p=1, models_dir=None, output=None, ignore_eot=False, stop=None, dtype="float32", shard=None,
                 strategy="one", min_p=0.0, repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0,
                 frequency_penalty=0.0, no_repeat_ngram_size=0, logit_bias=None, bad_words=None, logprobs=None):
    """Write unconditional samples (text that starts from <|endoftext|>) to stdout.

    nsamples: how many samples; 0 goes on until Ctrl-C. length: new tokens per sample;
    None: the model's whole context (n_ctx). output: also write the samples to this file, as they
    are made: plain text with the banners, or JSON Lines if it ends in .jsonl (one object per
    sample: its text, number, seed and sampling flags; `gpt2.load(...).generate("", seed=seed,
    first_sample=sample_index, ...)` gives it again). The other flags are as for
    generate_interactive.py.
    shard: K/N, to share the samples among N processes or machines: this one makes batches K,
    K + N, K + 2N, ... (from 0) of the batches one process would make, with the same numbers and
    texts. With the same --seed for all, give each its own --output (.jsonl) and merge them in
    order (docs/devices.md).
    strategy: the devices that share each batch: one (the default device), mirrored (all of this
    machine's GPUs), auto (mirrored where there are several GPUs). Samples are the same texts.
    logprobs: N from 0 to 20, with --output x.jsonl: each record also holds its tokens, their
    log-probabilities and, for each, the N likeliest tokens with theirs.
    """
    seed, controls = check_flags(model_name, nsamples, batch_size, seed, length, temperature, top_k, top_p, stop,
                                 dtype, strategy, unconditional=True, min_p=min_p,
                                 repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=logit_bias, bad_words=bad_words,
                                 logprobs=logprobs)
    as_jsonl = str(output).endswith(".jsonl")
    if logprobs is not None and not as_jsonl:
        raise ArgumentError("{logprobs} needs {output} FILE.jsonl, whose records hold the log-probabilities",
                            "logprobs", "output")
    shard_index, shards = check_shard(shard)
    model = load_model(model_name, models_dir, dtype, strategy)
    length = model.sample_length(length, prompt="")
    flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop, ignore_eot=ignore_eot,
                 **controls)
    out_file = OutputFile(output) if output else None
    batches = range(shard_index, nsamples // batch_size if nsamples else sys.maxsize, shards)  # this shard's
    progress = tqdm(total=len(batches) * batch_size if nsamples else None, unit="sample", disable=out_file is None,
                    file=sys.stderr)
    generated = 0  # by this process
    try:
        for first in (b * batch_size for b in batches):
            samples = model.generate("", length, nsamples=batch_size, batch_size=batch_size, first_sample=first,
                                     logprobs=logprobs, **flags)
            for number, sample in enumerate(samples, first + 1):
                text = sample if logprobs is None else sample.text  # with logprobs, a gpt2.api.Sample
                shown = banner(number) + "\n" + text + "\n"
                with writing(f"{generated} complete samples"):
                    print(shown, end="", flush=True)
                    if out_file and as_jsonl:
                        record = {"number": number, "text": text, "sample_index": number - 1,
                                  "model_name": str(model_name), "dtype": dtype, "length": length, **flags}
                        if logprobs is not None:
                            record.update(sample.logprob_fields())
                        out_file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                    elif out_file:
                        out_file.write(shown.encode("utf-8"))
                generated += 1
                progress.update(1)
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted after {generated} complete samples") from e
    finally:
        progress.close()
        if out_file:
            out_file.close()


def score_files(*files, model_name="124M", models_dir=None, stride=None, batch_size=1, output=None, dtype="float32"):
    """Score text files: for each FILE (UTF-8 text; - reads stdin) one line with its tokens, the mean
    negative log-likelihood (nats per token), perplexity and bits per byte; a total line for several.

    Each token is scored once, the first given <|endoftext|> alone (see docs/scoring.md).
    stride: windows of the model's context (n_ctx tokens) start this many tokens apart, so each
    token has at least n_ctx - stride tokens before it; default n_ctx // 2.
    batch_size: windows computed at once (the scores do not change).
    output: x.jsonl writes one JSON object per token (file, index, token, text, logprob) as it
    goes; x.json writes a summary per file at the end.
    model_name, models_dir, dtype: as for generate_interactive.py.
    """
    if not files:
        raise GPT2Error("name the text files to score (- reads standard input)")
    check_model_name(model_name)
    if stride is not None:
        whole("stride", stride, 1)
    whole("batch_size", batch_size, 1)
    check_dtype(dtype)
    if output is not None and not str(output).endswith((".jsonl", ".json")):
        raise ArgumentError(f"{{output}} must end in .jsonl (a record per token) or .json (a summary per file), "
                            f"not {output!r}", "output")
    for name in files:
        open_text(name).close()  # stdin's wrapper leaves it open
        if output is not None and is_same_file(name, output):
            raise ArgumentError(f"{{output}} {output} is also a file to score, which writing it would change as it "
                                "is read: choose another {output}", "output")
    model = load_model(model_name, models_dir, dtype)
    from .score import text_pieces  # after gpt2.api, which starts TensorFlow without its C++ start-up lines

    stride = model.window_stride(stride)
    out_file = OutputFile(output) if output else None
    summaries = []
    recorded = 0  # tokens whose records are in --output x.jsonl
    try:
        for name in files:
            summary = dict(file=name, tokens=0, bytes=0, logprob=0.0)
            summaries.append(summary)
            # disable=None: a bar only on a terminal; piped, stderr keeps the error alone on its line.
            with open_text(name) as text_file, tqdm(desc=name, unit="B", unit_scale=True, leave=False,
                                                    total=None if name == "-" else os.path.getsize(name),
                                                    file=sys.stderr, disable=None) as progress:
                try:
                    for tokens, logprobs in model.score_pieces(text_pieces(text_file), stride, batch_size=batch_size):
                        n_bytes = len(model.encoder.decode_bytes(tokens))
                        if output and output.endswith(".jsonl"):
                            records = "".join(json.dumps(
                                {"file": name, "index": summary["tokens"] + i, "token": int(token),
                                 "text": model.decode([token]), "logprob": float(logprob)}, ensure_ascii=False) + "\n"
                                for i, (token, logprob) in enumerate(zip(tokens, logprobs)))
                            with writing(f"the records of {recorded} tokens"):
                                out_file.write(records.encode("utf-8"))
                            recorded += len(tokens)
                        summary["tokens"] += len(tokens)
                        summary["bytes"] += n_bytes
                        summary["logprob"] += float(logprobs.sum())
                        progress.update(n_bytes)
                except UnicodeDecodeError as e:
                    raise GPT2Error(f"{name} is not UTF-8 text ({e.reason}): save it as UTF-8 first") from e
                except WriteFailed:
                    raise
                except GPT2Error as e:  # an empty file
                    raise GPT2Error(f"{name}: {e}") from e
            with writing(""):
                print(score_line(summary), flush=True)
        if len(files) > 1:
            total = dict(file="total", **{k: sum(s[k] for s in summaries) for k in ("tokens", "bytes", "logprob")})
            with writing(""):
                print(score_line(total), flush=True)
            summaries.append(total)
        if output and output.endswith(".json"):
            with writing(""):
                out_file.write((json.dumps([score_summary(s) for s in summaries], indent=2, ensure_ascii=False)
                                + "\n").encode("utf-8"))
    except KeyboardInterrupt as e:
        done = sum(s["tokens"] for s in summaries)
        raise Interrupted(f"interrupted after scoring {done} tokens") from e
    finally:
        if out_file:
            out_file.close()


def is_same_file(name, path):
    """Whether the input `name` (a path, or - for stdin) and the file `path` (which may not exist yet) are one file."""
    try:
        return os.path.samestat(os.fstat(sys.stdin.fileno()) if name == "-" else os.stat(name), os.stat(path))
    except (OSError, AttributeError, ValueError):  # `path` does not exist yet, or there is no stdin
        return name != "-" and os.path.realpath(name) == os.path.realpath(path)


def open_text(name):
    """The file `name` (or stdin for -) open as UTF-8 text; a one-line error if it cannot be read."""
    if name == "-":
        try:
            return open(sys.stdin.fileno(), encoding="utf-8", closefd=False)
        except (AttributeError, OSError, ValueError) as e:  # no stdin at all (None), or its descriptor closed
            raise GPT2Error("standard input is closed: pipe the text into the command, or name files to score") from e
    try:
        return open(name, encoding="utf-8")
    except OSError as e:
        raise GPT2Error(f"cannot read {name}: {e.strerror}") from e


def open_output(output):
    """The file --output, open for writes that go straight to the file (no buffer that a killed run would lose)."""
    return open(output, "wb", buffering=0)


class OutputFile:
    """The file --output, written a whole record at a time.

    A killed run leaves whole records. A write that the system takes only in part is completed, and
    one that fails (a full disk) is rolled back to the end of the last whole record before its
    OSError, with the file's name, is raised.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self._file = open_output(path)
        except OSError as e:
            raise GPT2Error(f"cannot write --output {path}: {e.strerror}") from e
        self._whole = 0  # bytes of whole records: the file's length between two writes

    def write(self, record):
        rest = memoryview(record)
        try:
            while rest:
                rest = rest[self._file.write(rest):]
        except OSError as e:
            with contextlib.suppress(OSError):  # not a regular file (a pipe, /dev/full): nothing to take back
                self._file.truncate(self._whole)
                self._file.seek(self._whole)
            raise OSError(e.errno, e.strerror, self.path) from e
        self._whole += len(record)

    def close(self):
        self._file.close()


@contextlib.contextmanager
def writing(done):
    """Writes to --output or stdout: an OSError (a full disk) becomes one line that says what was
    written whole before it (`done`: "3 complete samples", or "" for nothing worth counting)."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(write_failure(e, done)) from e


def write_failure(error, done):
    """The message for an OSError of a write to --output or stdout, after `done` was written whole."""
    where = error.filename or "standard output"
    after = f" after {done}" if done else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full{after} (writing {where}): free some space and run again"
    return f"cannot write {where}{after}: {error.strerror}"


def stdout_is_broken():
    """Whether stdout cannot take what is buffered for it (a full disk). If so it is pointed at
    /dev/null, so that Python's own flush at exit does not end the command with a traceback."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        with contextlib.suppress(OSError, ValueError):  # a replacement stream may have no file descriptor
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return True


def score_summary(summary):
    """tokens, bytes, nll (nats per token), perplexity and bits per byte of a file's summed log-probabilities."""
    nll = -summary["logprob"] / summary["tokens"]
    return {"file": summary["file"], "tokens": summary["tokens"], "bytes": summary["bytes"], "nll": nll,
            "perplexity": math.exp(nll), "bits_per_byte": -summary["logprob"] / math.log(2) / summary["bytes"]}


def score_line(summary):
    s = score_summary(summary)
    return (f"{s['file']}: {s['tokens']} tokens, {s['nll']:.4f} nats/token, perplexity {s['perplexity']:.3f}, "
            f"{s['bits_per_byte']:.4f} bits/byte")


def download(*model_names, models_dir=None, base_url=None):
    """Fetch OpenAI's model files into models_dir/<name>/ (124M, 355M, 774M, 1558M; several at once),
    and GPT-2s of the Hugging Face Hub (org/name) into its cache.

    models_dir: where model folders live ($GPT2_MODELS_DIR, else models).
    base_url: where to fetch OpenAI's models from ($GPT2_BASE_URL, else OpenAI's storage); files are under
    <base_url>/models/<name>/. Files already complete are skipped; an interrupted download resumes.
    """
    from .download import check_model_names, download_from_hub, download_model
    from .folders import is_hub_name

    hub_names = [str(name) for name in model_names if "/" in str(name) and is_hub_name(name)]
    openai_names = [name for name in model_names if str(name) not in hub_names]
    for name in (check_model_names(openai_names) if openai_names or not hub_names else []) + hub_names:
        try:
            model_dir = download_from_hub(name) if name in hub_names else download_model(name, models_dir, base_url)
        except KeyboardInterrupt as e:
            raise Interrupted("interrupted: rerun the same command to resume the download") from e
        print(f"{name}: complete in {model_dir}")


def serve(model_name="124M", models_dir=None, dtype="float32", host="127.0.0.1", port=8000, max_batch=8, max_queue=64,
          max_body=1_000_000, timeout=600, drain_seconds=10, api_key=None, step_seconds=0.25):
    """Serve a model over HTTP with OpenAI's completions API (docs/server.md), until SIGTERM or Ctrl-C.

    model_name: 124M, 355M, 774M, 1558M, a model folder in models_dir ($GPT2_MODELS_DIR, else models) or
    at that path, or a GPT-2 of the Hugging Face Hub (org/name).
    dtype: float32, float16, bfloat16, or int8 (a quarter of the memory, faster on a CPU).
    host: the address to listen on: 127.0.0.1 (this machine only) unless you mean it, such as 0.0.0.0.
    port: the TCP port (0: any free one, shown at start).
    max_batch: choices decoded at once (the engine's rows); more requests wait for a row.
    max_queue: requests that may wait for a row; beyond them the server answers 429.
    max_body: the largest request body, in bytes (413 beyond it).
    timeout: seconds a request may run; it then ends with the text it has.
    drain_seconds: on SIGTERM or Ctrl-C, how long running requests may go on before the server exits.
    api_key: a key that requests must send as "Authorization: Bearer KEY" ($GPT2_API_KEY); /health stays open.
    step_seconds: about how long one call of the decoding loop runs (it makes that many tokens for every
    row): longer calls share their fixed cost among more tokens, shorter ones stream more evenly and let
    new requests in sooner.
    """
    import socket

    from .arguments import check_text, is_real
    from .folders import MODEL_NAMES, UnknownModel, canonical_name, is_hub_name

    check_model_name(model_name)
    check_dtype(dtype, GENERATION_DTYPES)
    check_text("host", host)
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 <= port < 65536):
        raise ArgumentError(f"{{port}} must be a TCP port, a whole number from 0 to 65535, not {port!r}", "port")
    whole("max_batch", max_batch, 1)
    whole("max_queue", max_queue, 0)
    whole("max_body", max_body, 1)
    for name, value in (("timeout", timeout), ("drain_seconds", drain_seconds), ("step_seconds", step_seconds)):
        if not is_real(value) or not 0 <= value < float("inf") or (name != "drain_seconds" and value == 0):
            raise ArgumentError(f"{{{name}}} must be a number of seconds{' > 0' if name != 'drain_seconds' else ''}, "
                                f"not {value!r}", name)
    api_key = os.environ.get("GPT2_API_KEY") or None if api_key is None else str(api_key)
    try:
        find_model_dir(model_name, models_dir)
    except UnknownModel:
        if canonical_name(model_name) not in MODEL_NAMES and not is_hub_name(model_name):
            raise  # OpenAI's models and the Hub's are fetched where missing

    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as e:
        raise GPT2Error(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None
    port = listening.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    import uvicorn

    from .server import ServerSettings, create_app

    def ready():
        print(f"ready: {model_name} ({dtype}, {max_batch} rows) on {url}/v1/completions", file=sys.stderr, flush=True)

    settings = ServerSettings(str(model_name), max_batch, max_queue, max_body, float(timeout), api_key,
                              float(step_seconds))
    app = create_app(settings, lambda: load_model(model_name, models_dir, dtype), on_ready=ready,
                     on_error=lambda: setattr(server, "should_exit", True))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=drain_seconds))
    print(f"gpt2-serve: loading {model_name}; {url}/health answers 503 until it is ready", file=sys.stderr,
          flush=True)
    # uvicorn stops on SIGINT and SIGTERM (no new requests; running ones go on for drain_seconds),
    # then raises the signal again with the handlers it found: these, which make it a clean exit.
    signals = []
    previous = {number: signal.signal(number, lambda number, frame: signals.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[listening])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if app.state.server.load_error is not None:
        raise app.state.server.load_error
    print(f"gpt2-serve: stopped ({signal.Signals(signals[0]).name if signals else 'done'})", file=sys.stderr)


def pipeline(task=None, input=None, output=None, model_name="124M", models_dir=None, dtype="float32", batch_size=8,
             stride=None, text_field="text", id_field="id", large_model=False, length=None, seed=None, nsamples=1,
             temperature=1, top_k=0, top_p=1, stop=None, truncate_prompt=False, ignore_eot=False, min_p=0.0,
             repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0, frequency_penalty=0.0,
             no_repeat_ngram_size=0, logit_bias=None, bad_words=None, logprobs=None, **beam_options):
    """Score or generate a whole corpus on Apache Beam (docs/pipeline.md): `score` or `generate`.

    score --input GLOB --output PREFIX: each document's tokens, nll, perplexity, bytes and bits
    per byte (as score.py gives them) into PREFIX-SSSSS-of-NNNNN.jsonl, the corpus's totals into
    PREFIX-summary.json. Input: .txt files (one document each, its id the path) and .jsonl files (a
    document a line: text_field, default text, and id_field, default id). stride: as for score.py.
    generate --input PROMPTS.jsonl --output PREFIX: a record per line with `prompt` and any of
    model.generate's arguments (length, seed, nsamples, temperature, top_k, top_p, stop, ...), whose
    defaults are this command's flags of the same names; the samples into PREFIX-SSSSS-of-NNNNN.jsonl,
    each with what reproduces it.
    Records that cannot be used go to PREFIX-errors.jsonl with the reason; the job goes on.
    model_name, models_dir, dtype: the model, as for the other commands. batch_size: windows (or
    samples) computed at once. large_model: one model per machine, shared by its worker processes.
    Every other flag is a Beam pipeline option: --runner (DirectRunner, DataflowRunner,
    FlinkRunner, SparkRunner), --direct_num_workers, --direct_running_mode, Dataflow's --project,
    --region, --temp_location, --requirements_file, ...
    """
    from .arguments import check_stride, must
    from .download import model_folder
    from .folders import read_hparams

    if task not in ("score", "generate"):
        raise ArgumentError("name the task first: `pipeline.py score ...` or `pipeline.py generate ...`", "task")
    for name, value in (("input", input), ("output", output)):
        if not isinstance(value, str) or not value:
            raise must(name, "a path or a glob (" + ("the files to read" if name == "input" else "the prefix of the "
                                                     "files to write, such as out/scores") + ")", value)
    from .beam import GenerateSamples, ScoreDocuments, pipeline_options, run_corpus  # Apache Beam starts here

    options = pipeline_options(beam_options)  # an unknown option is an error before anything starts
    flags = dict(length=length, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                 truncate_prompt=truncate_prompt, ignore_eot=ignore_eot, min_p=min_p,
                 repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                 logit_bias=logit_bias, bad_words=bad_words, logprobs=logprobs)
    check_sampling(length, temperature, top_k, top_p)
    check_seed(seed)
    check_stop(stop)
    check_controls(min_p, repetition_penalty, repeat_last_n, presence_penalty, frequency_penalty,
                   no_repeat_ngram_size, logit_bias, bad_words, logprobs)
    whole("nsamples", nsamples, 1)
    folder = model_folder(model_name, models_dir)  # here too: a bad name is one line, not a failed job
    if task == "score":
        check_stride(stride, read_hparams(folder).n_ctx)
        transform = ScoreDocuments(model_name, models_dir, stride, batch_size, dtype, text_field, id_field, large_model)
    else:
        defaults = {name: value for name, value in {**flags, "nsamples": nsamples}.items() if value is not None}
        transform = GenerateSamples(model_name, models_dir, batch_size, dtype, large_model, **defaults)
    errors, summary = run_corpus(transform, input, output, "prompt" if task == "generate" else text_field, options)
    told = f"; {errors} records could not be used: see {output}-errors.jsonl" if errors else "; no bad records"
    if task == "score":
        s = summary
        print(f"gpt2-pipeline: {s['documents']} documents, {s['tokens']} tokens"
              + (f", perplexity {s['perplexity']:.3f}, {s['bits_per_byte']:.4f} bits/byte" if s["tokens"] else "")
              + f": {output}-*.jsonl, {output}-summary.json{told}", file=sys.stderr)
    else:
        print(f"gpt2-pipeline: samples in {output}-*.jsonl{told}", file=sys.stderr)


def flag_wording(error):
    """A GPT2Error's message as the command line says it: parameter names as flags (--top_p)."""
    return error.worded("--") if isinstance(error, ArgumentError) else str(error)


def check_flag_names(command, argv):
    """Refuse a flag that `command` has no parameter for, before anything is loaded.

    fire reports such a flag only after the command has run ("Could not consume arg"), which for
    `generate_unconditional.py --ouput x` is never. A flag is what fire takes for one: `--name`,
    `--name=value` or `-name` (hyphens in the name read as underscores), up to a lone `--`, after
    which come fire's own flags.
    """
    parameters = inspect.signature(command).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    names = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for argument in argv:
        if argument == "--":
            break
        if not re.match(r"--|-[a-zA-Z]", argument):
            continue
        key = argument.lstrip("-").split("=", 1)[0].replace("-", "_")
        if key in names or (key.startswith("no") and key[2:] in names) or key in ("help", "h"):
            continue  # --noname sets a switch off; --help and -h are fire's
        if len(key) == 1:  # fire's shortcut: the one parameter that starts with this letter
            starting = [name for name in names if name.startswith(key)]
            if len(starting) == 1:
                continue
            if starting:
                raise GPT2Error(f"ambiguous flag -{key}: use one of {', '.join('--' + n for n in starting)}")
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean --{close[0]}?" if close else f"the flags are {', '.join('--' + n for n in names)}"
        raise GPT2Error(f"unknown flag {argument.split('=', 1)[0]}: {hint}")


def without_fire_separator(argv):
    """argv with fire's separator set to one that no argument can hold (a NUL).

    fire reads a lone "-" as the separator between chained calls, which these commands never make:
    `score.py - --model_name tiny` would score no stdin and ignore every flag after the "-". fire's
    own flags go after a final "--".
    """
    if "--" in argv:  # the user's fire flags (-- --help) follow the last one
        at = len(argv) - argv[::-1].index("--")
        return argv[:at] + ["--separator", "\0"] + argv[at:]
    return argv + ["--", "--separator", "\0"]


def run(command, argv=None):
    """Parse flags with fire and run `command`; user errors become one line on stderr.

    Ctrl-C exits with status 130 (128 + SIGINT, as a shell reports a command it interrupted).
    argv None: the process's own command line (the scripts and console commands); the process
    then ends as soon as the command is done.
    """
    whole_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_flag_names(command, argv)
        # Any console encoding: text it cannot show becomes '?', bytes it cannot read become U+FFFD.
        for stream in (sys.stdout, sys.stdin):
            if hasattr(stream, "reconfigure"):  # not every replacement stream (notebooks, pytest) has it
                stream.reconfigure(errors="replace")
        import fire

        if _previous_handler is not None and signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
            signal.signal(signal.SIGINT, _previous_handler)
        fire.Fire(command, command=without_fire_separator(argv), name=os.path.basename(sys.argv[0]))
        sys.stdout.flush()  # what print left in the buffer goes out now, where a failure is still reported
        if whole_process:
            # Everything is written and closed: skip the interpreter's teardown of TensorFlow, which
            # is slow enough to lengthen a short command noticeably.
            sys.stderr.flush()
            os._exit(0)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(130)
    except GPT2Error as e:
        sys.exit(f"error: {flag_wording(e)}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`... | head`): nothing more to say
        sys.stderr.close()
        os._exit(0)
    except OSError as e:
        if not stdout_is_broken():  # not stdout's: a failure nobody foresaw, shown whole
            raise
        sys.exit(f"error: {write_failure(e, '')}")
    finally:
        stdout_is_broken()


def interactive_main(argv=None):
    run(interact_model, argv)


def unconditional_main(argv=None):
    run(sample_model, argv)


def download_main(argv=None):
    run(download, argv)


def score_main(argv=None):
    run(score_files, argv)


def serve_main(argv=None):
    run(serve, argv)


def pipeline_main(argv=None):
    run(pipeline, argv)


def finetune_main(argv=None):
    from .finetuning import finetune

    run(finetune, argv)
