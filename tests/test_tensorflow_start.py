"""TensorFlow's start: quiet, and XLA programs kept in a cache folder from one run to the next."""
import glob
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from gpt2 import cache, tensorflow_start
from gpt2.cache import is_whole_protobuf, xla_cache_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answer(models_dir, cache):
    """generate_unconditional.py's first sample of seed 1 with the tiny model, and its stderr."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_unconditional.py"), "--model_name", "tiny",
                             "--models_dir", str(models_dir), "--length", "12", "--seed", "1", "--top_k", "40", "--nsamples", "1"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "GPT2_XLA_CACHE": cache})
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


def test_a_second_run_loads_the_programs_the_first_compiled(tiny_model, tmp_path):
    cache = str(tmp_path / "xla")
    first, _ = answer(tiny_model.parent, cache)
    entries = glob.glob(os.path.join(cache, "*", "*.pb"))
    assert entries  # the decoding loop and the noise, at least
    written = {path: os.stat(path).st_mtime_ns for path in entries}
    second, stderr = answer(tiny_model.parent, cache)
    assert second == first
    assert {path: os.stat(path).st_mtime_ns for path in glob.glob(os.path.join(cache, "*", "*.pb"))} == written
    assert stderr == ""  # TensorFlow's line about reading each entry as text first is not shown


def test_an_entry_cut_off_is_compiled_again_instead_of_failing(tiny_model, tmp_path):
    cache = str(tmp_path / "xla")
    first, _ = answer(tiny_model.parent, cache)
    entries = sorted(glob.glob(os.path.join(cache, "*", "*.pb")), key=os.path.getsize)
    with open(entries[-1], "r+b") as f:  # as a crash or a full disk could leave it
        f.truncate(os.path.getsize(entries[-1]) // 2)
    assert not is_whole_protobuf(entries[-1])
    # TensorFlow alone would fail the call: "Read less bytes than requested".
    assert answer(tiny_model.parent, cache)[0] == first
    assert is_whole_protobuf(entries[-1])


def changed(path, start, end):
    data = bytearray(path.read_bytes())
    data[start:end] = bytes(b ^ 0x33 for b in data[start:end])
    path.write_bytes(bytes(data))


def test_damaged_entries_are_compiled_again_instead_of_failing(tiny_model, tmp_path):
    """Each of these failed every later generation with a TensorFlow traceback, until the folder was deleted."""
    cache = str(tmp_path / "xla")
    first, _ = answer(tiny_model.parent, cache)
    answer(tiny_model.parent, cache)  # the second start records each entry's size and CRC-32
    entries = sorted(glob.glob(os.path.join(cache, "*", "*.pb")), key=os.path.getsize)
    assert all(os.path.exists(entry + ".crc") for entry in entries)
    loop = pathlib.Path(entries[-1])
    damages = [lambda: loop.write_bytes(b""),  # "Serialized cache key does not match"
               lambda: changed(loop, 1000, 1100),  # "Can't parse ... as binary proto"
               lambda: changed(loop, loop.stat().st_size - 100, loop.stat().st_size),
               # changed before any start saw it: found when TensorFlow fails on it, and compiled again
               lambda: (changed(loop, 2000, 2100), os.remove(f"{loop}.crc"))]
    for damage in damages:
        answer(tiny_model.parent, cache)  # whole again, with its .crc
        damage()
        again, stderr = answer(tiny_model.parent, cache)
        assert again == first and stderr == ""


def test_a_disk_that_fills_while_compiling_goes_on_without_the_cache(small_filesystem, capfd):
    link = tensorflow_start._link
    if link is None:
        pytest.skip("the compilation cache is off in this test session")
    os.remove(link)
    os.symlink(small_filesystem, link)  # TensorFlow writes this process's programs to a full disk now
    try:
        capfd.readouterr()
        times_seven = tensorflow_start.Compiled(lambda x: x * 7.0 + 3.0, jit_compile=True)  # a program of its own
        assert times_seven(tf.constant([1.0, 2.0])).numpy().tolist() == [10.0, 17.0]
        assert tensorflow_start.Compiled(lambda x: x * 5.0, jit_compile=True)(tf.constant(2.0)).numpy() == 10.0
        # (TensorFlow's C++ lines show here: the test session imported TensorFlow before gpt2 quietened it)
        warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and warnings[0].startswith("warning: the compiled-program cache ")
        assert warnings[0].endswith("No space left on device): compiling without it in this run")
        assert os.readlink(link) == tensorflow_start._own_cache and os.listdir(tensorflow_start._own_cache)
    finally:
        os.remove(link)
        os.symlink(".", link)


def test_whole_and_cut_protobufs(tmp_path):
    message = bytes([0x0A, 3]) + b"abc" + bytes([0x10, 0x96, 0x01]) + bytes([0x1D]) + b"\0\0\0\0"  # fields 1, 2, 3
    for length, whole in [(len(message), True), (0, True), (4, False), (7, False), (9, False), (11, False)]:
        path = tmp_path / f"{length}.pb"
        path.write_bytes(message[:length])
        assert is_whole_protobuf(path) is whole, length


def test_the_cache_folder_and_when_it_stays_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path / "xla"))
    folder = xla_cache_folder()
    assert os.path.dirname(folder) == str(tmp_path / "xla") and os.path.isdir(folder)
    assert os.path.basename(folder) == cache.machine_key()  # one per TensorFlow and processor

    old_tmp, new_tmp = os.path.join(folder, "a.pb.tmp"), os.path.join(folder, "b.pb.tmp")
    for path in (old_tmp, new_tmp):
        open(path, "w").close()
    os.utime(old_tmp, (time.time() - 7200,) * 2)
    assert xla_cache_folder() == folder
    cache.check_entries(folder)  # as the start of a process does
    assert not os.path.exists(old_tmp) and os.path.exists(new_tmp)  # the other may be a write under way

    monkeypatch.setenv("GPT2_XLA_CACHE", "off")
    assert xla_cache_folder() is None
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path / "a_file" / "xla"))
    assert xla_cache_folder() is None  # cannot be made
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path / "xla"))
    full = shutil.disk_usage(tmp_path)._replace(free=1 << 20)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: full)
    assert xla_cache_folder() is None  # TensorFlow would fail the call that cannot write its program


@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is not None, reason="with tf_keras, TensorFlow imports it")
def test_keras_is_not_imported_at_start_and_tf_keras_is_still_keras_3():
    code = ("import os, sys; from gpt2 import tensorflow_start as s; import tensorflow as tf\n"
            "print('keras' in sys.modules, os.environ.get('TF_USE_LEGACY_KERAS'))\n"
            "print(tf.keras.layers.Dense(3)(tf.ones([1, 2])).shape, tf.keras.__name__)")
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["False None", "(1, 3) keras._tf_keras.keras"]
    # A user's own setting is theirs: left as it is, and TensorFlow then imports Keras as it starts.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**environment, "TF_USE_LEGACY_KERAS": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "True 0"
