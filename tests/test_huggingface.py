"""Hugging Face's GPT-2 folders: loaded as OpenAI's folder of the same weights is, written as transformers
writes them, fetched by Hub name from huggingface_hub's cache. No PyTorch, no network."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import gpt2
from gpt2.errors import GPT2Error
from gpt2.model import forward, logits
from gpt2.testing import FakeHub, make_model_folder
from gpt2.train import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The river ran past the mill, and it was"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """models/openai and models/huggingface: the same tiny model (same seed, same vocabulary) in both layouts."""
    models_dir = tmp_path_factory.mktemp("models")
    make_model_folder(models_dir / "openai")
    make_model_folder(models_dir / "huggingface", layout="huggingface")
    return models_dir


@pytest.fixture(scope="module")
def openai_model(models_dir):
    return gpt2.load("openai", str(models_dir))


def full_logits(model, text):
    tokens = tf.constant([model.encode(text)])
    return logits(model.params, forward(model.params, model.hparams, tokens))[0].numpy()


def assert_same_params(model, other, dtype=np.float32):
    """Every weight of `other` equals `model`'s, rounded through `dtype` (as stored in other's file)."""
    assert model.hparams == other.hparams
    for mine, theirs in zip(tf.nest.flatten(model.params), tf.nest.flatten(other.params)):
        np.testing.assert_array_equal(np.asarray(mine).astype(dtype).astype(np.float32), np.asarray(theirs))


def test_a_huggingface_folder_gives_what_the_openai_folder_of_the_same_weights_gives(models_dir, openai_model):
    model = gpt2.load("huggingface", str(models_dir))
    assert_same_params(openai_model, model)
    np.testing.assert_array_equal(full_logits(model, PROMPT), full_logits(openai_model, PROMPT))
    assert model.generate(PROMPT, 20, temperature=0) == openai_model.generate(PROMPT, 20, temperature=0)
    assert model.generate(PROMPT, 20, seed=3, top_k=40) == openai_model.generate(PROMPT, 20, seed=3, top_k=40)
    scores = model.score(PROMPT * 3), openai_model.score(PROMPT * 3)
    np.testing.assert_array_equal(scores[0].tokens, scores[1].tokens)
    np.testing.assert_array_equal(scores[0].logprobs, scores[1].logprobs)


def rewrite(path, change):
    """Write the safetensors file `path` again with change(tensors) ({name: array} -> {name: array})."""
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


def without_prefix(tensors):  # a bare GPT2Model's names, as in the Hub's openai-community/gpt2
    return {name.removeprefix("transformer."): value for name, value in tensors.items()}


def with_buffers_and_lm_head(tensors):  # older transformers kept the causal mask and the tied lm_head
    n_ctx = 128
    mask = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
    buffers = {f"transformer.h.{i}.attn.{name}": mask for i in range(2) for name in ("bias", "masked_bias")}
    return {**tensors, **buffers, "lm_head.weight": tensors["transformer.wte.weight"]}


def tokenizer_json_only(folder, pairs):
    """Replace vocab.json and merges.txt by a tokenizer.json of the tokenizers library (merges as pairs, as
    newer files have them, or as "left right" strings, as older ones)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [line.split(" ") for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line]
    tokenizer = {"version": "1.0", "added_tokens": [{"id": len(vocab) - 1, "content": "<|endoftext|>",
                                                     "special": True}],
                 "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
                 "model": {"type": "BPE", "vocab": vocab, "merges": merges if pairs else [" ".join(m) for m in merges]}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()


@pytest.mark.parametrize("variant, dtype", [
    ("without the transformer. prefix", np.float32),
    ("with the causal-mask buffers and a tied lm_head", np.float32),
    ("float16", np.float16),
    ("bfloat16", "bfloat16"),
    ("sharded in 5 files", np.float32),
    ("tokenizer.json with merges as pairs", np.float32),
    ("tokenizer.json with merges as strings", np.float32),
])
def test_each_way_transformers_stores_gpt2_loads_the_same_model(models_dir, openai_model, tmp_path, variant, dtype):
    folder = tmp_path / "model"
    if variant in ("float16", "bfloat16"):
        make_model_folder(folder, layout="huggingface", dtype=variant)
    elif variant.startswith("sharded"):
        make_model_folder(folder, layout="huggingface", max_shard_bytes=40_000)
        assert len(list(folder.glob("model-*-of-00005.safetensors"))) == 5
    else:
        shutil.copytree(models_dir / "huggingface", folder)
        if variant.startswith("tokenizer.json"):
            tokenizer_json_only(folder, pairs="pairs" in variant)
        else:
            rewrite(folder / "model.safetensors", without_prefix if "prefix" in variant else with_buffers_and_lm_head)
    model = gpt2.load(str(folder))  # a path works as a model name
    assert_same_params(openai_model, model, np.dtype(dtype) if isinstance(dtype, str) else dtype)
    assert model.encode(PROMPT) == openai_model.encode(PROMPT)
    if dtype == np.float32:
        assert model.generate(PROMPT, 12, temperature=0) == openai_model.generate(PROMPT, 12, temperature=0)


def test_int8_quantizes_a_huggingface_folder_as_the_openai_folder_of_the_same_weights(models_dir):
    flags = dict(seed=2, top_k=40)
    made = [gpt2.load(name, str(models_dir), dtype="int8").generate(PROMPT, 12, **flags)
            for name in ("huggingface", "openai")]
    assert made[0] == made[1]


def test_a_folder_is_found_by_its_path_and_a_folder_in_models_dir_comes_before_the_hub(models_dir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(models_dir)
    assert gpt2.load("huggingface", "elsewhere").model_dir == "huggingface"  # relative to the working folder
    local = tmp_path / "openai-community" / "gpt2"  # a Hub name that is also a folder in models_dir: the folder
    shutil.copytree(models_dir / "huggingface", local)
    assert gpt2.load("openai-community/gpt2", str(tmp_path), download=False).model_dir == str(local)


def test_a_bfloat16_file_loads_as_bfloat16_when_dtype_says(tmp_path):
    make_model_folder(tmp_path / "model", layout="huggingface", dtype="bfloat16")
    model = gpt2.load(str(tmp_path / "model"), dtype="bfloat16")
    assert model.params["wte"].dtype == tf.bfloat16
    assert len(model.generate(PROMPT, 8, seed=1)[0]) > 0


# transformers' GPT2LMHeadModel.save_pretrained, as listed by its state dict (lm_head.weight is tied to
# transformer.wte.weight and left out; the attention's mask buffers are not saved).
TRANSFORMERS_BLOCK = {"ln_1.weight": "e", "ln_1.bias": "e", "attn.c_attn.weight": "e,3e", "attn.c_attn.bias": "3e",
                      "attn.c_proj.weight": "e,e", "attn.c_proj.bias": "e", "ln_2.weight": "e", "ln_2.bias": "e",
                      "mlp.c_fc.weight": "e,4e", "mlp.c_fc.bias": "4e", "mlp.c_proj.weight": "4e,e",
                      "mlp.c_proj.bias": "e"}


def transformers_names(hparams):
    """{name: shape} that transformers' GPT-2 of these hparams saves."""
    e = hparams.n_embd
    size = {"e": e, "3e": 3 * e, "4e": 4 * e}
    names = {"transformer.wte.weight": (hparams.n_vocab, e), "transformer.wpe.weight": (hparams.n_ctx, e),
             "transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}
    for i in range(hparams.n_layer):
        for name, shape in TRANSFORMERS_BLOCK.items():
            names[f"transformer.h.{i}.{name}"] = tuple(size[d] for d in shape.split(","))
    return names


def test_a_model_saved_in_huggingface_format_has_transformers_names_and_loads_back_the_same(openai_model, models_dir,
                                                                                             tmp_path):
    saved = tmp_path / "saved"
    assert openai_model.save(saved, save_format="huggingface") == str(saved)
    assert sorted(os.listdir(saved)) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                         "tokenizer_config.json", "vocab.json"]
    with safe_open(str(saved / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it
        stored = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    assert stored == {name: (shape, "F32") for name, shape in transformers_names(openai_model.hparams).items()}
    config = json.loads((saved / "config.json").read_text())
    hparams = openai_model.hparams
    assert {k: config[k] for k in ("model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer",
                                   "n_head", "activation_function", "layer_norm_epsilon", "eos_token_id")} == {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": hparams.n_vocab,
        "n_positions": hparams.n_ctx, "n_embd": hparams.n_embd, "n_layer": hparams.n_layer, "n_head": hparams.n_head,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "eos_token_id": hparams.n_vocab - 1}
    # vocab.json and merges.txt are OpenAI's encoder.json and vocab.bpe under Hugging Face's names
    openai_vocabulary = json.loads((models_dir / "openai" / "encoder.json").read_text())
    assert json.loads((saved / "vocab.json").read_text()) == openai_vocabulary
    assert (saved / "merges.txt").read_text() == (models_dir / "openai" / "vocab.bpe").read_text()
    again = gpt2.GPT2.from_folder(str(saved))
    assert_same_params(openai_model, again)
    np.testing.assert_array_equal(full_logits(again, PROMPT), full_logits(openai_model, PROMPT))


def test_both_formats_in_one_folder_and_the_save_replaces_a_folder_whole(openai_model, tmp_path):
    saved = tmp_path / "saved"
    openai_model.save(saved, save_format="both")
    assert {"hparams.json", "model.ckpt.index", "encoder.json", "config.json", "model.safetensors",
            "vocab.json"} <= set(os.listdir(saved))
    assert_same_params(openai_model, gpt2.GPT2.from_folder(str(saved)))
    openai_model.save(saved)  # an OpenAI folder in its place: no Hugging Face file is left behind
    assert "model.safetensors" not in os.listdir(saved)
    with pytest.raises(GPT2Error, match=r"save_format must be one of openai, huggingface, both, not 'onnx'"):
        openai_model.save(tmp_path / "other", save_format="onnx")
    assert not (tmp_path / "other").exists()


def test_a_hugging_face_model_fine_tunes_and_saves_in_its_format_and_resumes(models_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The mill by the river turns all day. " * 40, encoding="utf-8")
    arguments = dict(dataset=str(text), steps=1, sequence_length=16, learning_rate=1e-3, progress=False,
                     models_dir=str(models_dir), run_name="hf-run", save_format="huggingface")
    run = gpt2.finetune(model_name="huggingface", **arguments)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "training"} <= set(os.listdir(run))
    assert "hparams.json" not in os.listdir(run)
    gpt2.finetune(model_name="huggingface", **arguments)  # resumes from the run's own folder
    assert [m["step"] for m in read_metrics(os.path.join(run, "training", "metrics.csv"))] == [1, 2]
    tuned = gpt2.load("hf-run", str(models_dir))
    base = gpt2.load("huggingface", str(models_dir))
    assert not np.array_equal(tuned.params["wte"], base.params["wte"])  # it trained


# Bad folders: what is wrong, in one line, never a traceback or a silently wrong model.
def damage_config(**changes):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return change


def damage_tensors(change):
    return lambda folder: rewrite(folder / "model.safetensors", change)


def drop(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def reshape(name):
    return lambda tensors: {**tensors, name: tensors[name][:-1]}


def add(name, like):
    return lambda tensors: {**tensors, name: tensors[like]}


def untie(tensors):
    return {**tensors, "lm_head.weight": tensors["transformer.wte.weight"] + 1}


def as_int8(tensors):
    return {**tensors, "transformer.wte.weight": tensors["transformer.wte.weight"].astype(np.int8)}


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


def torch_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize("damage, message", [
    (damage_tensors(drop("transformer.h.1.mlp.c_fc.bias")), r"has no weight transformer.h.1.mlp.c_fc.bias in its "
                                                            r"safetensors: it is not a whole GPT-2"),
    (damage_tensors(reshape("transformer.h.0.attn.c_attn.weight")), r"transformer.h.0.attn.c_attn.weight has shape "
                                                                     r"\[31, 96\] but config.json asks for \[32, 96\]"),
    (damage_tensors(add("transformer.h.2.ln_1.weight", "transformer.h.1.ln_1.weight")),
     r"has the weight transformer.h.2.ln_1.weight, which a GPT-2 of config.json's shapes does not have"),
    (damage_tensors(untie), r"lm_head.weight differs from the token embedding \(wte\): this model has an output layer "
                            r"of its own"),
    (damage_tensors(as_int8), r"transformer.wte.weight is stored as I8: gpt2 reads float32, float16 and bfloat16"),
    (truncate, r"cannot read .*model.safetensors .*: it is damaged, fetch the model again"),
    (torch_only, r"is missing model.safetensors: it has PyTorch's pytorch_model.bin only, and gpt2 reads safetensors"),
    (damage_config(model_type="llama"), r"describes a 'llama' model, not GPT-2 \(model_type 'gpt2'\)"),
    (damage_config(activation_function="relu"), r"sets activation_function to 'relu', which gpt2 does not compute"),
    (damage_config(scale_attn_by_inverse_layer_idx=True), r"sets scale_attn_by_inverse_layer_idx to True, which gpt2 "
                                                          r"does not compute"),
    (damage_config(reorder_and_upcast_attn=True), r"sets reorder_and_upcast_attn to True"),
    (damage_config(n_inner=96), r"sets n_inner to 96, which gpt2 does not compute: .*\(n_inner None or 4 x n_embd\)"),
    (damage_config(n_layer=3), r"has no weight transformer.h.2.ln_1.weight"),
])
def test_a_bad_huggingface_folder_is_one_line(models_dir, tmp_path, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(models_dir / "huggingface", folder)
    damage(folder)
    with pytest.raises(GPT2Error, match=message) as error:
        gpt2.load(str(folder))
    assert "\n" not in str(error.value)


def test_gelu_pytorch_tanh_and_a_4x_n_inner_are_gpt2s_own(models_dir, openai_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(models_dir / "huggingface", folder)
    damage_config(activation_function="gelu_pytorch_tanh", n_inner=4 * 32)(folder)
    assert_same_params(openai_model, gpt2.load(str(folder)))


# The Hub: a fake one on 127.0.0.1 (gpt2.testing.FakeHub), and huggingface_hub's cache in a folder of the test's.
REPO = "tester/tiny-gpt2"


@pytest.fixture(scope="module")
def hub_cache(models_dir, tmp_path_factory):
    """A huggingface_hub cache into which download_model.py fetched REPO from a FakeHub, whose repository
    holds the Hugging Face tiny model and files that loading does not need."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(models_dir / "huggingface", repo, dirs_exist_ok=True)
    (repo / "pytorch_model.bin").write_bytes(b"PyTorch's copy of the weights")
    (repo / "README.md").write_text("# tiny-gpt2\n")
    cache = tmp_path_factory.mktemp("hub")
    with FakeHub(repo, REPO) as hub:
        fetched = run_command("download_model.py", REPO, env={"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url})
    assert fetched.returncode == 0, fetched.stderr
    snapshot = cache / "models--tester--tiny-gpt2" / "snapshots" / FakeHub.COMMIT
    assert fetched.stdout.strip() == f"{REPO}: complete in {snapshot}"
    # only what loading needs: not PyTorch's weights, not the README, not the tokenizer's settings
    assert sorted(hub.requests) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    return cache


def run_command(script, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_a_hub_model_fetched_once_is_read_from_huggingface_hubs_cache_offline(models_dir, hub_cache, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(PROMPT * 4, encoding="utf-8")
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    scored = run_command("score.py", str(text), "--model_name", REPO, "--models_dir", str(models_dir), env=env)
    assert scored.returncode == 0, scored.stderr
    expected = gpt2.load("openai", str(models_dir)).score(PROMPT * 4)
    assert f"{expected.nll:.4f} nats/token" in scored.stdout


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, r"error: tester/missing is not in the Hugging Face cache, and fetching is off "
                              r"\(HF_HUB_OFFLINE is set\): fetch it once while online"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, r"error: cannot reach the Hugging Face Hub to fetch tester/missing "
                                            r"\(.*\): check the connection, or set HF_ENDPOINT to a mirror"),
])
def test_a_hub_name_that_cannot_be_had_is_one_line(hub_cache, env, message):
    result = run_command("download_model.py", "tester/missing", env={"HF_HUB_CACHE": str(hub_cache), **env})
    assert result.returncode == 1
    assert re.fullmatch(message, result.stderr.strip()), result.stderr


def test_a_name_the_hub_does_not_have_is_one_line(tmp_path):
    with FakeHub(tmp_path, REPO) as hub:
        result = run_command("download_model.py", "tester/nothing-here",
                             env={"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url})
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: the Hugging Face Hub has no model tester/nothing-here (if it is private, "
                                     "set HF_TOKEN to a token that may read it)")


def test_a_name_that_is_neither_a_folder_nor_on_the_hub_says_both(models_dir, hub_cache):
    result = run_command("generate_unconditional.py", "--model_name", "tester/missing", "--models_dir",
                         str(models_dir), env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert re.fullmatch(r"error: unknown model 'tester/missing': use one of 124M, 355M, 774M, 1558M, the name of a "
                        r"model folder in .*, or a GPT-2 of the Hugging Face Hub \(such as openai-community/gpt2\); "
                        r"tester/missing is not in the Hugging Face cache, .*", result.stderr.strip()), result.stderr


def test_a_hub_repository_without_safetensors_is_one_line(models_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(models_dir / "huggingface" / name, repo / name)
    (repo / "pytorch_model.bin").write_bytes(b"PyTorch's weights")
    with FakeHub(repo, REPO) as hub:
        result = run_command("download_model.py", REPO,
                             env={"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url})
    assert result.returncode == 1  # after huggingface_hub's progress bar of the files it found
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {REPO} on the Hugging Face Hub has no model.safetensors: gpt2 reads GPT-2 folders with safetensors "
        "weights (pytorch_model.bin alone is not enough)")
