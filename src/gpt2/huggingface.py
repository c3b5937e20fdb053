"""The weights of Hugging Face's GPT-2 folders (safetensors): read them by OpenAI's names, write ours in theirs.

transformers stores OpenAI's weights under other names, in the same layout (its Conv1D keeps a
linear layer's w as [n_in, n_out]):
    model/wte                  transformer.wte.weight
    model/h3/ln_1/g, b         transformer.h.3.ln_1.weight, .bias
    model/h3/attn/c_attn/w, b  transformer.h.3.attn.c_attn.weight, .bias    (and c_proj, mlp.c_fc, mlp.c_proj)
    model/ln_f/g, b            transformer.ln_f.weight, .bias
A bare GPT2Model leaves out the `transformer.` prefix. GPT2LMHeadModel's `lm_head.weight` is wte
again (GPT-2 ties them; save_pretrained leaves it out), and older files keep each block's causal
mask as `attn.bias` / `attn.masked_bias`, which are not weights. Reading and writing use the
safetensors package's NumPy API: no PyTorch. The folder's other files are gpt2.folders' job.
"""
import json
import os
import re

import ml_dtypes  # noqa: F401  (NumPy learns bfloat16, so that safetensors' NumPy API reads bfloat16 files)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .checkpoint import split_name, variable_shapes
from .errors import GPT2Error
from .folders import HUGGINGFACE_CONFIG, SAFETENSORS, SAFETENSORS_INDEX, read_error, safetensors_files

PREFIX = "transformer."
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}  # safetensors' names; each loads as float32
NOT_WEIGHTS = r"h\.\d+\.attn\.(bias|masked_bias)"  # the causal mask, stored by older transformers
TRANSFORMER = r"(wte|wpe|ln_f|h)\..*"  # the transformer's names: one that is not a GPT-2 weight is refused
# transformers' limit for a shard (save_pretrained's max_shard_size); the Hub takes bigger files,
# but downloads and uploads of one file that size are where interruptions hurt.
MAX_SHARD_BYTES = 5 * 10 ** 9


def huggingface_name(name):
    """transformers' name of an OpenAI variable, without the `transformer.` prefix.

    "model/h3/attn/c_attn/w" -> "h.3.attn.c_attn.weight"; "model/wte" -> "wte.weight".
    """
    block, name = split_name(name)
    *path, leaf = name.split("/") if "/" in name else (name, "w")
    return ".".join(([] if block is None else ["h", str(block)]) + path + ["bias" if leaf == "b" else "weight"])


def read_safetensors(model_dir, hparams):
    """Yields (OpenAI name, float32 array) for each weight of the folder's safetensors, in
    variable_shapes' order, after checking that every weight is there with this model's shape and
    nothing else of a transformer is. A linear layer's w comes as [n_in, n_out]."""
    expected = {huggingface_name(name): (name, shape[1:] if len(shape) == 3 else shape)
                for name, shape in variable_shapes(hparams).items()}
    files = {path: opened(path) for path in safetensors_files(model_dir)}  # memory-mapped: read as asked
    stored = {}  # name without the prefix -> (file, name in the file)
    for path, f in files.items():
        for key in f.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name in expected or name == "lm_head.weight":
                check_stored(path, key, f.get_slice(key), expected.get(name, (None, None))[1])
                stored[name] = (path, key)
            elif re.fullmatch(TRANSFORMER, name) and not re.fullmatch(NOT_WEIGHTS, name):
                raise GPT2Error(f"{path} has the weight {key}, which a GPT-2 of {HUGGINGFACE_CONFIG}'s shapes "
                                "does not have: the folder mixes files of different models, fetch it again")
    for name, (openai_name, _) in expected.items():
        if name not in stored:
            raise GPT2Error(f"{model_dir} has no weight {PREFIX}{name} in its safetensors: it is not a whole GPT-2 "
                            f"of {HUGGINGFACE_CONFIG}'s shapes, fetch it again")
    wte = None
    for name, (openai_name, _) in expected.items():
        value = read_tensor(files, *stored[name])
        if name == "wte.weight":
            wte = value
        yield openai_name, value
        del value
    if "lm_head.weight" in stored:
        path, key = stored["lm_head.weight"]
        if not np.array_equal(read_tensor(files, path, key), wte):
            raise GPT2Error(f"{path}: {key} differs from the token embedding (wte): this model has an output layer "
                            "of its own, which gpt2 does not compute (GPT-2 uses wte for both)")


def opened(path):
    try:
        return safe_open(path, framework="numpy")
    except OSError as e:
        raise read_error(path, e) from e
    except (SafetensorError, ValueError) as e:
        raise GPT2Error(f"cannot read {path} ({e}): it is damaged, fetch the model again") from e


def check_stored(path, key, tensor, shape):
    """A GPT2Error where a stored tensor is not a float one of `shape` (None: lm_head, wte's shape)."""
    if tensor.get_dtype() not in FLOAT_DTYPES:
        raise GPT2Error(f"{path}: {key} is stored as {tensor.get_dtype()}: gpt2 reads float32, float16 and bfloat16 "
                        "weights (quantized files are not GPT-2's own)")
    if shape is not None and list(tensor.get_shape()) != list(shape):
        raise GPT2Error(f"{path}: {key} has shape {list(tensor.get_shape())} but {HUGGINGFACE_CONFIG} asks for "
                        f"{list(shape)}: the folder mixes files of different models, fetch it again")


def read_tensor(files, path, key):
    try:
        return files[path].get_tensor(key).astype(np.float32, copy=False)
    except (SafetensorError, ValueError) as e:  # a file cut short
        raise GPT2Error(f"cannot read {key} from {path} ({e}): it is damaged, fetch the model again") from e


def write_safetensors(folder, variables, dtype="float32", max_shard_bytes=MAX_SHARD_BYTES):
    """Write `variables` ({OpenAI name: float32 array}) as transformers' GPT2LMHeadModel does: `transformer.`
    names, model.safetensors, or shards of at most max_shard_bytes with their index beyond that size."""
    tensors = {PREFIX + huggingface_name(name): np.ascontiguousarray(np.squeeze(value, 0) if np.ndim(value) == 3
                                                                     else value).astype(dtype)
               for name, value in variables.items()}
    shards = [{}]
    for name, tensor in tensors.items():
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = tensor
    # transformers refuses a file whose metadata does not say which framework wrote it; "pt" is PyTorch's
    # layout, which these tensors have.
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFETENSORS), metadata)
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def write_config(folder, hparams, eot_token, dtype="float32"):
    """config.json, tokenizer_config.json and generation_config.json as transformers writes them for GPT-2."""
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": hparams.n_vocab,
              "n_positions": hparams.n_ctx, "n_ctx": hparams.n_ctx, "n_embd": hparams.n_embd,
              "n_layer": hparams.n_layer, "n_head": hparams.n_head, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
              "attn_pdrop": 0.1, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
              "bos_token_id": eot_token, "eos_token_id": eot_token, "torch_dtype": dtype}
    end = "<|endoftext|>"
    tokenizer = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": hparams.n_ctx, "bos_token": end,
                 "eos_token": end, "unk_token": end, "add_prefix_space": False, "add_bos_token": False}
    generation = {"bos_token_id": eot_token, "eos_token_id": eot_token}
    for name, values in ((HUGGINGFACE_CONFIG, config), ("tokenizer_config.json", tokenizer),
                         ("generation_config.json", generation)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)
