"""What the commands do. The top-level scripts and the console commands only hand their flags here.

The flags keep the names and meaning of OpenAI's scripts: model_name, seed, nsamples, batch_size,
length, temperature, top_k, top_p, models_dir.
"""
import os
import random
import sys


def start_tensorflow_quietly():
    """Import TensorFlow and find its devices with stderr silenced.

    Its C++ start-up log lines (CUDA probing on a machine without a GPU, CPU features) are noise
    to someone generating text; errors after start-up are still shown.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


start_tensorflow_quietly()

import fire  # noqa: E402

from .checkpoint import MODEL_NAMES, canonical_name, default_models_dir, find_model_dir, load_params, read_hparams  # noqa: E402,E501
from .download import check_model_names, download_model  # noqa: E402
from .encoder import read_encoder  # noqa: E402
from .errors import GPT2Error  # noqa: E402
from .sample import check_length, check_sampling_flags, fit_context, sample  # noqa: E402

PROMPT = "Model prompt >>> "


def banner(n):
    return "=" * 40 + " SAMPLE " + str(n) + " " + "=" * 40


def check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GPT2Error(f"--{name} must be a whole number of at least {minimum}, not {value!r}")


def check_flags(nsamples, batch_size, seed, length, temperature, top_k, top_p, unconditional=False):
    """The seed to use, after checking every flag; a GPT2Error names the first bad one."""
    check_count("nsamples", nsamples, 0 if unconditional else 1)
    check_count("batch_size", batch_size, 1)
    if nsamples % batch_size:
        raise GPT2Error(f"--nsamples ({nsamples}) must be a multiple of --batch_size ({batch_size})")
    check_sampling_flags(1 if length is None else length, temperature, top_k, top_p)
    if seed is None:
        return random.SystemRandom().randrange(2 ** 31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 63:
        raise GPT2Error(f"--seed must be a whole number, not {seed!r}")
    return seed


def load_model(model_name, models_dir, base_url=None):
    """(hparams, params, encoder) of a model folder; one of OpenAI's models is fetched if missing."""
    models_dir = models_dir or default_models_dir()
    try:
        model_dir = find_model_dir(model_name, models_dir)
    except GPT2Error:
        if canonical_name(model_name) not in MODEL_NAMES:
            raise
        print(f"Fetching model {canonical_name(model_name)} into {models_dir} (only this once)", file=sys.stderr)
        download_model(model_name, models_dir, base_url)
        model_dir = find_model_dir(model_name, models_dir)
    hparams = read_hparams(model_dir)
    encoder = read_encoder(model_dir)
    if encoder.n_vocab != hparams.n_vocab:
        raise GPT2Error(f"{model_dir}: encoder.json has {encoder.n_vocab} tokens but hparams.json says "
                        f"{hparams.n_vocab}: download the model again")
    return hparams, load_params(model_dir, hparams), encoder


def interact_model(model_name="124M", seed=None, nsamples=1, batch_size=1, length=None, temperature=1, top_k=0,
                   top_p=1, models_dir=None, truncate_prompt=False, ignore_eot=False):
    """Continue each prompt typed (or piped) in, until end of input.

    model_name: 124M, 355M, 774M, 1558M, or a model folder in models_dir.
    seed: a whole number; the same seed and flags give the same samples. None: a new one each run.
    nsamples: samples per prompt; batch_size: samples computed at once (nsamples must be a multiple).
    length: new tokens per sample; None: half the model's context (n_ctx // 2).
    temperature: 1 samples as trained, lower is more predictable, 0 always takes the likeliest token.
    top_k: sample from the k likeliest tokens only; 0 turns it off.
    top_p: sample from the smallest set of likeliest tokens whose probability reaches top_p; 1 turns it off.
    models_dir: the folder of model folders ($GPT2_MODELS_DIR, else models).
    truncate_prompt: keep only the last tokens of a prompt too long for the context, instead of an error.
    ignore_eot: go on past <|endoftext|> instead of ending the sample there.
    """
    seed = check_flags(nsamples, batch_size, seed, length, temperature, top_k, top_p)
    hparams, params, encoder = load_model(model_name, models_dir)
    length = hparams.n_ctx // 2 if length is None else length
    check_length(length, hparams.n_ctx)
    stop_token = None if ignore_eot else encoder.eot_token
    stream = 0
    while True:
        try:
            raw_text = input(PROMPT)
            while not raw_text:
                print("Prompt should not be empty!")
                raw_text = input(PROMPT)
        except EOFError:
            print()
            return
        try:
            context = fit_context(encoder.encode(raw_text), length, hparams.n_ctx, truncate_prompt)
        except GPT2Error as e:
            print(f"error: {e}")
            continue
        generated = 0
        for _ in range(nsamples // batch_size):
            rows = sample(params, hparams, context, length, batch_size=batch_size, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stream=stream, stop_token=stop_token)
            stream += 1
            for row in rows:
                generated += 1
                print(banner(generated))
                print(encoder.decode(row), flush=True)
        print("=" * 80)


def sample_model(model_name="124M", seed=None, nsamples=0, batch_size=1, length=None, temperature=1, top_k=0,
                 top_p=1, models_dir=None, output=None, ignore_eot=False):
    """Write unconditional samples (text that starts from <|endoftext|>) to stdout.

    nsamples: how many samples; 0 goes on until interrupted. length: new tokens per sample;
    None: the model's whole context (n_ctx). output: also write the samples to this file.
    The other flags are as for generate_interactive.py.
    """
    seed = check_flags(nsamples, batch_size, seed, length, temperature, top_k, top_p, unconditional=True)
    hparams, params, encoder = load_model(model_name, models_dir)
    length = hparams.n_ctx if length is None else length
    context = fit_context([encoder.eot_token], length, hparams.n_ctx)
    stop_token = None if ignore_eot else encoder.eot_token
    out_file = open(output, "w", encoding="utf-8") if output else None
    try:
        generated, stream = 0, 0
        while nsamples == 0 or generated < nsamples:
            rows = sample(params, hparams, context, length, batch_size=batch_size, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stream=stream, stop_token=stop_token)
            stream += 1
            for row in rows:
                generated += 1
                text = banner(generated) + "\n" + encoder.decode(row) + "\n"
                print(text, end="", flush=True)
                if out_file:
                    out_file.write(text)
                    out_file.flush()
    finally:
        if out_file:
            out_file.close()


def download(*model_names, models_dir=None, base_url=None):
    """Fetch OpenAI's model files into models_dir/<name>/ (124M, 355M, 774M, 1558M; several at once).

    models_dir: where model folders live ($GPT2_MODELS_DIR, else models).
    base_url: where to fetch from ($GPT2_BASE_URL, else OpenAI's storage); files are under
    <base_url>/models/<name>/. Files already complete are skipped; an interrupted download resumes.
    """
    for name in check_model_names(model_names):
        try:
            model_dir = download_model(name, models_dir, base_url)
        except KeyboardInterrupt:
            raise GPT2Error("interrupted: rerun the same command to resume the download") from None
        print(f"{name}: complete in {model_dir}")


def run(command, argv=None):
    """Parse flags with fire and run `command`; user errors become one line on stderr."""
    sys.stdout.reconfigure(errors="replace")  # any console encoding: unprintable text becomes '?'
    try:
        fire.Fire(command, command=argv, name=os.path.basename(sys.argv[0]))
    except GPT2Error as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def interactive_main(argv=None):
    run(interact_model, argv)


def unconditional_main(argv=None):
    run(sample_model, argv)


def download_main(argv=None):
    run(download, argv)
