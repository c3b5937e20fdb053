"""Model folders without TensorFlow: the released models, where folders live, their shapes.

A model folder is in one of two layouts. OpenAI's, exactly as OpenAI publishes it:
    checkpoint, hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001, model.ckpt.meta,
    encoder.json, vocab.bpe
or Hugging Face's, as transformers' `save_pretrained` writes it and the Hub holds it:
    config.json, model.safetensors (or model-0000i-of-0000n.safetensors and their index),
    vocab.json and merges.txt (OpenAI's encoder.json and vocab.bpe under other names), or tokenizer.json
gpt2.checkpoint and gpt2.huggingface read and write the weights; this module knows the rest, so
that downloading and the commands' start-up need no TensorFlow. A folder with both layouts' files
is read as OpenAI's.
"""
import contextlib
import json
import os
import re
import stat
from typing import NamedTuple

from .arguments import ArgumentError, is_whole, must
from .errors import GPT2Error
from .storage import only_writer, remove


class HParams(NamedTuple):  # a NamedTuple: tf.function keys its compiled code on these values
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12


# OpenAI's four released models and their shapes.
OPENAI_HPARAMS = {
    "124M": HParams(n_embd=768, n_head=12, n_layer=12),
    "355M": HParams(n_embd=1024, n_head=16, n_layer=24),
    "774M": HParams(n_embd=1280, n_head=20, n_layer=36),
    "1558M": HParams(n_embd=1600, n_head=25, n_layer=48),
}
MODEL_NAMES = tuple(OPENAI_HPARAMS)
LEGACY_NAMES = {"117M": "124M", "345M": "355M"}  # OpenAI renamed these two in 2019
MODEL_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
               "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
