"""Fine-tuning GPT-2 on a user's text: datasets, the optimizers, the compiled training step, runs.

A run lives in one folder, models_dir/<run_name>/: OpenAI's model files (so every script loads it
as it loads 124M) and, in its `training/` subfolder, what resuming needs: the optimizer's state,
the step count and the data sampler's random state (state.npz), the run's settings
(settings.json) and the metrics so far (metrics.csv). The whole folder is written beside the old
one and renamed into place at each save: a kill at any moment leaves the last complete run.

Datasets are encoded once into a token file of uint16 (models_dir/datasets/<name>-<hash>.tokens),
read by memory map: a corpus larger than memory trains as well as a small one. Documents (files,
CSV rows, JSONL records) are joined with <|endoftext|> as the token itself.
"""
import contextlib
import csv
import glob
import hashlib
import json
import math
import os
import signal
import threading
import time
import zipfile
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from . import tensorflow_start  # noqa: F401  (before TensorFlow's first use: quiet, with its compilation cache)
from .arguments import ArgumentError
from .errors import GPT2Error, Interrupted
from .folders import (DATASETS, LEGACY_NAMES, MODEL_NAMES, TRAINING, check_replaceable, default_models_dir,
                      foreign_files, is_run, run_folder, writing)
from .model import forward, logits
from .score import score_tokens, text_pieces
from .storage import remove_dead_files, writing_name
from .strategies import distribution, is_chief
from .tensorflow_start import Compiled

TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit
TEXT_SUFFIXES = (".txt", ".csv", ".jsonl")


# Datasets.

def dataset_files(dataset):
    """The text files of `dataset`: a file, a folder (its .txt/.csv/.jsonl files, sorted) or a glob."""
    if os.path.isdir(dataset):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(dataset) for f in names
                       if f.endswith(TEXT_SUFFIXES))
    elif os.path.isfile(dataset):
        files = [dataset]
    else:
        files = sorted(glob.glob(dataset, recursive=True))
    if not files:
        raise ArgumentError(f"no text found at {{dataset}} {dataset}: give a .txt, .csv or .jsonl file, a folder "
                            "of them, or a glob such as 'texts/*.txt'", "dataset")
    return files


def documents(path, csv_column="text"):
    """The documents in one file, each an iterable of pieces of text: the whole of a .txt (read in
    pieces, see gpt2.score.text_pieces), a column of each .csv row, the `text` of each .jsonl line."""
    try:
        with open(path, encoding="utf-8", newline="" if path.endswith(".csv") else None) as f:
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                if csv_column not in (reader.fieldnames or []):
                    raise ArgumentError(f"{path} has no column {csv_column!r} (it has {reader.fieldnames}): "
                                        "name the text column with {csv_column}", "csv_column")
                yield from ([row[csv_column]] for row in reader if row[csv_column])
            elif path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise GPT2Error(f"{path} line {n} is not JSON ({e.msg}, column {e.colno}): each line "
                                            "must be an object such as {\"text\": \"...\"}") from e
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise GPT2Error(f"{path} line {n} has no \"text\" string: each line must be "
                                            "an object such as {\"text\": \"...\"}")
                        yield [record["text"]]
            else:
                yield text_pieces(f)  # read as its caller takes the pieces: see encoded_dataset
    except OSError as e:
        raise GPT2Error(f"cannot read {path}: {e.strerror}") from e


