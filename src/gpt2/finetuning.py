"""`gpt2.finetune` and the `finetune.py` command: the run's settings, checked before TensorFlow starts.

gpt2.train does the work; this module holds what a user passes, with its defaults, so that the
command line reads and checks its flags (and answers --help) without loading anything.
"""
import math
from typing import NamedTuple, Optional

from .arguments import TRAINING_STRATEGIES, ArgumentError, check_dtype, check_seed, check_strategy, is_real, must, whole
from .folders import SAVE_FORMATS, default_models_dir, missing_files, run_folder

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")


class Settings(NamedTuple):
    """A fine-tuning run's settings: the arguments of `finetune` (see its docstring)."""
    dataset: str
    model_name: str
    run_name: str
    models_dir: Optional[str]
    steps: int
    batch_size: int
    sequence_length: Optional[int]
    accumulate_gradients: int
    learning_rate: float
    warmup_steps: int
    decay_steps: int
    optimizer: str
    weight_decay: float
    clip_norm: float
    seed: int
    save_every: int
    sample_every: int
    sample_prompt: Optional[str]
    sample_length: int
    val_dataset: Optional[str]
    val_fraction: float
    val_every: int
    val_tokens: int
    keep_best: bool
    restore_from: str
    overwrite: bool
    csv_column: str
    base_url: Optional[str]
    progress: bool
    recompute: bool
    dtype: str
    only_train_transformer_layers: bool
    lora_rank: Optional[int]
    save_format: str
    strategy: object  # one of TRAINING_STRATEGIES, or a tf.distribute.Strategy


def finetune(dataset=None, model_name="124M", run_name="run1", models_dir=None, steps=1000, batch_size=1,
             sequence_length=None, accumulate_gradients=1, learning_rate=1e-4, warmup_steps=10, decay_steps=0,
             optimizer="adamw", weight_decay=0.01, clip_norm=1.0, seed=0, save_every=500, sample_every=0,
             sample_prompt=None, sample_length=64, val_dataset=None, val_fraction=0.0, val_every=0, val_tokens=8192,
             keep_best=False, restore_from="latest", overwrite=False, csv_column="text", base_url=None, progress=True,
             recompute=False, dtype="float32", only_train_transformer_layers=False, lora_rank=None, save_format="openai",
             strategy="auto"):
    """Fine-tune GPT-2 on your own text into the model folder models_dir/run_name; returns its path.

    dataset: a .txt, .csv or .jsonl file, a folder or glob of them, or a .tokens file written by an
    earlier run (documents are joined with <|endoftext|>; encoded once, cached in models_dir/datasets).
    model_name: the model to start from (fetched on first use): one of OpenAI's, a model folder, or
    a GPT-2 of the Hugging Face Hub (org/name); run_name: the run's folder name, which every script
    then loads as --model_name run_name.
    steps: how many steps THIS call trains. Rerunning the same command resumes the run from its last
    save and trains `steps` more (restore_from latest); restore_from fresh starts again from
    model_name; restore_from PATH starts from the model folder PATH.
    batch_size, sequence_length (default: the model's context), accumulate_gradients: each step
    averages the gradients of accumulate_gradients batches of batch_size windows of sequence_length
    tokens drawn at random from the dataset.
    learning_rate, warmup_steps (linear warm-up), decay_steps (0: constant after warm-up; else a
    cosine down to a tenth at that step), optimizer (adamw, adam, sgd, adafactor), weight_decay
    (adamw), clip_norm (the gradients' global norm is cut to it; 0: no clipping), seed (the same
    seed and data give the same run).
    save_every: save every N steps (0: only at the end and on Ctrl-C, which saves and stops).
    save_format: the run folder's layout: openai (OpenAI's checkpoint), huggingface (safetensors,
    which transformers loads and the Hub takes), or both in one folder.
    sample_every: print a sample every N steps, sample_length tokens from sample_prompt (default:
    the first line of the validation text, else of the training text).
    val_dataset or val_fraction (the last part of the dataset held out), val_every (steps),
    val_tokens (how many validation tokens are scored): validation loss and perplexity;
    keep_best: also save the best run so far as `models_dir/<run_name>_best`.
    overwrite: allow run_name to replace a model folder that is not a fine-tuning run. A run never
    replaces a folder that holds other files than a model's, and run_name must name a folder
    inside models_dir. One process at a time trains a run: a second is refused with one line.
    csv_column: the text column of .csv datasets. base_url: where to fetch model_name from.

    Less memory (docs/finetuning.md says what each saves): recompute (each block's activations are
    computed again in the backward pass instead of kept: a third more computation); dtype
    bfloat16 or float16 (computed in it from float32 weights; float16 with dynamic loss scaling);
    optimizer sgd or adafactor (less optimizer state than Adam's two numbers per weight);
    only_train_transformer_layers (wte, wpe and ln_f frozen); lora_rank R (low-rank adapters of
    rank R on every block's linear layers train alone; the saved folder holds them merged into
    the weights). A run resumes with the optimizer, lora_rank and only_train_transformer_layers
    it started with.

    strategy: the devices that train (tf.distribute): auto (a TPU if one is found, else the
    machines listed by TF_CONFIG, else all of this machine's GPUs if it has several, else one
    device), one, mirrored (this machine's GPUs), multiworker (the machines of TF_CONFIG), tpu, or
    any tf.distribute.Strategy. Each step's batch_size windows are split evenly across the
    replicas (batch_size must be a multiple of their number) and the loss is their mean over the
    whole batch, so a step gives the weights that one device would; a run may resume on another
    number of devices. With several machines, worker 0 (or the chief) writes the run.
    """
    settings = Settings(**{name: value for name, value in locals().items() if name in Settings._fields})
    check(settings)
    from . import tensorflow_start  # noqa: F401  (TensorFlow starts here, quietly, with its compilation cache)
    from .train import run

    return run(settings)


