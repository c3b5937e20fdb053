"""Finding, checking and reading model folders in OpenAI's layout."""
import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2 import checkpoint
from gpt2.checkpoint import read_checkpoint, variable_shapes
from gpt2.weights import load_params
from gpt2.errors import GPT2Error
from gpt2.folders import MODEL_FILES, HParams, find_model_dir, read_hparams
from gpt2.testing import make_model_folder


def test_factory_writes_openai_layout(tiny_model):
    assert sorted(os.listdir(tiny_model)) == sorted(MODEL_FILES)
    hparams = json.loads((tiny_model / "hparams.json").read_text())
    assert set(hparams) == {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
    stored = tf.train.load_checkpoint(str(tiny_model / "model.ckpt")).get_variable_to_shape_map()
    n_embd = hparams["n_embd"]
    assert stored["model/wte"] == [hparams["n_vocab"], n_embd]
    assert stored["model/h0/attn/c_attn/w"] == [1, n_embd, 3 * n_embd]
    assert stored["model/h1/mlp/c_proj/w"] == [1, 4 * n_embd, n_embd]
    assert stored["model/ln_f/g"] == [n_embd]
    assert len(stored) == 2 + 12 * hparams["n_layer"] + 2
    assert 'model_checkpoint_path: "model.ckpt"' in (tiny_model / "checkpoint").read_text()


def test_real_shapes():
    shapes = variable_shapes(HParams())  # 124M
    assert sum(int(tf.reduce_prod(s)) for s in shapes.values()) == 124_439_808  # OpenAI's 124M parameter count


def test_params_tree_mirrors_checkpoint(tiny_model):
    hparams = read_hparams(tiny_model)
    params = load_params(tiny_model, hparams)
    reader = tf.train.load_checkpoint(str(tiny_model / "model.ckpt"))
    assert len(params["h"]) == hparams.n_layer
    c_attn = params["h"][1]["attn"]["c_attn"]
    assert set(c_attn) == {"w"}  # the bias is w's last row
    assert (c_attn["w"].numpy()[:-1] == reader.get_tensor("model/h1/attn/c_attn/w")[0]).all()
    assert (c_attn["w"].numpy()[-1] == reader.get_tensor("model/h1/attn/c_attn/b")).all()
    assert (params["ln_f"]["b"].numpy() == reader.get_tensor("model/ln_f/b")).all()


def test_legacy_names_resolve(tmp_path):
    (tmp_path / "124M").mkdir()
    with pytest.raises(GPT2Error, match="124M is missing hparams.json"):
        find_model_dir("117M", str(tmp_path))


def test_missing_model_says_how_to_download(tmp_path):
    with pytest.raises(GPT2Error, match=r"download_model.py 355M"):
        find_model_dir("345M", str(tmp_path))


def test_unknown_model_lists_names(tmp_path):
    with pytest.raises(GPT2Error, match="unknown model 'gpt5'.*124M, 355M, 774M, 1558M"):
        find_model_dir("gpt5", str(tmp_path))


def test_models_dir_from_environment(tiny_model, monkeypatch):
    monkeypatch.setenv("GPT2_MODELS_DIR", str(tiny_model.parent))
    assert find_model_dir("tiny") == str(tiny_model)


def copy_folder(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_reading_ahead_reads_the_same_and_reports_damage_the_same(tiny_model, tmp_path):
    hparams = read_hparams(tiny_model)
    ahead = [(name, value.numpy()) for name, value in read_checkpoint(tiny_model, hparams, read_ahead=True)]
    in_turn = [(name, value.numpy()) for name, value in read_checkpoint(tiny_model, hparams)]
    assert [name for name, _ in ahead] == [name for name, _ in in_turn] == list(variable_shapes(hparams))
    assert all((a == b).all() for (_, a), (_, b) in zip(ahead, in_turn))

    broken = copy_folder(tiny_model, tmp_path / "broken")
    data = broken / "model.ckpt.data-00000-of-00001"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # a block's checksum no longer matches
    data.write_bytes(bytes(damaged))
    for read_ahead in (True, False):
        with pytest.raises(GPT2Error, match="damaged, download the model again"):
            list(read_checkpoint(broken, hparams, read_ahead=read_ahead))


def test_truncated_checkpoint_is_reported(tiny_model, tmp_path):
    broken = copy_folder(tiny_model, tmp_path / "broken")
    data = broken / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(GPT2Error, match="truncated.*download the model again"):
        load_params(broken, read_hparams(broken))


def test_corrupt_index_is_reported(tiny_model, tmp_path):
    broken = copy_folder(tiny_model, tmp_path / "broken")
    (broken / "model.ckpt.index").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(GPT2Error, match="damaged, download the model again"):
        load_params(broken, read_hparams(broken))


def test_hparams_of_another_model_are_reported(tiny_model, tmp_path):
    broken = copy_folder(tiny_model, tmp_path / "broken")
    hparams = json.loads((broken / "hparams.json").read_text())
    (broken / "hparams.json").write_text(json.dumps({**hparams, "n_embd": 64}))
    with pytest.raises(GPT2Error, match="has shape .* but hparams.json asks for"):
        load_params(broken, read_hparams(broken))


def test_hparams_with_fewer_layers_than_the_checkpoint_are_reported(tiny_model, tmp_path):
    broken = copy_folder(tiny_model, tmp_path / "broken")
    hparams = json.loads((broken / "hparams.json").read_text())
    (broken / "hparams.json").write_text(json.dumps({**hparams, "n_layer": 1}))
    with pytest.raises(GPT2Error, match=r"has 12 model variables that hparams.json does not account for "
                                        r"\(model/h1/attn/c_attn/b, model/h1/attn/c_attn/w, model/h1/attn/c_proj/b, "
                                        r"\.\.\.\): the folder mixes files of different models"):
        load_params(broken, read_hparams(broken))


def test_variables_outside_the_model_are_not_refused(tiny_model, tmp_path):
    """OpenAI's checkpoints, or a training run's, may hold more than the model: only model/... is checked."""
    folder = copy_folder(tiny_model, tmp_path / "more")
    reader = tf.train.load_checkpoint(str(tiny_model / "model.ckpt"))
    variables = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    variables.update({"global_step": np.array(1000, np.int64), "sample_sequence/scratch": np.zeros(3, np.float32)})
    tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt"), tensor_names=list(variables),
                      shape_and_slices=[""] * len(variables), tensors=list(variables.values()))
    params = load_params(folder, read_hparams(folder))
    np.testing.assert_array_equal(params["wte"], reader.get_tensor("model/wte"))


def test_damaged_hparams_are_reported(tiny_model, tmp_path):
    broken = copy_folder(tiny_model, tmp_path / "broken")
    (broken / "hparams.json").write_text('{"n_vocab": 50257')
    with pytest.raises(GPT2Error, match="hparams.json is damaged"):
        read_hparams(broken)


@pytest.mark.parametrize("change,message", [
    ({"n_layer": 0}, "n_layer is 0, not a whole number of at least 1"),
    ({"n_head": 0}, "n_head is 0, not a whole number"), ({"n_head": -4}, "n_head is -4, not a whole number"),
    ({"n_embd": 64.9}, "n_embd is 64.9, not a whole number"), ({"n_ctx": "128"}, "n_ctx is '128', not a whole number"),
    ({"n_layer": True}, "n_layer is True, not a whole number"),
    ({"n_head": 5}, "n_embd 32 is not a multiple of n_head 5"),
    ({"n_vocab": None}, "n_vocab is None, not a whole number"),
])
def test_impossible_hparams_are_reported(tiny_model, tmp_path, change, message):
    broken = copy_folder(tiny_model, tmp_path / "broken")
    hparams = json.loads((broken / "hparams.json").read_text())
    (broken / "hparams.json").write_text(json.dumps({**hparams, **change}))
    with pytest.raises(GPT2Error, match=f"hparams.json is damaged: {message}"):
        read_hparams(broken)


def test_factory_can_make_deeper_models(tmp_path):
    hparams = make_model_folder(tmp_path / "deep", n_layer=3, n_ctx=32)
    assert read_hparams(tmp_path / "deep") == hparams
    assert hparams.n_layer == 3 and hparams.n_ctx == 32


def test_saved_model_is_an_openai_folder_that_loads_back_the_same(tiny_model, tmp_path):
    """load -> save -> load gives identical tensors, in a folder laid out as the factory's (OpenAI's)."""
    model = gpt2.load("tiny", str(tiny_model.parent))
    saved = tmp_path / "copy"
    assert model.save(saved) == str(saved)
    assert sorted(os.listdir(saved)) == sorted(MODEL_FILES)
    for name in ("encoder.json", "vocab.bpe"):
        assert (saved / name).read_bytes() == (tiny_model / name).read_bytes()
    assert read_hparams(saved) == model.hparams
    factory = tf.train.load_checkpoint(str(tiny_model / "model.ckpt"))
    written = tf.train.load_checkpoint(str(saved / "model.ckpt"))
    assert written.get_variable_to_shape_map() == factory.get_variable_to_shape_map()
    assert written.get_variable_to_dtype_map() == factory.get_variable_to_dtype_map()
    for name in factory.get_variable_to_shape_map():
        np.testing.assert_array_equal(written.get_tensor(name), factory.get_tensor(name))
    again = load_params(saved, model.hparams)
    tf.nest.map_structure(np.testing.assert_array_equal, again, model.params)


def test_saving_replaces_a_folder_whole_or_not_at_all(tiny_model, tmp_path, monkeypatch):
    model = gpt2.load("tiny", str(tiny_model.parent))
    target = tmp_path / "run"
    model.save(target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    def crash(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_hparams", crash)  # after the weights, before the rename
    with pytest.raises(GPT2Error, match=r"cannot save .*run \(No space left on device\): free some space"):
        model.save(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["run"]  # nothing half-written left beside it
    monkeypatch.undo()
    trained = tf.nest.map_structure(lambda t: t * 2, model.params)
    gpt2.GPT2(model.hparams, trained, model.encoder, model.model_dir).save(target)
    assert os.listdir(tmp_path) == ["run"]
    np.testing.assert_array_equal(load_params(target, model.hparams)["wte"], trained["wte"])


def without_root_reads():
    """preexec_fn for a child that, even as root, cannot read what its permissions forbid.

    The permission cases need a user that permissions apply to. The tests run as root here and in
    CI, and the interpreter may sit where another user cannot reach it (under /root), so a root
    child gives up the two capabilities that let root read anything (CAP_DAC_OVERRIDE 1,
    CAP_DAC_READ_SEARCH 2) from its bounding set (PR_CAPBSET_DROP 24) before it starts Python.
    """
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop a capability")
    return drop


def run_unprivileged(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=without_root_reads(), env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_unreadable_files_are_named_not_blamed_on_damage(tiny_model, tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        check = run_unprivileged(f"open({str(probe)!r}).close()")
    except OSError as e:
        pytest.skip(f"no process here is kept from reading a file: {e}")
    if check.returncode == 0:
        pytest.skip("no process here is kept from reading a file (root without a way to drop its read override)")
    unreadable = ["hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index", "model.ckpt.data-00000-of-00001",
                  "."]
    paths = []
    for n, name in enumerate(unreadable):
        path = copy_folder(tiny_model, tmp_path / f"locked{n}") / name
        path.chmod(0o600 if name == "." else 0)  # a folder without x cannot be searched
        paths.append(os.path.normpath(path))
    result = run_unprivileged("import gpt2\n"
                              f"for n in range({len(unreadable)}):\n"
                              f"    try: gpt2.load(f'locked{{n}}', {str(tmp_path)!r}, download=False)\n"
                              "    except gpt2.GPT2Error as e: print(e)")
    for path in paths:
        os.chmod(path, 0o755)  # so that pytest can remove them
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"cannot read {path}: permission denied (check its owner and permissions)"
                                          for path in paths]