def encoded_dataset(dataset, encoder, cache_dir, csv_column="text", progress=True):
    """The tokens of `dataset` as a read-only memory map of uint16, encoded once into cache_dir.

    A file that ends in .tokens is taken as such a token file, its ids checked. The cache's name
    holds a hash of the files (paths, sizes, times), the CSV column and the vocabulary, so a changed
    file is encoded again. Encoding streams: a piece of text at a time is read, encoded and
    appended to the file.
    """
    if dataset.endswith(".tokens"):
        return token_file(dataset, encoder.n_vocab)
    if encoder.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise GPT2Error(f"a vocabulary of {encoder.n_vocab} tokens does not fit the dataset file's 16-bit ids")
    files = dataset_files(dataset)
    key = hashlib.sha256(json.dumps([[os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)] for f in files]
                                    + [csv_column, encoder.n_vocab, encoder.eot_token]).encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(dataset)).replace("*", "_") or "dataset"
    path = os.path.join(cache_dir, f"{name}-{key}.tokens")
    if not os.path.isfile(path):
        partial = writing_name(path)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            remove_dead_files(cache_dir, r".+\.tokens\.writing-(\d+)")  # what killed encodings left
            with open(partial, "wb") as out, tqdm(total=sum(os.path.getsize(f) for f in files), unit="B",
                                                   unit_scale=True, desc="encoding the dataset", leave=False,
                                                   disable=not progress) as bar:
                for f in files:
                    try:
                        for document in documents(f, csv_column):
                            # out.write, not ndarray.tofile, which loses what a full disk refuses without a word
                            for piece in document:
                                out.write(np.array(encoder.encode(piece), TOKEN_DTYPE).tobytes())
                                bar.update(len(piece.encode("utf-8")))
                            out.write(np.array([encoder.eot_token], TOKEN_DTYPE).tobytes())
                    except UnicodeDecodeError as e:
                        raise GPT2Error(f"{f} is not UTF-8 text ({e.reason} at byte {e.start} of a piece): "
                                        "save it as UTF-8 first, or leave it out of the dataset") from e
            os.replace(partial, path)  # whole or not at all: a later run never reads half a dataset
        except OSError as e:
            raise GPT2Error(f"cannot write the encoded dataset to {cache_dir} ({e.strerror}): free some space, "
                            "or choose another models_dir") from e
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    if os.path.getsize(path) == 0:
        raise GPT2Error(f"the dataset {dataset} is too small to train on: it holds no text")
    return np.memmap(path, TOKEN_DTYPE, mode="r")


def token_file(path, n_vocab):
    """The .tokens file `path` (uint16 ids, as encoded_dataset writes them) as a read-only memory map,
    checked to hold whole ids of a vocabulary of n_vocab tokens."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise GPT2Error(f"cannot read the dataset {path}: {e.strerror}") from e
    if size == 0 or size % np.dtype(TOKEN_DTYPE).itemsize:
        raise GPT2Error(f"{path} is not a token file: it has {size} bytes, not a whole number of 16-bit ids "
                        "(give the text files it was made from instead)")
    tokens = np.memmap(path, TOKEN_DTYPE, mode="r")
    if tokens.max() >= n_vocab:
        raise GPT2Error(f"{path} holds token ids up to {tokens.max()}, past this model's vocabulary of {n_vocab}: "
                        "it was made for another model; give the text files it was made from instead")
    return tokens


def random_windows(tokens, rng, batch_size, length):
    """[batch_size, length] windows of `tokens` at random starts (numpy, int32)."""
    starts = rng.integers(0, len(tokens) - length + 1, size=batch_size)
    return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


# The loss and the optimizers.

def loss(params, hparams, tokens, dtype="float32", recompute=False):
    """Mean cross-entropy, nats per token, of predicting tokens [batch, seq] from the ones before each."""
    return tf.reduce_mean(token_losses(params, hparams, tokens, dtype, recompute))


def token_losses(params, hparams, tokens, dtype="float32", recompute=False):
    """Cross-entropy [batch, seq - 1], nats, of predicting each token of tokens [batch, seq] from the ones before it.

    dtype: mixed precision. The weights are cast to bfloat16 or float16 where they are used, so the
    products and the activations kept for the backward pass take half the memory; gpt2.model keeps
    layer norm statistics, the softmax and the logits in float32, and the gradients of float32
    weights come back in float32. recompute: see gpt2.model.forward.
    """
    params = tf.nest.map_structure(lambda w: tf.cast(w, dtype), params)
    h = forward(params, hparams, tokens[:, :-1], recompute)
    token_logits = logits(params, h)  # [batch, seq - 1, n_vocab] float32
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tokens[:, 1:], token_logits)


class Hyper(NamedTuple):
    """The optimizer's settings (they change the compiled step)."""
    optimizer: str  # adam, adamw, sgd, adafactor
    weight_decay: float = 0.01  # adamw only
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    clip_norm: float = 1.0  # the gradients' global norm is cut to this (0: no clipping)


def decays(path):
    """Whether weight decay applies: to the weight matrices, not to layer norms or biases (AdamW's usual rule)."""
    return path[-1] == "w" or path[-1] in ("wte", "wpe")


def decay_mask(w):
    """1 for the rows of a linear layer's w, 0 for its last row (its bias, see gpt2.model.linear)."""
    return tf.concat([tf.ones_like(w[:-1]), tf.zeros_like(w[-1:])], axis=0)