def check(settings):
    """A GPT2Error naming the first impossible setting."""
    if settings.dataset is None:
        raise must("dataset", "the text to train on (a file, a folder or a glob)", None)
    for name, minimum in (("steps", 1), ("batch_size", 1), ("accumulate_gradients", 1), ("warmup_steps", 0),
                          ("decay_steps", 0), ("save_every", 0), ("sample_every", 0), ("sample_length", 1),
                          ("val_every", 0), ("val_tokens", 2)):
        whole(name, getattr(settings, name), minimum)
    if settings.sequence_length is not None:
        whole("sequence_length", settings.sequence_length, 2)
    check_seed(settings.seed)
    for name in ("learning_rate", "weight_decay", "clip_norm"):
        value = getattr(settings, name)
        if not is_real(value) or not 0 <= value < math.inf:
            raise must(name, "a number >= 0", value)
    if not is_real(settings.val_fraction) or not 0 <= settings.val_fraction < 1:
        raise must("val_fraction", "a number in [0, 1)", settings.val_fraction)
    if settings.optimizer not in OPTIMIZERS:
        raise must("optimizer", f"one of {', '.join(OPTIMIZERS)}", settings.optimizer)
    for name in ("recompute", "only_train_transformer_layers"):
        if not isinstance(getattr(settings, name), bool):
            raise must(name, "True or False", getattr(settings, name))
    check_dtype(settings.dtype)
    if settings.lora_rank is not None:
        whole("lora_rank", settings.lora_rank, 1)
        if settings.only_train_transformer_layers:
            raise ArgumentError("{lora_rank} trains the adapters alone: leave out {only_train_transformer_layers}",
                                "lora_rank", "only_train_transformer_layers")
    check_strategy(settings.strategy, TRAINING_STRATEGIES)
    if settings.save_format not in SAVE_FORMATS:
        raise must("save_format", f"one of {', '.join(SAVE_FORMATS)}", settings.save_format)
    if settings.restore_from not in ("latest", "fresh"):
        folder = str(settings.restore_from)
        missing = missing_files(folder)
        if missing:
            raise ArgumentError(f"{{restore_from}} must be latest, fresh, or a model folder, and "
                                f"{settings.restore_from!r} is none: it has no {', '.join(missing)}", "restore_from")
    run_folder(settings.models_dir or default_models_dir(), settings.run_name)