# The files that loading reads (the meta graph and the `checkpoint` pointer are not needed).
REQUIRED_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "encoder.json", "vocab.bpe")
VOCAB_FILES = ("encoder.json", "vocab.bpe")
HUGGINGFACE_CONFIG = "config.json"
CKPT_PREFIX = "model.ckpt"  # OpenAI's checkpoint files' names start so
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"  # beside model-0000i-of-0000n.safetensors, sharded
SAFETENSORS_SHARD = r"model-\d+-of-\d+\.safetensors"
HUGGINGFACE_VOCAB_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"  # the tokenizers library's file: the same vocabulary and merges in one
HUGGINGFACE_FILES = (HUGGINGFACE_CONFIG, SAFETENSORS, SAFETENSORS_INDEX, *HUGGINGFACE_VOCAB_FILES, TOKENIZER_JSON,
                     "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SAVE_FORMATS = ("openai", "huggingface", "both")
TRAINING = "training"  # a fine-tuning run's subfolder: what resuming needs (see gpt2.train)
DOWNLOAD_LOCK = ".download.lock"  # in a model folder while a download works in it
DATASETS = "datasets"  # models_dir's cache of encoded datasets (see gpt2.train)


def default_models_dir():
    """Where model folders live: $GPT2_MODELS_DIR, else ./models as in the original."""
    return os.environ.get("GPT2_MODELS_DIR") or "models"


def canonical_name(model_name):
    """124M for 117M and 355M for 345M; other names unchanged."""
    return LEGACY_NAMES.get(str(model_name), str(model_name))


def check_model_name(model_name):
    """`model_name` as a string, checked not to be empty: an empty name is models_dir itself."""
    if not str(model_name).strip():
        raise must("model_name", f"one of {', '.join(MODEL_NAMES)} or the name of a model folder", model_name)
    return str(model_name)


class UnknownModel(GPT2Error):
    """No folder of that name: not downloaded yet, a name of the Hugging Face Hub, or a typo."""


def find_model_dir(model_name, models_dir=None):
    """The folder of `model_name`, checked to hold the files loading needs (an UnknownModel where there is none).

    `model_name` is one of OpenAI's names (legacy names accepted), any folder in `models_dir` (such
    as a fine-tuned model), or the path of a model folder elsewhere.
    """
    models_dir = models_dir or default_models_dir()
    model_name = check_model_name(model_name)
    path = os.path.join(models_dir, model_name)
    if not os.path.isdir(path):
        path = os.path.join(models_dir, canonical_name(model_name))
    if not os.path.isdir(path) and leftovers(path):  # a save killed between its two renames, say
        with contextlib.suppress(GPT2Error):  # another process writes it, or the folder is read-only
            with writing(path):  # which puts the newest save back
                pass
    if not os.path.isdir(path) and os.path.isdir(model_name):
        path = model_name
    if not os.path.isdir(path):
        if canonical_name(model_name) in MODEL_NAMES:
            raise UnknownModel(f"model {model_name} is not in {models_dir}: "
                               f"run `python download_model.py {canonical_name(model_name)}` to fetch it")
        raise UnknownModel(f"unknown model {model_name!r}: use one of {', '.join(MODEL_NAMES)}, the name of a model "
                           f"folder in {models_dir}, or a GPT-2 of the Hugging Face Hub "
                           "(such as openai-community/gpt2)")
    missing = missing_files(path)
    if missing:
        if folder_format(path) == "huggingface":
            torch_only = is_file(path, "pytorch_model.bin") and not is_file(path, SAFETENSORS_INDEX)
            raise GPT2Error(f"{path} is missing {' and '.join(missing)}" + (
                ": it has PyTorch's pytorch_model.bin only, and gpt2 reads safetensors (save it again with "
                "transformers' save_pretrained, which writes model.safetensors)" if torch_only
                else ": it is not a whole Hugging Face GPT-2 folder, fetch it again"))
        raise GPT2Error(f"{path} is missing {', '.join(missing)}: download the model again "
                        f"(`python download_model.py {model_name}`)")
    return path


def folder_format(folder):
    """"openai" (hparams.json), "huggingface" (config.json), or None for a folder of neither."""
    if is_file(folder, "hparams.json"):
        return "openai"
    return "huggingface" if is_file(folder, HUGGINGFACE_CONFIG) else None


def missing_files(folder):
    """What loading needs that the folder lacks, by its layout (see folder_format); [] when nothing."""
    layout = folder_format(folder)
    if layout == "openai":
        return [name for name in REQUIRED_FILES if not is_file(folder, name)]
    if layout is None:
        return ["hparams.json (OpenAI's layout) or config.json (Hugging Face's)"]
    missing = []
    if not (is_file(folder, SAFETENSORS) or is_file(folder, SAFETENSORS_INDEX)):
        missing.append(SAFETENSORS)
    if not (all(is_file(folder, name) for name in HUGGINGFACE_VOCAB_FILES) or is_file(folder, TOKENIZER_JSON)):
        missing.append(f"{' and '.join(HUGGINGFACE_VOCAB_FILES)} (or {TOKENIZER_JSON})")
    return missing


HUB_NAME = r"([\w.-]+/)?[\w.-]+"  # "org/name", or the older names of a single part ("distilgpt2")


def is_hub_name(model_name):
    """Whether `model_name` could name a model of the Hugging Face Hub (and not one of OpenAI's)."""
    name = str(model_name)
    return (bool(re.fullmatch(HUB_NAME, name)) and ".." not in name and "--" not in name and len(name) <= 96
            and canonical_name(name) not in MODEL_NAMES)


def run_folder(models_dir, run_name):
    """The folder models_dir/run_name, checked to lie inside models_dir: not models_dir itself, not
    above it, not its dataset cache."""
    relative = os.path.normpath(str(run_name)) if str(run_name).strip() else "."
    if os.path.isabs(relative) or relative == "." or relative.split(os.sep)[0] == "..":
        raise must("run_name", "the name of a folder inside models_dir (say run1)", run_name)
    if relative == DATASETS:
        raise ArgumentError(f"{{run_name}} {DATASETS} is the folder of encoded datasets, not a model: "
                            "choose another {run_name}", "run_name")
    return os.path.join(models_dir, relative)


def is_run(folder):
    """Whether `folder` is a fine-tuning run (what resuming needs is in it)."""
    return os.path.isfile(os.path.join(folder, TRAINING, "state.npz"))


def foreign_files(folder):
    """The names in `folder` that no model folder holds (its files, a run's training/ folder, a
    download's lock and parts): what replacing `folder` would delete of someone else's. [] for a
    missing or empty folder; [its name] for a file."""
    if not os.path.lexists(folder):
        return []
    if not os.path.isdir(folder):
        return [os.path.basename(folder)]
    ours = {*MODEL_FILES, *HUGGINGFACE_FILES, TRAINING, DOWNLOAD_LOCK, *(f"{name}.part" for name in MODEL_FILES)}
    return sorted(name for name in set(os.listdir(folder)) - ours if not re.fullmatch(SAFETENSORS_SHARD, name))


def check_replaceable(folder, name):
    """An ArgumentError (about the parameter `name`) where writing a model to `folder` would
    replace files that are not a model's."""
    foreign = foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArgumentError(f"{folder} holds files that are not a model's ({shown}), which saving there would "
                            f"delete: choose another {{{name}}}, or move them away", name)


@contextlib.contextmanager
def writing(folder):
    """Hold the lock of the model folder `folder` while the block writes it (gpt2.storage.only_writer),
    after repairing what a writer killed before left (recover_folder)."""
    with only_writer(folder):
        recover_folder(folder)
        yield


LEFTOVER = r"\.(writing|old)-\d+"  # after a folder's name: gpt2.storage.replace_folder's temporary names


def recover_folder(folder):
    """Undo what a writer of `folder` killed while saving left beside it (the caller holds its lock,
    so every such folder is a dead writer's): where `folder` is missing, killed between the two
    renames of replace_folder, the newest complete save takes its place; then the other leftovers
    are removed. Only folders of a model's files are taken or removed: a user's own are left."""
    found = leftovers(folder)
    olds = [path for path, kind in found.items() if kind == "old"]
    if olds and not os.path.exists(folder):
        # an `old` is left only once its process's `writing` was complete: that one is the newest save
        newest = olds[0].rsplit(".old-", 1)[0] + ".writing-" + olds[0].rsplit("-", 1)[1]
        newest = newest if newest in found else olds[0]
        try:
            os.rename(newest, folder)
        except OSError as e:  # nothing is removed then: the save stays where it is
            raise GPT2Error(f"cannot move the last save {newest} back to {folder} ({e.strerror}): move it there "
                            "yourself") from e
    for path in found:
        remove(path)


def leftovers(folder):
    """{path: "writing" or "old"} of the folders of a model's files that replace_folder's writers left
    beside `folder`, newest first."""
    parent, name = os.path.split(os.path.abspath(folder))
    try:
        names = os.listdir(parent)
    except OSError:
        return {}
    found = {}
    for other in names:
        match = re.fullmatch(re.escape(name) + LEFTOVER, other)
        if match and not foreign_files(os.path.join(parent, other)):
            found[os.path.join(parent, other)] = match.group(1)
    return dict(sorted(found.items(), key=lambda item: -os.path.getmtime(item[0])))


# Which files hold a folder's weights (gpt2.int8 reads their sizes and times without TensorFlow).

def checkpoint_files(model_dir):
    """The paths of the folder's checkpoint: its index and its data."""
    prefix = os.path.join(model_dir, CKPT_PREFIX)
    return prefix + ".index", prefix + ".data-00000-of-00001"


def safetensors_files(model_dir):
    """The folder's weight files: model.safetensors, or the shards that its index names."""
    if is_file(model_dir, SAFETENSORS) or not is_file(model_dir, SAFETENSORS_INDEX):
        return [os.path.join(model_dir, SAFETENSORS)]
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    values = read_json(index)
    weight_map = values.get("weight_map") if isinstance(values, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise GPT2Error(f"{index} is damaged (it has no weight_map of names to files): fetch the model again")
    return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]


def weight_files(model_dir):
    """The paths of the files that the folder's weights are read from."""
    if folder_format(model_dir) == "huggingface":
        return safetensors_files(model_dir)
    return list(checkpoint_files(model_dir))


def is_file(folder, name):
    """Whether folder/name is a file; a folder that cannot be searched is an error, not a missing file."""
    try:
        return stat.S_ISREG(os.stat(os.path.join(folder, name)).st_mode)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise read_error(folder, e) from e


def read_error(path, error):
    """The GPT2Error for `path` that could not be read (an OSError): what is wrong and what to do.

    Only a missing file calls for a new download; permissions are the user's to fix.
    """
    if isinstance(error, FileNotFoundError):
        return GPT2Error(f"{path} is missing: download the model again")
    if isinstance(error, PermissionError):
        return GPT2Error(f"cannot read {path}: permission denied (check its owner and permissions)")
    return GPT2Error(f"cannot read {path}: {error.strerror or error}")


def read_hparams(model_dir):
    """The HParams of a model folder, from its hparams.json or config.json: every field a whole number >= 1."""
    if folder_format(model_dir) == "huggingface":
        path, hparams = read_config(model_dir)
    else:
        path = os.path.join(model_dir, "hparams.json")
        values = read_json(path)
        try:
            hparams = HParams(**{name: values[name] for name in HParams._fields})
        except (KeyError, TypeError) as e:
            raise GPT2Error(f"{path} is damaged ({e.__class__.__name__}: {e}): download the model again") from e
    for name, value in hparams._asdict().items():
        if not is_whole(value) or value < 1:
            raise GPT2Error(f"{path} is damaged: {name} is {value!r}, not a whole number of at least 1")
    if hparams.n_embd % hparams.n_head:
        raise GPT2Error(f"{path} is damaged: n_embd {hparams.n_embd} is not a multiple of n_head {hparams.n_head}")
    return hparams


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise read_error(path, e) from e
    except ValueError as e:
        raise GPT2Error(f"{path} is damaged ({e.__class__.__name__}: {e}): download the model again") from e


# transformers' GPT2Config: what a config.json that leaves a field out means by it.
CONFIG_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                   "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                   "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "reorder_and_upcast_attn": False, "add_cross_attention": False}
# "gelu_pytorch_tanh" is PyTorch's own kernel for the same tanh approximation as OpenAI's "gelu_new".
GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")