def slot_shapes(shape, optimizer):
    """The optimizer's state for one variable of `shape`: {name: shape}."""
    if optimizer in ("adam", "adamw"):
        return {"m": shape, "v": shape}
    if optimizer == "adafactor":
        # Factored second moments (Shazeer and Stern, 2018): a row and a column statistic of a matrix.
        return {"row": shape[:-1], "col": shape[:-2] + shape[-1:]} if len(shape) >= 2 else {"v": shape}
    return {}  # sgd


def update(variable, gradient, slots, step, learning_rate, hyper, path):
    """One optimizer step for one variable; `step` counts from 1."""
    g = tf.cast(gradient, tf.float32)
    if hyper.optimizer == "sgd":
        delta = g
    elif hyper.optimizer in ("adam", "adamw"):
        slots["m"].assign(hyper.beta1 * slots["m"] + (1 - hyper.beta1) * g)
        slots["v"].assign(hyper.beta2 * slots["v"] + (1 - hyper.beta2) * tf.square(g))
        m_hat = slots["m"] / (1 - hyper.beta1 ** step)
        v_hat = slots["v"] / (1 - hyper.beta2 ** step)
        delta = m_hat / (tf.sqrt(v_hat) + hyper.epsilon)
    else:  # adafactor, without momentum, with update clipping at 1
        beta2 = 1 - step ** -0.8
        g2 = tf.square(g) + 1e-30
        if "v" in slots:
            slots["v"].assign(beta2 * slots["v"] + (1 - beta2) * g2)
            v = slots["v"]
        else:
            slots["row"].assign(beta2 * slots["row"] + (1 - beta2) * tf.reduce_mean(g2, axis=-1))
            slots["col"].assign(beta2 * slots["col"] + (1 - beta2) * tf.reduce_mean(g2, axis=-2))
            # row / mean(row) first: row * col of gradients near zero (LoRA's lora_a at the start)
            # underflows float32 to 0, and rsqrt(0) * 0 is NaN
            v = ((slots["row"] / tf.reduce_mean(slots["row"], axis=-1, keepdims=True))[..., None]
                 * slots["col"][..., None, :])
        delta = g * tf.math.rsqrt(v)
        delta /= tf.maximum(1.0, tf.sqrt(tf.reduce_mean(tf.square(delta))))
    if hyper.optimizer == "adamw" and decays(path):
        mask = decay_mask(variable) if path[-1] == "w" else 1.0
        delta += hyper.weight_decay * tf.cast(variable, tf.float32) * mask
    variable.assign_sub(tf.cast(learning_rate * delta, variable.dtype))


def learning_rate_at(step, base, warmup_steps, decay_steps):
    """Linear warm-up over warmup_steps, then constant, or a cosine down to base / 10 at decay_steps."""
    step = tf.cast(step, tf.float32)
    warm = tf.minimum(1.0, step / max(warmup_steps, 1))
    if not decay_steps:
        return base * warm
    progress = tf.minimum(1.0, step / decay_steps)
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + tf.cos(math.pi * progress)))


def leaves(tree, path=()):
    """(path, leaf) of each tensor of a params tree: ("h", "0", "attn", "c_attn", "w"), ..."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from leaves(tree[key], path + (key,))
    elif isinstance(tree, list):
        for i, node in enumerate(tree):
            yield from leaves(node, path + (str(i),))
    else:
        yield path, tree


class Memory(NamedTuple):
    """What a Trainer does to need less memory: the ladder of docs/finetuning.md's Less memory section."""
    recompute: bool = False  # each block's activations computed again in the backward pass
    dtype: str = "float32"  # bfloat16 or float16: computed in it, from float32 weights
    only_train_transformer_layers: bool = False  # wte, wpe and ln_f frozen, as nshepperd's flag
    lora_rank: int = 0  # R >= 1: rank-R adapters on the blocks' linear layers train alone


# The linear layers of a block that get low-rank adapters: all four, as LoRA's authors found best.
ADAPTED = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_GROWTH = 2000  # float16: the loss scale doubles after this many steps in a row without overflow


