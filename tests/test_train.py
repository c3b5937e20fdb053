"""Fine-tuning: the loss and gradients against independent computations, datasets, runs, resuming."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2 import train
from gpt2.weights import load_params
from gpt2.errors import GPT2Error
from gpt2.folders import MODEL_FILES, read_hparams
from gpt2.testing import SAMPLE_TEXT
from gpt2.model import forward, logits
from test_cli import exit_without_tensorflow
from test_model import reference_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The miller kept a list of every sack of flour he had ever sold, and the list was longer than "
        "the river. ")


@pytest.fixture
def models_dir(tiny_model, tmp_path):
    """A models folder of its own holding the tiny model, so that runs and dataset caches stay apart."""
    (tmp_path / "models").mkdir()
    os.symlink(tiny_model, tmp_path / "models" / "tiny")
    return tmp_path / "models"


def folder_digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def test_loss_equals_the_reference_cross_entropy(tiny_model, model):
    hparams, params = model
    tokens = np.random.default_rng(0).integers(0, hparams.n_vocab, size=(2, 40))
    ours = float(train.loss(params, hparams, tf.constant(tokens)))
    expected = []
    for row in tokens:
        logits = reference_logits(tiny_model, row[:-1].tolist())
        log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        expected.append(log_norm - logits[np.arange(len(row) - 1), row[1:]])
    assert abs(ours - np.mean(expected)) < 1e-5


def test_gradients_equal_finite_differences(model):
    """The gradient along a random direction of all weights equals the loss's central difference."""
    hparams, params = model
    tokens = tf.constant(np.random.default_rng(1).integers(0, hparams.n_vocab, size=(2, 30)))
    rng = np.random.default_rng(2)
    direction = tf.nest.map_structure(lambda p: tf.constant(rng.standard_normal(p.shape), tf.float32), params)
    variables = tf.nest.map_structure(tf.Variable, params)
    with tf.GradientTape() as tape:
        value = train.loss(variables, hparams, tokens)
    gradients = tape.gradient(value, variables)
    along = sum(float(tf.reduce_sum(g * d)) for g, d in zip(tf.nest.flatten(gradients), tf.nest.flatten(direction)))

    def shifted(epsilon):
        moved = tf.nest.map_structure(lambda p, d: p + epsilon * d, params, direction)
        return float(train.loss(moved, hparams, tokens))
    epsilon = 1e-3
    difference = (shifted(epsilon) - shifted(-epsilon)) / (2 * epsilon)
    assert abs(along) > 1  # a real slope, so the relative bound below means something
    assert difference == pytest.approx(along, rel=2e-3)


def test_datasets_of_every_kind_join_documents_with_the_end_of_text_token(models_dir, tmp_path):
    encoder = gpt2.load("tiny", str(models_dir)).encoder
    eot = encoder.eot_token
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("the mill", encoding="utf-8")
    (folder / "b.txt").write_text("the river", encoding="utf-8")
    (folder / "rows.csv").write_text('title,body\nx,"the road, up"\ny,the town\n', encoding="utf-8")
    (folder / "records.jsonl").write_text('{"text": "the market"}\n\n{"text": "the fire"}\n', encoding="utf-8")
    cache = tmp_path / "cache"
    tokens = train.encoded_dataset(str(folder), encoder, str(cache), csv_column="body")
    expected = []
    for text in ["the mill", "the river", "the market", "the fire", "the road, up", "the town"]:  # a, b, records, rows
        expected += encoder.encode(text) + [eot]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    only_txt = encoder.encode("the mill") + [eot] + encoder.encode("the river") + [eot]
    assert train.encoded_dataset(str(folder / "*.txt"), encoder, str(cache)).tolist() == only_txt
    [cached] = [f for f in os.listdir(cache) if f.startswith("texts-")]
    os.utime(cache / cached, (0, 0))
    again = train.encoded_dataset(str(folder), encoder, str(cache), csv_column="body")  # read back, not encoded
    assert again.tolist() == expected and os.path.getmtime(cache / cached) == 0
    assert train.encoded_dataset(str(cache / cached), encoder, str(cache)).tolist() == expected  # a .tokens file