def read_config(model_dir):
    """(path, HParams) of a Hugging Face folder's config.json; a one-line GPT2Error for a model that
    is not GPT-2 or has an option that gpt2 does not compute."""
    path = os.path.join(model_dir, HUGGINGFACE_CONFIG)
    values = read_json(path)
    if not isinstance(values, dict):
        raise GPT2Error(f"{path} is damaged (not a JSON object): fetch the model again")
    if values.get("model_type") != "gpt2":
        raise GPT2Error(f"{path} describes a {values.get('model_type')!r} model, not GPT-2 (model_type 'gpt2'): "
                        "gpt2 runs GPT-2's architecture only")
    config = {**CONFIG_DEFAULTS, **values}
    refused = {
        "activation_function": config["activation_function"] not in GELU_NAMES,
        "layer_norm_epsilon": config["layer_norm_epsilon"] != 1e-5,
        "n_inner": config["n_inner"] not in (None, 4 * config["n_embd"]),
        "scale_attn_weights": config["scale_attn_weights"] is not True,
        "scale_attn_by_inverse_layer_idx": config["scale_attn_by_inverse_layer_idx"] is not False,
        "reorder_and_upcast_attn": config["reorder_and_upcast_attn"] is not False,
        "add_cross_attention": config["add_cross_attention"] is not False,
    }
    for name, is_refused in refused.items():
        if is_refused:
            raise GPT2Error(f"{path} sets {name} to {config[name]!r}, which gpt2 does not compute: it runs GPT-2 as "
                            f"OpenAI made it ({name} {CONFIG_DEFAULTS[name]!r}"
                            + (" or 4 x n_embd)" if name == "n_inner" else ")"))
    return path, HParams(n_vocab=config["vocab_size"], n_ctx=config["n_positions"], n_embd=config["n_embd"],
                         n_head=config["n_head"], n_layer=config["n_layer"])


def write_hparams(model_dir, hparams):
    with open(os.path.join(model_dir, "hparams.json"), "w", encoding="utf-8") as f:
        json.dump(hparams._asdict(), f, indent=2)