def add_adapters(params, rank, seed=0):
    """params with LoRA's low-rank adapters (Hu et al., 2021) on each block's linear layers: lora_a
    [n_in, rank] random, lora_b [rank, n_out] zero, so the adapted model starts as the model itself."""
    rng = np.random.default_rng(seed)
    params = {**params, "h": [{**p, **{part: dict(p[part]) for part in ("attn", "mlp")}} for p in params["h"]]}
    for p in params["h"]:
        for part, name in ADAPTED:
            n_in, n_out = p[part][name]["w"].shape[0] - 1, p[part][name]["w"].shape[1]
            # x @ lora_a keeps x's scale; lora_b's Adam steps then move the output at the learning rate.
            lora_a = rng.standard_normal((n_in, rank), np.float32) / np.float32(np.sqrt(n_in))
            p[part][name] = {"w": p[part][name]["w"], "lora_a": tf.constant(lora_a),
                             "lora_b": tf.zeros((rank, n_out), tf.float32)}
    return params


def merge_adapters(params):
    """params with each adapter folded into its w (w[:n_in] += lora_a @ lora_b, the bias row unchanged):
    a plain model that computes what the adapted one does, as OpenAI's folder stores it."""
    if isinstance(params, list):
        return [merge_adapters(p) for p in params]
    if not isinstance(params, dict):
        return params
    if "lora_a" in params:
        return {"w": params["w"] + adapter_product(params)}
    return {key: merge_adapters(node) for key, node in params.items()}


def adapter_product(layer):
    # [n_in + 1, n_out]: lora_a @ lora_b with a zero row for the bias
    return tf.pad(tf.matmul(layer["lora_a"], layer["lora_b"]), [[0, 1], [0, 0]])


def trains(path, memory):
    """Whether the weight at `path` ("h", "0", "attn", "c_attn", "w") is trained; the others are frozen."""
    if memory.lora_rank:
        return path[-1] in ("lora_a", "lora_b")
    if memory.only_train_transformer_layers:
        return path[0] == "h"
    return True