def test_a_run_writes_an_openai_folder_and_learns_the_text(models_dir, tiny_model):
    base = folder_digest(tiny_model)
    model = gpt2.load("tiny", str(models_dir))
    (models_dir.parent / "text.txt").write_text(TEXT * 3, encoding="utf-8")
    before = model.perplexity(TEXT)
    run_dir = gpt2.finetune(str(models_dir.parent / "text.txt"), "tiny", "mill", str(models_dir), steps=150,
                            sequence_length=48, learning_rate=3e-3, warmup_steps=5, save_every=0, progress=False)
    assert run_dir == str(models_dir / "mill")
    assert set(MODEL_FILES) <= set(os.listdir(run_dir)) and "training" in os.listdir(run_dir)
    assert folder_digest(tiny_model) == base  # the starting model is untouched
    factory = tf.train.load_checkpoint(str(tiny_model / "model.ckpt"))
    written = tf.train.load_checkpoint(os.path.join(run_dir, "model.ckpt"))
    assert written.get_variable_to_shape_map() == factory.get_variable_to_shape_map()
    assert written.get_variable_to_dtype_map() == factory.get_variable_to_dtype_map()
    tuned = gpt2.load("mill", str(models_dir))
    after = tuned.perplexity(TEXT)
    print(f"perplexity of the text: {before:.1f} before, {after:.2f} after")
    assert after < before / 20
    words = TEXT.split()
    [continued] = tuned.generate(" ".join(words[:6]), length=12, temperature=0)
    assert continued.split()[:4] == words[6:10]
    metrics = (models_dir / "mill" / "training" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step,loss,") and len(metrics) == 151


def run_finetune(models_dir, *flags):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "finetune.py"), "--dataset",
                             str(models_dir.parent / "corpus.txt"), "--model_name", "tiny", "--models_dir",
                             str(models_dir), "--sequence_length", "32", "--learning_rate", "1e-3", "--seed", "5",
                             "--progress", "False", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def saved_step(run_dir):
    with np.load(run_dir / "training" / "state.npz") as state:
        return int(state["step"])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_run_resumes_to_the_same_weights(models_dir, stop):
    (models_dir.parent / "corpus.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    total = 160
    whole = run_finetune(models_dir, "--run_name", "whole", "--steps", str(total), "--save_every", "20")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    stopped = run_finetune(models_dir, "--run_name", "stopped", "--steps", str(total), "--save_every", "20")
    deadline = time.monotonic() + 300
    while not (models_dir / "stopped" / "training" / "state.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    stopped.send_signal(stop)
    _, stderr = stopped.communicate(timeout=120)
    if stop == signal.SIGINT:  # finishes the step in progress, saves, one line
        assert stopped.returncode == 130 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted at step ")
    done = saved_step(models_dir / "stopped")
    assert 20 <= done < total
    rest = run_finetune(models_dir, "--run_name", "stopped", "--steps", str(total - done), "--save_every", "20")
    assert rest.wait(timeout=300) == 0, rest.stderr.read()
    assert saved_step(models_dir / "stopped") == total
    hparams = read_hparams(models_dir / "whole")
    expected, resumed = (load_params(models_dir / name, hparams) for name in ("whole", "stopped"))
    tf.nest.map_structure(np.testing.assert_array_equal, resumed, expected)


@pytest.mark.parametrize("flags,message", [
    (dict(run_name="tiny"), "holds a model that is not a fine-tuning run: choose another run_name"),
    (dict(run_name="124M"), "not a fine-tuning run"),
    (dict(sequence_length=500), "sequence_length 500 is more than the model's context of 128"),
    (dict(dataset="/nonexistent/*.txt"), "no text found at dataset /nonexistent"),
    (dict(optimizer="lion"), "optimizer must be one of adamw, adam, sgd, adafactor"),
    (dict(steps=0), "steps must be a whole number of at least 1"),
    (dict(lora_rank=0), "lora_rank must be a whole number of at least 1, not 0"),
    (dict(lora_rank=2.5), "lora_rank must be a whole number of at least 1, not 2.5"),
    (dict(lora_rank=200), "lora_rank 200 is more than the model's width of 32"),
    (dict(lora_rank=4, only_train_transformer_layers=True), "lora_rank trains the adapters alone: leave out "),
    (dict(dtype="float8"), "dtype must be one of float32, float16, bfloat16, not 'float8'"),
    (dict(recompute="yes"), "recompute must be True or False, not 'yes'"),
    (dict(strategy="gpus"), "strategy must be one of auto, one, mirrored, multiworker, tpu .or, from Python, a "),
    (dict(strategy=2), "strategy must be one of auto, one, mirrored, multiworker, tpu or a tf.distribute.Strategy"),
])
def test_bad_settings_are_one_line_errors(models_dir, flags, message):
    (models_dir.parent / "text.txt").write_text(TEXT, encoding="utf-8")
    arguments = {**dict(dataset=str(models_dir.parent / "text.txt"), model_name="tiny", run_name="run",
                        models_dir=str(models_dir), steps=2, progress=False), **flags}
    with pytest.raises(GPT2Error, match=message):
        gpt2.finetune(**arguments)


def test_memory_flags_are_checked_before_tensorflow_starts():
    assert exit_without_tensorflow("finetune_main", ["--dataset", "x.txt", "--lora_rank", "0"]) == \
        "error: --lora_rank must be a whole number of at least 1, not 0 | False"


def test_empty_and_tiny_datasets(models_dir):
    (models_dir.parent / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(GPT2Error, match="is too small to train on"):
        gpt2.finetune(str(models_dir.parent / "empty.txt"), "tiny", "run", str(models_dir), steps=1, progress=False)
    (models_dir.parent / "short.txt").write_text("the mill", encoding="utf-8")  # shorter than the context: works
    run_dir = gpt2.finetune(str(models_dir.parent / "short.txt"), "tiny", "run", str(models_dir), steps=2,
                            progress=False)
    assert json.loads((models_dir / "run" / "training" / "settings.json").read_text())["steps"] == 2
    assert gpt2.load("run", str(models_dir)).hparams == read_hparams(run_dir)


def test_validation_keeps_the_best_run_and_fresh_starts_again(models_dir):
    (models_dir.parent / "text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    flags = dict(sequence_length=32, learning_rate=1e-3, save_every=0, progress=False)
    gpt2.finetune(str(models_dir.parent / "text.txt"), "tiny", "run", str(models_dir), steps=10, val_fraction=0.2,
                  val_every=5, keep_best=True, **flags)
    rows = (models_dir / "run" / "training" / "metrics.csv").read_text().splitlines()
    scored = [row.split(",") for row in rows[1:] if not row.endswith(",,")]
    assert [int(row[0]) for row in scored] == [5, 10]
    assert float(scored[1][-1]) == pytest.approx(np.exp(float(scored[1][-2])))  # perplexity = exp(loss)
    assert gpt2.load("run_best", str(models_dir)).hparams == read_hparams(models_dir / "run")
    gpt2.finetune(str(models_dir.parent / "text.txt"), "tiny", "run", str(models_dir), steps=3,
                  restore_from="fresh", **flags)
    assert saved_step(models_dir / "run") == 3
    assert len((models_dir / "run" / "training" / "metrics.csv").read_text().splitlines()) == 1 + 3


# The memory ladder: recompute, mixed precision, frozen embeddings, low-rank adapters.

def trainer_after(params, hparams, memory, optimizer="sgd", steps=1):
    """The trainer after `steps` steps on a fixed batch, and the losses of those steps."""
    trainer = train.Trainer(params, hparams, train.Hyper(optimizer, clip_norm=0), 1e-2, memory=memory)
    batch = np.random.default_rng(3).integers(0, hparams.n_vocab, (1, 2, 33)).astype(np.int32)
    return trainer, [trainer.train_step(batch)[0] for _ in range(steps)]


def flat(params):
    """{"h/0/attn/c_attn/w": array, ...} of a params tree (of variables or tensors)."""
    return {"/".join(path): np.asarray(v) for path, v in train.leaves(params)}


def test_recomputed_gradients_equal_kept_ones(model):
    """One SGD step's change of every weight is its gradient: with recompute, the same ones."""
    hparams, params = model
    (kept, kept_loss), (recomputed, recomputed_loss) = (trainer_after(params, hparams, train.Memory(recompute=r))
                                                        for r in (False, True))
    assert recomputed_loss == kept_loss
    changed = 0
    for name, value in flat(kept.params).items():
        np.testing.assert_allclose(flat(recomputed.params)[name], value, rtol=1e-6, atol=1e-8, err_msg=name)
        changed += not np.array_equal(value, flat(params)[name])
    assert changed == len(flat(kept.params))  # every weight moved: every gradient was compared


def test_mixed_precision_loss_is_the_float32_loss_to_its_precision(model):
    hparams, params = model
    tokens = tf.constant(np.random.default_rng(4).integers(0, hparams.n_vocab, size=(2, 40)))
    exact = float(train.loss(params, hparams, tokens))
    # Relative precision: bfloat16 keeps 8 bits of each number, float16 11.
    for dtype, tolerance in (("bfloat16", 2 ** -8), ("float16", 2 ** -11)):
        approximate = float(train.loss(params, hparams, tokens, dtype))
        assert approximate != exact and approximate == pytest.approx(exact, rel=tolerance), dtype


def test_float16_steps_that_overflow_are_skipped_and_halve_the_loss_scale(model):
    hparams, params = model
    trainer, losses = trainer_after(params, hparams, train.Memory(dtype="float16"))
    assert float(trainer.loss_scale) == train.INITIAL_LOSS_SCALE and np.isfinite(losses[0])
    before = flat(trainer.params)
    trainer.loss_scale.assign(1e38)  # the scaled gradients overflow float16
    batch = np.random.default_rng(5).integers(0, hparams.n_vocab, (1, 2, 33)).astype(np.int32)
    _, norm = trainer.train_step(batch)
    assert not np.isfinite(norm) and float(trainer.loss_scale) == np.float32(1e38) / 2
    tf.nest.map_structure(np.testing.assert_array_equal, flat(trainer.params), before)


def test_only_transformer_layers_leaves_the_embeddings_and_final_norm_as_they_were(model):
    hparams, params = model
    trainer, _ = trainer_after(params, hparams, train.Memory(only_train_transformer_layers=True), "adamw", steps=2)
    start = flat(params)
    for name, value in flat(trainer.params).items():
        frozen = not name.startswith("h/")
        assert np.array_equal(value, start[name]) == frozen, name
    assert {"/".join(path) for path in trainer.paths} == {name for name in start if name.startswith("h/")}


def test_lora_starts_as_the_base_model_and_merges_into_the_same_logits(model):
    hparams, params = model
    tokens = tf.constant(np.random.default_rng(6).integers(0, hparams.n_vocab, size=(2, 40)))
    base = logits(params, forward(params, hparams, tokens)).numpy()
    adapted = train.add_adapters(params, rank=3)
    np.testing.assert_array_equal(logits(adapted, forward(adapted, hparams, tokens)).numpy(), base)  # lora_b is 0
    trainer, _ = trainer_after(params, hparams, train.Memory(lora_rank=3), "adamw", steps=3)
    assert {path[-1] for path in trainer.paths} == {"lora_a", "lora_b"} and len(trainer.paths) == 8 * hparams.n_layer
    tuned = logits(trainer.params, forward(trainer.params, hparams, tokens)).numpy()
    merged = train.merge_adapters(trainer.params)
    assert not np.allclose(tuned, base, atol=1e-3)  # the adapters learned something
    np.testing.assert_allclose(logits(merged, forward(merged, hparams, tokens)).numpy(), tuned, atol=2e-5)
    start = flat(params)
    for name, value in flat(merged).items():
        if name.endswith(("c_attn/w", "c_proj/w", "c_fc/w")):
            assert np.array_equal(value[-1], start[name][-1]) and not np.array_equal(value, start[name])
        else:  # the bias rows above and every other weight: as they were
            np.testing.assert_array_equal(value, start[name])
    assert set(flat(merged)) == set(start)


@pytest.mark.slow
def test_a_lora_run_saves_a_plain_folder_and_resumes_to_the_same_weights(models_dir, tiny_model):
    """Stopped after 4 steps and resumed for 4 more, it ends where 8 steps in one go end: the saved
    folder holds the adapters merged, state.npz the adapters themselves, taken out again on resume."""
    (models_dir.parent / "text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    flags = dict(sequence_length=32, learning_rate=1e-2, save_every=0, progress=False, lora_rank=2, seed=3)
    dataset = str(models_dir.parent / "text.txt")
    gpt2.finetune(dataset, "tiny", "whole", str(models_dir), steps=8, **flags)
    gpt2.finetune(dataset, "tiny", "halves", str(models_dir), steps=4, **flags)
    with np.load(models_dir / "halves" / "training" / "state.npz") as state:
        assert {"h/0/attn/c_attn/lora_a", "h/1/mlp/c_proj/lora_b"} <= set(state) and int(state["step"]) == 4
    written = tf.train.load_checkpoint(str(models_dir / "halves" / "model.ckpt")).get_variable_to_shape_map()
    assert written == tf.train.load_checkpoint(str(tiny_model / "model.ckpt")).get_variable_to_shape_map()
    with pytest.raises(GPT2Error, match="was trained with lora_rank 2, not 3: give the same"):
        gpt2.finetune(dataset, "tiny", "halves", str(models_dir), steps=4, **{**flags, "lora_rank": 3})
    gpt2.finetune(dataset, "tiny", "halves", str(models_dir), steps=4, **flags)
    hparams = read_hparams(models_dir / "whole")
    whole, halves, base = (load_params(models_dir / name, hparams) for name in ("whole", "halves", "tiny"))
    # The subtraction that takes the adapters out of the saved weights rounds: equal to float32 precision.
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), halves, whole)
    assert not np.allclose(whole["h"][0]["attn"]["c_attn"]["w"], base["h"][0]["attn"]["c_attn"]["w"], atol=1e-4)
    np.testing.assert_array_equal(whole["wte"], base["wte"])  # only the adapted layers change


TWO_CPUS = """
import sys
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import gpt2
from gpt2.errors import GPT2Error
dataset, models_dir = sys.argv[1:]
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
flags = dict(sequence_length=32, learning_rate=0.1, optimizer="sgd", batch_size=4, accumulate_gradients=2,
             save_every=0, progress=False, seed=3)
gpt2.finetune(dataset, "tiny", "one", models_dir, steps=4, strategy="one", **flags)
gpt2.finetune(dataset, "tiny", "two", models_dir, steps=2, strategy=two, **flags)
gpt2.finetune(dataset, "tiny", "two", models_dir, steps=2, strategy="one", **flags)  # resumed on one device
try:
    gpt2.finetune(dataset, "tiny", "odd", models_dir, steps=1, strategy=two, **{**flags, "batch_size": 3})
except GPT2Error as e:
    print(e)
"""


@pytest.mark.slow
def test_two_replicas_train_as_one_device_and_resume_on_one(models_dir, tiny_model):
    """Two logical CPUs, each with half of each batch, make the steps one device makes with the whole
    batch; a run begun on two resumes on one. SGD: the weights move by the gradients themselves
    (Adam would magnify the rounding of gradients near zero)."""
    (models_dir.parent / "text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", TWO_CPUS, str(models_dir.parent / "text.txt"), str(models_dir)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("a batch of 3 does not split evenly across 2 replicas: "
                                     "make batch_size a multiple of 2")
    hparams = read_hparams(models_dir / "one")
    one, two, base = (load_params(models_dir / name, hparams) for name in ("one", "two", "tiny"))
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), two, one)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(tf.nest.flatten(one), tf.nest.flatten(base)))
    assert moved > 1e-2
    one_losses, two_losses = ([float(row.split(",")[1]) for row in (models_dir / name / "training" / "metrics.csv")
                               .read_text().splitlines()[1:]] for name in ("one", "two"))
    assert len(two_losses) == 4 and two_losses == pytest.approx(one_losses, rel=1e-6)  # summed in another order


MULTI_WORKER = """
import json, os, sys
index, ports, dataset, models_dir = sys.argv[1:]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
                                      "task": {"type": "worker", "index": int(index)}})
import gpt2
gpt2.finetune(dataset, "tiny", "multi", models_dir, steps=2, strategy="multiworker", sequence_length=32,
              learning_rate=0.1, optimizer="sgd", batch_size=2, save_every=0, progress=False, seed=3)
"""


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_worker_processes_train_as_one_device(models_dir):
    """MultiWorkerMirroredStrategy, two processes on 127.0.0.1 configured by TF_CONFIG, one CPU each:
    the weights of one device with the same global batch; worker 0 alone writes the run."""
    dataset = str(models_dir.parent / "text.txt")
    (models_dir.parent / "text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    ports = ",".join(map(str, free_ports(2)))
    workers = [subprocess.Popen([sys.executable, "-c", MULTI_WORKER, str(i), ports, dataset, str(models_dir)],
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
               for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.stderr.read()
    gpt2.finetune(dataset, "tiny", "one", str(models_dir), steps=2, strategy="one", sequence_length=32,
                  learning_rate=0.1, optimizer="sgd", batch_size=2, save_every=0, progress=False, seed=3)
    hparams = read_hparams(models_dir / "one")
    one, multi = (load_params(models_dir / name, hparams) for name in ("one", "multi"))
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), multi, one)
    assert not np.allclose(one["wte"], load_params(models_dir / "tiny", hparams)["wte"], atol=1e-3)


# Nothing lost: which folders a run may replace, one writer, kills, divergence, damaged files.

def small_run(models_dir, run_name="run", **flags):
    """gpt2.finetune on TEXT with the tiny model: one short step unless flags say otherwise."""
    text = models_dir.parent / "text.txt"
    if not text.exists():
        text.write_text(TEXT * 4, encoding="utf-8")
    arguments = dict(dataset=str(text), steps=1, sequence_length=16, learning_rate=1e-3, progress=False)
    return gpt2.finetune(model_name="tiny", run_name=run_name, models_dir=str(models_dir), **{**arguments, **flags})


def tree_digest(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {os.path.relpath(os.path.join(root, name), folder):
            hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(folder) for name in names}


@pytest.mark.parametrize("run_name", ["", " ", ".", "..", "../elsewhere", "sub/../.."])
def test_a_run_name_must_name_a_folder_inside_models_dir(models_dir, run_name):
    (models_dir / "keep.txt").write_text("a user's file", encoding="utf-8")
    small_run(models_dir, "run1")
    before = tree_digest(models_dir.parent)
    with pytest.raises(GPT2Error, match="run_name must be the name of a folder inside models_dir"):
        small_run(models_dir, run_name, overwrite=True)
    assert tree_digest(models_dir.parent) == before  # today's code deleted the whole models folder for "" and "."


def test_an_empty_run_name_is_refused_before_tensorflow_starts():
    assert exit_without_tensorflow("finetune_main", ["--dataset", "x.txt", "--run_name", "", "--overwrite"]) == \
        "error: --run_name must be the name of a folder inside models_dir (say run1), not '' | False"


def test_folders_that_are_not_models_are_never_replaced(models_dir, tmp_path):
    (models_dir / "notes").mkdir()
    (models_dir / "notes" / "todo.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(GPT2Error, match=r"notes holds files that are not a model's \(todo.txt\), which saving "
                                        "there would delete: choose another run_name"):
        small_run(models_dir, "notes", overwrite=True)
    with pytest.raises(GPT2Error, match="datasets is the folder of encoded datasets, not a model"):
        small_run(models_dir, "datasets", overwrite=True)
    (models_dir / "run_best").mkdir()
    (models_dir / "run_best" / "plot.png").write_bytes(b"\x89PNG")
    with pytest.raises(GPT2Error, match="run_best, where keep_best would save the best weights, holds something"):
        small_run(models_dir, "run", keep_best=True, val_fraction=0.3, val_every=1)
    assert not (models_dir / "run").exists()  # refused before training
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("mine", encoding="utf-8")
    model = gpt2.load("tiny", str(models_dir))
    with pytest.raises(GPT2Error, match=r"mine holds files that are not a model's \(a.txt\)"):
        model.save(mine)
    assert os.listdir(models_dir / "notes") == ["todo.txt"] and os.listdir(mine) == ["a.txt"]
    assert os.listdir(models_dir / "run_best") == ["plot.png"]
    model.save(tmp_path / "saved")
    model.save(tmp_path / "saved")  # a model folder is replaced
    assert gpt2.load("saved", str(tmp_path)).hparams == model.hparams


HOLD_THE_LOCK = """
import sys
from gpt2.storage import only_writer
with only_writer(sys.argv[1]):  # as a finetune.py training this run holds it
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_one_process_at_a_time_writes_a_run(models_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(models_dir / "run")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(GPT2Error, match=rf"another process \(process {holder.pid}\) is writing .*run: wait"):
            small_run(models_dir)
    finally:
        holder.communicate("", timeout=60)
    assert small_run(models_dir) == str(models_dir / "run")
    assert not [name for name in os.listdir(models_dir) if name.endswith(".lock")]


@pytest.fixture
def read_only_models_dir(models_dir, tmp_path):
    """models_dir mounted read-only at tmp_path/read-only; skipped where it cannot be mounted."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    result = subprocess.run(["mount", "--bind", "-o", "ro", str(models_dir), str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot bind-mount a folder read-only here (it needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_models_folder_is_refused_before_training(read_only_models_dir):
    (read_only_models_dir.parent / "text.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(GPT2Error, match=r"cannot write in .*read-only \(Read-only file system\): choose a folder"):
        small_run(read_only_models_dir, steps=1000)


KILLED_SAVE = """
import os, signal, sys
import gpt2
from gpt2 import storage

storage._RENAMEAT2 = None  # as on a system without an atomic exchange: two renames
rename = os.rename
def rename_then_die(source, target):
    rename(source, target)
    if ".old-" in target:  # between the two renames
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename_then_die
model = gpt2.GPT2.from_folder(sys.argv[1])
model.params["wte"] = model.params["wte"] * 2
model.save(sys.argv[2])
"""


def test_a_save_killed_between_its_two_renames_is_found_whole(models_dir, tiny_model):
    gpt2.load("tiny", str(models_dir)).save(models_dir / "run")
    process = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tiny_model), str(models_dir / "run")],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert not (models_dir / "run").exists()  # what the kill left: run.old-PID and run.writing-PID
    assert sorted(name.split("-")[0] for name in os.listdir(models_dir) if name.startswith("run.")) == \
        ["run.old", "run.writing"]
    recovered = gpt2.load("run", str(models_dir))  # the newest save, whole
    expected = load_params(tiny_model, read_hparams(tiny_model))["wte"] * 2
    np.testing.assert_array_equal(recovered.params["wte"], expected)
    assert sorted(os.listdir(models_dir)) == ["run", "tiny"]  # the leftovers are gone


def test_a_save_replaces_the_folder_in_one_atomic_exchange(tiny_model, tmp_path, monkeypatch):
    from gpt2 import storage

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("new")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("old")
    if not storage.exchange(str(tmp_path / "new"), str(tmp_path / "old")):
        pytest.skip("this system or file system has no atomic exchange of two paths")
    assert (tmp_path / "old" / "x").read_text() == "new" and (tmp_path / "new" / "x").read_text() == "old"
    model = gpt2.load("tiny", str(tiny_model.parent))
    model.save(tmp_path / "saved")

    def no_renames(source, target):
        raise AssertionError(f"renamed {source} to {target}: the folder was missing between two renames")
    monkeypatch.setattr(storage.os, "rename", no_renames)
    model.params["wte"] = model.params["wte"] * 2
    model.save(tmp_path / "saved")  # over the folder: one exchange, no rename
    assert sorted(os.listdir(tmp_path)) == ["new", "old", "saved"]
    np.testing.assert_array_equal(load_params(tmp_path / "saved", model.hparams)["wte"], model.params["wte"])


def test_leftovers_are_repaired_whatever_their_process_number_and_users_folders_are_kept(models_dir, tiny_model):
    """A restarted container often gives the new process the killed one's number: under the run's lock,
    every leftover is a dead writer's. A folder of the user's with a leftover's name is not touched."""
    gpt2.load("tiny", str(models_dir)).save(models_dir / "run")
    os.rename(models_dir / "run", models_dir / f"run.writing-{os.getpid()}")  # as a kill between the renames
    shutil.copytree(models_dir / f"run.writing-{os.getpid()}", models_dir / f"run.old-{os.getpid()}")
    (models_dir / "run.old-2023").mkdir()
    (models_dir / "run.old-2023" / "notes.txt").write_text("a user's backup", encoding="utf-8")
    assert gpt2.load("run", str(models_dir)).hparams == read_hparams(tiny_model)
    assert sorted(os.listdir(models_dir)) == ["run", "run.old-2023", "tiny"]


def test_training_that_diverges_stops_and_keeps_the_last_good_save(models_dir):
    small_run(models_dir, steps=2)
    before = tree_digest(models_dir / "run")
    with pytest.raises(GPT2Error, match=r"training diverged at step [34] \(its (loss|gradient norm|weights) is "
                                        r"(nan|inf)\): the run folder keeps step 2; lower learning_rate"):
        small_run(models_dir, steps=20, learning_rate=1e30, warmup_steps=0)
    assert tree_digest(models_dir / "run") == before
    with pytest.raises(GPT2Error, match=r"training diverged at step [12] .*: nothing was saved"):
        small_run(models_dir, "fresh_run", steps=20, learning_rate=1e30, warmup_steps=0)
    assert not (models_dir / "fresh_run").exists()


@pytest.mark.parametrize("content,message", [
    (np.array([1, 2, 657], np.uint16).tobytes(), r"holds token ids up to 657, past this model's vocabulary of 657"),
    (b"\x01\x00\x02", r"has 3 bytes, not a whole number of 16-bit ids"),
    (b"", r"has 0 bytes"),
])
def test_token_files_are_checked(models_dir, content, message):
    tokens = models_dir.parent / "data.tokens"
    tokens.write_bytes(content)
    with pytest.raises(GPT2Error, match=message):
        small_run(models_dir, dataset=str(tokens))


def test_text_that_cannot_be_read_names_its_file_and_line(models_dir, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT, encoding="utf-8")
    (texts / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    with pytest.raises(GPT2Error, match=r"b.txt is not UTF-8 text .*: save it as UTF-8 first"):
        small_run(models_dir, dataset=str(texts))
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": tw\n', encoding="utf-8")
    with pytest.raises(GPT2Error, match=r"c.jsonl line 4 is not JSON \(Expecting value, column 10\)"):
        small_run(models_dir, dataset=str(tmp_path / "c.jsonl"))
    assert [name for name in os.listdir(models_dir / "datasets")] == []  # nothing half-encoded is kept


@pytest.mark.parametrize("damage", [
    lambda training: (training / "state.npz").write_bytes((training / "state.npz").read_bytes()[:500]),
    lambda training: (training / "metrics.csv").write_text(
        (training / "metrics.csv").read_text()[:len((training / "metrics.csv").read_text()) - 30]),
    lambda training: (training / "settings.json").unlink(),
])
def test_a_damaged_run_folder_is_one_line_that_says_what_to_do(models_dir, damage):
    small_run(models_dir, steps=2)
    damage(models_dir / "run" / "training")
    with pytest.raises(GPT2Error, match=r"run/training is damaged .*: set restore_from to .*run to go on from its "
                                        "weights with a new optimizer state, or to fresh"):
        small_run(models_dir)
    small_run(models_dir, restore_from=str(models_dir / "run"))  # as the message says
    assert saved_step(models_dir / "run") == 1


def test_restore_from_a_folder_that_is_not_a_model_says_so(models_dir, tmp_path):
    with pytest.raises(GPT2Error, match=r"restore_from must be latest, fresh, or a model folder, and '.*' is none: "
                                        r"it has no hparams.json \(OpenAI's layout\) or config.json \(Hugging Face's\)"):
        small_run(models_dir, restore_from=str(tmp_path))


def test_the_smoothed_loss_goes_on_across_resumes(models_dir):
    small_run(models_dir, steps=3)
    small_run(models_dir, steps=2)
    metrics = train.read_metrics(str(models_dir / "run" / "training" / "metrics.csv"))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    for before, now in zip(metrics, metrics[1:]):
        assert now["smoothed_loss"] == pytest.approx(0.9 * before["smoothed_loss"] + 0.1 * now["loss"], rel=1e-6)


def test_progress_false_shows_no_bar(models_dir, capfd):
    small_run(models_dir)  # the dataset is encoded here, the first time
    _, err = capfd.readouterr()
    assert err == ""


def test_a_full_disk_while_encoding_or_saving_is_one_line(models_dir, tiny_model, small_filesystem):
    full_models = small_filesystem / "models"
    full_models.mkdir()
    os.symlink(tiny_model, full_models / "tiny")
    text = models_dir.parent / "text.txt"
    text.write_text(TEXT * 200, encoding="utf-8")  # its tokens need more than the last page
    with pytest.raises(GPT2Error, match=r"cannot write the encoded dataset to .*datasets \(No space left on device\)"
                                        ": free some space"):
        small_run(full_models, dataset=str(text))
    assert os.listdir(full_models / "datasets") == []
    encoder = gpt2.load("tiny", str(models_dir)).encoder
    tokens = train.encoded_dataset(str(text), encoder, str(models_dir / "datasets"))
    with pytest.raises(GPT2Error, match=r"cannot save .*run \(No space left on device\): free some space, or "
                                        r"choose another folder; what was there is kept as it was \(step 1 was not "
                                        r"saved\)"):
        small_run(full_models, dataset=tokens.filename)
    assert sorted(os.listdir(full_models)) == ["datasets", "tiny"]


@pytest.mark.parametrize("scales", [(1.0, 1e-3, 0.0), (0.0, 0.0, 1.0)])
def test_adafactor_steps_equal_a_float64_reference(scales):
    """Factored second moments (Shazeer and Stern, 2018), with update clipping at 1. Gradients of
    zero from the first step (LoRA's lora_a, whose lora_b starts at zero) made NaN weights."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    variable = tf.Variable(w0)
    slots = {name: tf.Variable(tf.zeros(shape)) for name, shape in train.slot_shapes([5, 3], "adafactor").items()}
    hyper = train.Hyper("adafactor", clip_norm=0)
    w, row, col = w0.astype(np.float64), np.zeros(5), np.zeros(3)
    for step, scale in enumerate(scales, 1):
        g = (rng.standard_normal((5, 3)) * scale).astype(np.float32)
        train.update(variable, tf.constant(g), slots, tf.constant(float(step)), 0.01, hyper, ("h", "0", "lora_a"))
        beta2 = 1 - step ** -0.8
        g2 = g.astype(np.float64) ** 2 + 1e-30
        row, col = beta2 * row + (1 - beta2) * g2.mean(-1), beta2 * col + (1 - beta2) * g2.mean(-2)
        delta = g / np.sqrt(row[:, None] * col[None, :] / row.mean())
        w -= 0.01 * delta / max(1.0, np.sqrt(np.mean(delta ** 2)))
        np.testing.assert_allclose(variable.numpy(), w, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
