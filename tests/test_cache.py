"""The cache folder (gpt2.cache): other versions' entries removed, its size capped, int8 models in use kept."""
import gc
import os
import subprocess
import sys
import time

import pytest

import gpt2
from gpt2 import cache, int8
from gpt2.errors import GPT2Error
from gpt2.folders import read_hparams
from gpt2.testing import make_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = 24 * 3600


def write(path, size, age=0):
    """A file of `size` bytes at `path`, last read and written `age` seconds ago."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)
    used = time.time() - age
    os.utime(path, (used, used))
    return path


def aged(folder, age):
    """Make `folder` and its files look last used `age` seconds ago."""
    used = time.time() - age
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (used, used))
    os.utime(folder, (used, used))


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path / "xla"))
    monkeypatch.delenv("GPT2_CACHE_SIZE", raising=False)
    return tmp_path / "xla"


def test_other_versions_entries_are_removed(base):
    current = cache.xla_cache_folder()
    entry = write(os.path.join(current, "xla_compile_cache__1__2__XLA_CPU_JIT.pb"), 100, age=30 * DAY)
    legacy = [write(os.path.join(current, "int8-block-768-12-12565-0123456789ab.tflite"), 10),
              write(os.path.join(current, "int8-models", "0123456789ab-a-b", "block0.tflite"), 10)]
    unused = base / "x86_64-0000000000000000"  # another TensorFlow's, unused for two days
    write(str(unused / "xla_compile_cache__3__4__XLA_CPU_JIT.pb"), 100)
    aged(unused, 2 * DAY)
    in_use = base / "x86_64-1111111111111111"  # another environment's, used an hour ago: kept
    write(str(in_use / "xla_compile_cache__5__6__XLA_CPU_JIT.pb"), 100)
    aged(in_use, 3600)
    int8_folder = cache.int8_folder()
    other_version = os.path.join(int8_folder, "0123456789ab-model-weights")
    this_version = os.path.join(int8_folder, f"{int8.version()}-model-weights")
    writing = os.path.join(int8_folder, "0123456789ab-model-weights.123.tmp")  # another process's store, under way
    for folder in (other_version, this_version, writing):
        write(os.path.join(folder, "block0.tflite"), 10)

    cache.prune(int8.version())
    assert os.path.exists(entry) and not any(os.path.exists(path) for path in legacy)
    assert not unused.exists() and in_use.exists()
    assert sorted(os.listdir(int8_folder)) == sorted(os.path.basename(f) for f in (this_version, writing))


def test_the_least_recently_used_go_until_the_cache_fits_its_size(base, monkeypatch):
    current = cache.xla_cache_folder()
    entries = [write(os.path.join(current, f"xla_compile_cache__{i}__0__XLA_CPU_JIT.pb"), 300_000, age=(5 - i) * DAY)
               for i in range(5)]  # entry 0 the least recently used
    for entry in entries:
        write(entry + ".crc", 10, age=30 * DAY)  # counted with its entry, removed with it
    models = [os.path.join(cache.int8_folder(), f"{int8.version()}-model{i}-weights") for i in range(2)]
    for model, age in zip(models, (int(4.5 * DAY), DAY // 2)):
        write(os.path.join(model, "block0.tflite"), 300_000)
        aged(model, age)
    monkeypatch.setenv("GPT2_CACHE_SIZE", "1M")  # room for 3 of the 7 units of 300 kB
    cache.prune(int8.version())
    kept = [path for path in entries + models if os.path.exists(path)]
    assert kept == [entries[3], entries[4], models[1]]  # entries 0-2 and model 0 were used before them
    assert not any(os.path.exists(entry + ".crc") for entry in entries[:3])
    assert cache.size_limit() == 1 << 20


@pytest.mark.parametrize("setting, size", [("500M", 500 << 20), ("4G", 4 << 30), ("1.5GiB", int(1.5 * (1 << 30))),
                                           ("0", 0), ("123456", 123456)])
def test_the_size_setting(monkeypatch, setting, size):
    monkeypatch.setenv("GPT2_CACHE_SIZE", setting)
    assert cache.size_limit() == size


def test_a_bad_size_setting_is_one_line(tiny_model, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_SIZE", "lots")
    with pytest.raises(GPT2Error, match="GPT2_CACHE_SIZE is 'lots': set it to a size such as 4G"):
        cache.size_limit()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_unconditional.py"), "--model_name",
                             str(tiny_model), "--length", "4"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.startswith("error: GPT2_CACHE_SIZE is 'lots'"), result.stderr
    assert result.stderr.count("\n") == 1


WAIT_THEN_GENERATE = """
import sys
import gpt2
model = gpt2.load(sys.argv[1], dtype="int8")
print("loaded", flush=True)
sys.stdin.readline()  # the test prunes the cache meanwhile
print(model.generate("The river", 12, seed=1, top_k=40)[0], flush=True)
"""


def test_a_model_open_in_another_process_is_never_removed(base, tiny_model, monkeypatch):
    model = gpt2.GPT2.from_folder(tiny_model, "int8")  # stores its programs
    want = model.generate("The river", 12, seed=1, top_k=40)[0]
    [folder] = [name for name in os.listdir(cache.int8_folder()) if not name.endswith(".tflite")]
    other = subprocess.Popen([sys.executable, "-c", WAIT_THEN_GENERATE, str(tiny_model)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert other.stdout.readline() == "loaded\n"
        monkeypatch.setenv("GPT2_CACHE_SIZE", "0")  # keep nothing that may go
        cache.prune(int8.version())
        assert folder in os.listdir(cache.int8_folder())  # the other process has it open
        text, _ = other.communicate("go\n", timeout=120)
        assert other.returncode == 0 and text == want + "\n"
    finally:
        other.kill()
    cache.prune(int8.version())
    assert folder in os.listdir(cache.int8_folder())  # this process has it open too
    del model
    gc.collect()  # an engine and its model refer to each other
    cache.prune(int8.version())
    assert folder not in os.listdir(cache.int8_folder())  # open nowhere now


LOAD_AND_GENERATE = """
import sys
import gpt2
print(gpt2.load(sys.argv[1], dtype="int8").generate("The river", 12, seed=1, top_k=40)[0])
"""


def test_two_processes_storing_one_model_at_once_both_get_its_text(base, tmp_path):
    model_dir = tmp_path / "models" / "tiny"
    make_model_folder(model_dir, seed=4)
    runs = [subprocess.Popen([sys.executable, "-c", LOAD_AND_GENERATE, str(model_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    with_cache_off = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(model_dir)], capture_output=True,
                                    text=True, cwd=ROOT, env={**os.environ, "GPT2_XLA_CACHE": "off"})
    assert outputs[0][0] == outputs[1][0] == with_cache_off.stdout  # the programs in memory: the same text
    stored = int8.stored_folder(model_dir, read_hparams(model_dir))
    assert sorted(name for name in os.listdir(cache.int8_folder()) if not name.endswith(".tflite")) == [
        os.path.basename(stored)]  # one folder, nothing half-written left
    assert gpt2.GPT2.from_folder(model_dir, "int8").generate("The river", 12, seed=1, top_k=40)[0] + "\n" == \
        with_cache_off.stdout