class Trainer:
    """The variables of a model being trained, its optimizer state, and the compiled step.

    `params` holds every weight as a float32 variable (with `memory.lora_rank`, the adapters too);
    `paths` and `variables` are the trained ones, each with its optimizer `slots`.

    With a tf.distribute.Strategy of several replicas, each variable has a copy on every replica
    and each replica takes an equal share of the batch; the gradients are summed across replicas
    (the loss is averaged over the whole batch), so every replica makes the same update. One
    replica's copy is taken when a variable is read outside the step (saving, sampling).
    """

    def __init__(self, params, hparams, hyper, learning_rate, warmup_steps=0, decay_steps=0, memory=Memory(),
                 seed=0, strategy=None):
        self.hparams, self.hyper, self.memory = hparams, hyper, memory
        default = tf.distribute.get_strategy()  # no distribution: the step compiles whole with XLA
        self.strategy = strategy or default
        if memory.lora_rank:
            params = add_adapters(params, memory.lora_rank, seed)
        with self.strategy.scope():
            def variable(value, trainable=False, dtype=None):
                # Each replica computes the same update: the first replica's is the one kept.
                return tf.Variable(value, trainable=trainable, dtype=dtype,
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            # tf.nest orders a dict's keys as `leaves` does: sorted.
            self.params = tf.nest.pack_sequence_as(params, [variable(w, trains(path, memory))
                                                            for path, w in leaves(params)])
            self.paths, self.variables = zip(*((path, v) for path, v in leaves(self.params) if v.trainable))
            self.slots = [{name: variable(tf.zeros(shape, tf.float32))
                           for name, shape in slot_shapes(v.shape.as_list(), hyper.optimizer).items()}
                          for v in self.variables]
            self.step = variable(0, dtype=tf.int64)
            # float16 keeps numbers above 6e-5 only (bfloat16 has float32's range): the loss is scaled up
            # before the backward pass so that small gradients do not vanish, and the gradients scaled back.
            self.loss_scale = variable(INITIAL_LOSS_SCALE if memory.dtype == "float16" else 1.0)
            self.good_steps = variable(0, dtype=tf.int64)
        self.schedule = (learning_rate, warmup_steps, decay_steps)
        # Several replicas sum their gradients, which XLA does not compile here: a plain graph then
        # (TPUStrategy compiles it with XLA, as it compiles everything).
        self._train = Compiled(self._train_step, jit_compile=self.strategy is default)

    def _replica_gradients(self, batch, global_tokens):
        """(this replica's part of the loss, its gradients of the trained variables) for one batch
        [replica's batch, seq + 1], the loss being the mean over `global_tokens` tokens of all replicas."""
        with tf.GradientTape() as tape:
            losses = token_losses(self.params, self.hparams, batch, self.memory.dtype, self.memory.recompute)
            # tf.nn.compute_average_loss, without its check of global_tokens (an assertion XLA warns it ignores)
            batch_loss = tf.reduce_sum(losses) / global_tokens
            scaled_loss = batch_loss * self.loss_scale
        return batch_loss, tape.gradient(scaled_loss, self.variables)

    def _train_step(self, batches):
        """One optimizer step on the mean gradients of batches [accumulate, global batch, seq + 1]
        (each replica's share of them, from `distribute`). Returns the mean loss and the gradients'
        global norm before clipping."""
        losses, norms = self.strategy.run(self._replica_step, args=(batches,))
        first = self.strategy.experimental_local_results
        return first(losses)[0], first(norms)[0]

    def _replica_step(self, batches):
        """_train_step on one replica, with its share of the batches."""
        accumulate, replicas = batches.shape[0], self.strategy.num_replicas_in_sync
        global_tokens = replicas * batches.shape[1] * (batches.shape[2] - 1)
        total_loss, total = 0.0, [tf.zeros_like(v) for v in self.variables]
        for i in range(accumulate):  # a few at most: unrolled, so XLA sees one program
            batch_loss, gradients = self._replica_gradients(batches[i], global_tokens)
            total = [t + g for t, g in zip(total, gradients)]
            total_loss += batch_loss
        # Summed across replicas: the gradients of the loss averaged over the global batch.
        total_loss, total = tf.distribute.get_replica_context().all_reduce("sum", (total_loss, total))
        gradients = [t / (accumulate * self.loss_scale) for t in total]
        norm = tf.linalg.global_norm(gradients)
        self.step.assign_add(1)
        if self.memory.dtype == "float16":
            finite = tf.math.is_finite(norm)
            tf.cond(finite, lambda: self._update(gradients, norm), tf.no_op)  # an overflow skips the step
            self._adjust_loss_scale(finite)
        else:
            self._update(gradients, norm)
        return total_loss / accumulate, norm

    def _update(self, gradients, norm):
        if self.hyper.clip_norm:
            gradients, _ = tf.clip_by_global_norm(gradients, self.hyper.clip_norm, use_norm=norm)
        step = tf.cast(self.step, tf.float32)
        rate = learning_rate_at(step, *self.schedule)
        for variable, gradient, slots, path in zip(self.variables, gradients, self.slots, self.paths):
            update(variable, gradient, slots, step, rate, self.hyper, path)
        return tf.no_op()

    def _adjust_loss_scale(self, finite):
        """Dynamic loss scaling: halve the scale after an overflow, double it after LOSS_SCALE_GROWTH good steps."""
        good_steps = tf.where(finite, self.good_steps + 1, 0)
        grow = good_steps >= LOSS_SCALE_GROWTH
        self.loss_scale.assign(tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5) * self.loss_scale)
        self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), good_steps))

    def train_step(self, batches):
        """(loss, gradient norm) of one step on int32 batches [accumulate, batch, seq + 1]."""
        batch_loss, norm = self._train(self.distribute(batches))
        return float(batch_loss), float(norm)

    def distribute(self, batches):
        """Each replica's share of batches [accumulate, global batch, seq + 1]: its own rows of the
        global batch (every worker of several machines draws the same batches and takes its share)."""
        replicas = self.strategy.num_replicas_in_sync
        if batches.shape[1] % replicas:
            raise ArgumentError(f"a batch of {batches.shape[1]} does not split evenly across {replicas} replicas: "
                                f"make {{batch_size}} a multiple of {replicas}", "batch_size")
        share = batches.shape[1] // replicas

        def replica_share(context):
            first = context.replica_id_in_sync_group * share
            return tf.constant(batches[:, first:first + share])
        return self.strategy.experimental_distribute_values_from_function(replica_share)

    def state(self):
        """What resuming needs beyond the model folder, as {name: array}: the step, the optimizer's
        state, the adapters (the folder holds them merged into the weights) and the loss scale."""
        state = {"step": self.step.numpy()}
        if self.memory.dtype == "float16":
            state.update(loss_scale=self.loss_scale.numpy(), good_steps=self.good_steps.numpy())
        for path, variable, slots in zip(self.paths, self.variables, self.slots):
            state.update({"/".join(path) + ":" + name: slot.numpy() for name, slot in slots.items()})
            if self.memory.lora_rank:
                state["/".join(path)] = variable.numpy()
        return state

    def restore(self, state):
        """Take up a saved state (of a run with the same Memory and optimizer) after the folder's weights are loaded."""
        self.step.assign(int(state["step"]))
        for path, variable, slots in zip(self.paths, self.variables, self.slots):
            for name, slot in slots.items():
                slot.assign(state["/".join(path) + ":" + name])
            if self.memory.lora_rank:
                variable.assign(state["/".join(path)])
        for p in self.params["h"] if self.memory.lora_rank else []:
            for part, name in ADAPTED:  # the folder's weights are merged: take the adapters out again
                p[part][name]["w"].assign_sub(adapter_product(p[part][name]))
        if "loss_scale" in state and self.memory.dtype == "float16":  # a run may change its dtype
            self.loss_scale.assign(float(state["loss_scale"]))
            self.good_steps.assign(int(state["good_steps"]))


# Runs.

def run(settings):
    """Train as `settings` (a gpt2.finetuning.Settings, checked) say; returns the run folder.

    One process at a time writes a run (the others are refused with one line): its folder and
    `<run>_best` are only written while it holds the run's lock, taken before any training.
    """
    s = settings
    strategy = distribution(s.strategy)  # first: the multi-worker strategy must come before TensorFlow computes
    models_dir = s.models_dir or default_models_dir()
    run_dir = run_folder(models_dir, s.run_name)
    # The chief alone writes (see save): it repairs what a killed run left, and holds the lock.
    with writing(run_dir) if is_chief(strategy) else contextlib.nullcontext():
        return train_run(s, strategy, models_dir, run_dir)


def check_run_folders(settings, run_dir):
    """An ArgumentError where this run would replace what it must not: files that are not a model's,
    a model that is not a fine-tuning run (unless `overwrite`), a `<run>_best` that is not a run."""
    check_replaceable(run_dir, "run_name")
    if not is_run(run_dir):
        name = str(settings.run_name)
        if not settings.overwrite and (name in MODEL_NAMES + tuple(LEGACY_NAMES) or os.path.isdir(run_dir)
                                       and os.listdir(run_dir)):
            raise ArgumentError(f"{run_dir} holds a model that is not a fine-tuning run: choose another {{run_name}}, "
                                "or set {overwrite} to replace it", "run_name", "overwrite")
    best = f"{run_dir}_best"
    if settings.keep_best and (foreign_files(best) or not is_run(best) and os.path.isdir(best) and os.listdir(best)):
        raise ArgumentError(f"{best}, where {{keep_best}} would save the best weights, holds something else than "
                            "this run's best: choose another {run_name}, or move it away", "keep_best", "run_name")


def train_run(s, strategy, models_dir, run_dir):
    """run's work, in the run's folder run_dir, which no other process writes meanwhile."""
    from .api import GPT2, load

    check_run_folders(s, run_dir)
    state_file = os.path.join(run_dir, TRAINING, "state.npz")
    resume = is_run(run_dir)
    if s.restore_from == "latest" and resume:
        model = GPT2.from_folder(run_dir)
    elif s.restore_from in ("latest", "fresh"):
        model = load(s.model_name, models_dir, base_url=s.base_url, progress=s.progress)
        resume = False
    else:
        model = GPT2.from_folder(s.restore_from)
        resume = False
    hparams, encoder = model.hparams, model.encoder
    n_ctx = hparams.n_ctx
    sequence_length = s.sequence_length or n_ctx
    if sequence_length > n_ctx:
        raise ArgumentError(f"{{sequence_length}} {sequence_length} is more than the model's context of {n_ctx} "
                            "tokens", "sequence_length")

    cache_dir = os.path.join(models_dir, DATASETS)
    tokens = encoded_dataset(str(s.dataset), encoder, cache_dir, s.csv_column, s.progress)
    if s.val_dataset:
        val = encoded_dataset(str(s.val_dataset), encoder, cache_dir, s.csv_column, s.progress)
    elif s.val_fraction:
        cut = int(len(tokens) * (1 - s.val_fraction))
        tokens, val = tokens[:cut], tokens[cut:]
    else:
        val = None
    if len(tokens) < 2:
        raise GPT2Error(f"the dataset {s.dataset} is too small to train on: it has {len(tokens)} tokens")
    if len(tokens) < sequence_length + 1:  # a text shorter than the context trains on all of it at once
        sequence_length = len(tokens) - 1

    if s.lora_rank and s.lora_rank > hparams.n_embd:
        raise ArgumentError(f"{{lora_rank}} {s.lora_rank} is more than the model's width of {hparams.n_embd}: "
                            "a rank that high adapts nothing more, give a smaller one", "lora_rank")
    if resume:
        check_same_state(s, run_dir)
    hyper = Hyper(s.optimizer, weight_decay=s.weight_decay, clip_norm=s.clip_norm)
    memory = Memory(s.recompute, s.dtype, s.only_train_transformer_layers, s.lora_rank or 0)
    trainer = Trainer(model.params, hparams, hyper, s.learning_rate, s.warmup_steps, s.decay_steps, memory, s.seed,
                      strategy)
    chief = is_chief(strategy)
    del model.params  # the trainer's variables hold the weights now
    rng = np.random.default_rng(s.seed)
    metrics = []
    if resume:
        try:
            with np.load(state_file, allow_pickle=False) as saved:
                trainer.restore(dict(saved))
                rng.bit_generator.state = json.loads(str(saved["data_rng"]))
            metrics = read_metrics(os.path.join(run_dir, TRAINING, "metrics.csv"))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, csv.Error) as e:
            raise damaged_run(run_dir, e) from e
    model_dir = model.model_dir
    trained = GPT2(hparams, trainer.params, encoder, model_dir)
    best = min((m["val_loss"] for m in metrics if m.get("val_loss") is not None), default=math.inf)
    prompt = s.sample_prompt or first_line(encoder.decode(np.asarray((val if val is not None else tokens)[:200])))

    strategy_name = s.strategy if isinstance(s.strategy, str) else type(s.strategy).__name__

    def save(path=run_dir):
        nonlocal last_save
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in trainer.variables):
            raise diverged(int(trainer.step.numpy()), "weights", math.nan, last_save)
        if not chief:  # the other workers hold the same weights: one writes them
            return
        def write_training(folder):
            os.makedirs(os.path.join(folder, TRAINING))
            np.savez(os.path.join(folder, TRAINING, "state.npz"), data_rng=json.dumps(rng.bit_generator.state),
                     **trainer.state())
            write_metrics(os.path.join(folder, TRAINING, "metrics.csv"), metrics)
            with open(os.path.join(folder, TRAINING, "settings.json"), "w", encoding="utf-8") as f:
                json.dump({**s._asdict(), "strategy": strategy_name}, f, indent=2)
        # With adapters, the folder holds them merged into the weights: a plain model for every script.
        try:
            GPT2(hparams, merge_adapters(trainer.params), encoder, model_dir).save(path, write_training, s.save_format)
        except GPT2Error as e:
            raise GPT2Error(f"{e} (step {int(trainer.step.numpy())} was not saved)") from e
        if path == run_dir:
            last_save = int(trainer.step.numpy())

    stop = StopRequest()
    first_step = int(trainer.step.numpy())
    last_save = first_step if resume else None  # the step of the run folder's weights
    window = s.accumulate_gradients * s.batch_size
    bar = tqdm(total=s.steps, desc=f"training {s.run_name}", disable=not s.progress, dynamic_ncols=True)
    smoothed = metrics[-1]["smoothed_loss"] if metrics else None  # goes on where the run left it
    train_seconds = []
    with stop:
        for _ in range(s.steps):
            if stop.requested:
                break
            batches = random_windows(tokens, rng, window, sequence_length + 1)
            start = time.perf_counter()
            batch_loss, norm = trainer.train_step(batches.reshape(s.accumulate_gradients, s.batch_size, -1))
            train_seconds.append(time.perf_counter() - start)
            step = int(trainer.step.numpy())
            # float16 skips a step whose gradients overflowed (see Trainer): only its loss tells divergence.
            if not math.isfinite(batch_loss) or s.dtype != "float16" and not math.isfinite(norm):
                raise diverged(step, "loss" if not math.isfinite(batch_loss) else "gradient norm",
                               batch_loss if not math.isfinite(batch_loss) else norm, last_save)
            smoothed = batch_loss if smoothed is None else 0.9 * smoothed + 0.1 * batch_loss
            # Training steps only (not validation or samples), after the first one, which compiles.
            tokens_per_s = ((len(train_seconds) - 1) * window * sequence_length / sum(train_seconds[1:])
                            if len(train_seconds) > 1 else math.nan)
            record = {"step": step, "loss": batch_loss, "smoothed_loss": smoothed, "grad_norm": norm,
                      "learning_rate": float(learning_rate_at(step, s.learning_rate, s.warmup_steps, s.decay_steps)),
                      "tokens_per_s": tokens_per_s, "val_loss": None, "val_perplexity": None}
            metrics.append(record)
            bar.set_postfix(step=step, loss=f"{smoothed:.3f}", tokens_s=f"{tokens_per_s:.0f}")
            bar.update(1)
            if val is not None and s.val_every and step % s.val_every == 0:
                record["val_loss"] = validation_loss(trained, val, s.val_tokens)
                record["val_perplexity"] = math.exp(record["val_loss"])
                bar.write(f"step {step}: validation loss {record['val_loss']:.4f}, "
                          f"perplexity {record['val_perplexity']:.2f}")
                if s.keep_best and record["val_loss"] < best:
                    best = record["val_loss"]
                    save(f"{run_dir}_best")
            if s.sample_every and step % s.sample_every == 0:
                [text] = trained.generate(prompt, s.sample_length, top_k=40, seed=step, truncate_prompt=True)
                bar.write(f"======== sample at step {step} ========\n{prompt}{text}\n")
            if s.save_every and step % s.save_every == 0 and step - first_step < s.steps:
                save()
    bar.close()
    save()
    if stop.requested:
        raise Interrupted(f"interrupted at step {int(trainer.step.numpy())}: saved to {run_dir}; rerun the same "
                          "command to go on")
    return run_dir


def diverged(step, what, value, last_save):
    """The GPT2Error for training whose `what` became `value` (not finite) at `step`."""
    kept = (f"the run folder keeps step {last_save}" if last_save is not None
            else "nothing was saved")
    return ArgumentError(f"training diverged at step {step} (its {what} is {value}): {kept}; lower "
                         "{learning_rate}, then run again", "learning_rate")


def damaged_run(run_dir, error):
    """The GPT2Error for a run folder whose training state cannot be read."""
    return GPT2Error(f"{os.path.join(run_dir, TRAINING)} is damaged ({type(error).__name__}: {error}): set "
                     f"restore_from to {run_dir} to go on from its weights with a new optimizer state, or to fresh "
                     "to start again")


# The settings that shape what state.npz holds: a run resumes with the ones it started with.
STATE_SETTINGS = {"optimizer": "adamw", "lora_rank": None, "only_train_transformer_layers": False}


def check_same_state(settings, run_dir):
    """An ArgumentError if the run in run_dir was started with other STATE_SETTINGS than `settings`."""
    try:
        with open(os.path.join(run_dir, TRAINING, "settings.json"), encoding="utf-8") as f:
            started = json.load(f)
    except (OSError, ValueError) as e:
        raise damaged_run(run_dir, e) from e
    for name, default in STATE_SETTINGS.items():
        before, now = started.get(name, default), getattr(settings, name)
        if before != now:
            raise ArgumentError(f"{run_dir} was trained with {{{name}}} {before}, not {now}: give the same, or set "
                                "{restore_from} to fresh to start again", name, "restore_from")


class StopRequest:
    """Ctrl-C during training asks the loop to stop after the step in progress (which then saves).

    A second Ctrl-C stops at once, with the last save kept. Only the main thread can catch signals;
    elsewhere (a thread) Ctrl-C is not seen here at all.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def validation_loss(model, val, val_tokens):
    """Mean nats per token of the first val_tokens tokens of `val`, scored as gpt2.score does."""
    tokens = np.asarray(val[:val_tokens], np.int64)
    logprobs = np.concatenate([scored.logprobs for scored in score_tokens(
        model.params, model.hparams, tokens.tolist(), model.encoder.eot_token, stride=model.hparams.n_ctx // 2)])
    return -float(logprobs.mean())


def first_line(text):
    """The first non-empty line of `text`, cut to 200 characters: a real prompt for samples."""
    return next((line.strip()[:200] for line in text.splitlines() if line.strip()), text[:200])


METRICS = ("step", "loss", "smoothed_loss", "grad_norm", "learning_rate", "tokens_per_s", "val_loss", "val_perplexity")


def write_metrics(path, metrics):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, METRICS)
        writer.writeheader()
        writer.writerows({k: "" if m[k] is None else m[k] for k in METRICS} for m in metrics)


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: None if row[k] == "" else (int(row[k]) if k == "step" else float(row[k])) for k in METRICS}
                for row in csv.DictReader(f)]
