"""int8 weights (gpt2.int8) against the float32 model they are quantized from, on the tiny model."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2 import int8, int8_programs, sampling
from gpt2.arguments import ArgumentError, check_dtype
from gpt2.decode import XlaEngine
from gpt2.engine import Request, Settings, Step, decode_requests, shared_prefix_length
from gpt2.errors import GPT2Error
from gpt2.cache import MIN_FREE_BYTES
from gpt2.testing import make_model_folder, sample

# What quantizing costs, measured on the tiny model (its 32-wide layers quantize worse than real
# ones: each input row gets one int8 scale for 32 numbers): the largest logit error was 6% of the
# logits' standard deviation over 20 positions, and greedy tokens agreed at every step.
LOGIT_TOLERANCE = 0.12  # largest |int8 - float32| logit, over the float32 logits' standard deviation


@pytest.fixture(scope="module")
def int8_model(tiny_model, model):
    hparams, _ = model
    return int8.load_int8(tiny_model, hparams)


def test_quantize_keeps_each_weight_within_half_a_step_of_its_column():
    w = np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    w[:, 3] = 0  # an all-zero column stays zeros
    q, scale = int8_programs.quantize(w)
    assert q.dtype == np.int8 and q.shape == (16, 48) and scale.shape == (16,)
    assert np.all(np.abs(q * scale[:, None] - w.T) <= scale[:, None] / 2 + 1e-7)
    assert np.all(np.abs(q[[i for i in range(16) if i != 3]]).max(axis=1) == 127)  # each column's range is used
    assert not q[3].any()


def relative_error(got, want):
    return np.abs(got - want).max() / want.std()


def engine_for(model, contexts):
    """An Int8Engine of a row per context, whose prefix is what they all start with, as gpt2.api makes it."""
    return int8.Int8Engine(model, len(contexts), contexts[0][:shared_prefix_length(contexts)])


def fed_logits(model, contexts, next_tokens=()):
    """The logits [rows, n_vocab] after each row's prompt in `contexts`, then after each of its next_tokens
    [rows, steps] in turn, fed straight into engine.forward: a list, and the engine (engine_for's)."""
    engine = engine_for(model, contexts)
    next_tokens = np.array(next_tokens, np.int32).reshape(len(contexts), -1)
    engine.admit([Request(list(context), 1 + next_tokens.shape[1], Settings()) for context in contexts])
    values, live = engine.values, np.ones(len(contexts), bool)
    logits = [engine.forward(values.token, values.pos, live)]  # each row's last prompt token
    for step, tokens in enumerate(next_tokens.T):
        logits.append(engine.forward(tokens, values.pos + 1 + step, live))
    return logits, engine


@pytest.mark.parametrize("prompt_piece", [64, 5])  # the prompts in one run of each block, or in pieces of 5
@pytest.mark.parametrize("n_shared", [0, 6])  # the rows start with 6 tokens in common: cached once for both
def test_logits_follow_float32_through_the_prompt_and_each_step(int8_model, full_logits, prompt_piece, n_shared,
                                                                 monkeypatch):
    monkeypatch.setattr(int8, "PROMPT_PIECE", prompt_piece)
    rng = np.random.default_rng(1)
    rows = [[600] + rng.integers(0, 657, 25).tolist(), [601] + rng.integers(0, 657, 25).tolist()]
    rows[1][:n_shared] = rows[0][:n_shared]
    want = np.stack([full_logits(r) for r in rows])  # [2, 26, n_vocab]
    n_prompt = [12, 7]  # prompts of different lengths share the batch
    # 16 own cache slots at first; on to 26 tokens, they grow to 24, then to 32 where nothing is shared
    got, engine = fed_logits(int8_model, [r[:n] for r, n in zip(rows, n_prompt)],
                             [r[n:n + 14] for r, n in zip(rows, n_prompt)])
    assert len(engine.prefix) == n_shared
    errors = [relative_error(logits[b], want[b, n_prompt[b] - 1 + step])
              for step, logits in enumerate(got) for b in range(2)]
    assert int8_model.blocks[0].shapes["keys"][3] == (32 if n_shared == 0 else 24)  # it grew on the way
    assert int8_model.blocks[0].shapes["shared_keys"][2] == max(n_shared, 1)  # 1: an empty slot
    assert max(errors) < LOGIT_TOLERANCE, errors


PROMPT = [5, 9, 100, 300, 2, 70, 71, 8]


@pytest.mark.parametrize("rows, n_shared", [
    ([PROMPT, PROMPT + [40, 41], PROMPT], len(PROMPT) - 1),  # each row runs its last prompt token: its own logits
    ([[1] + PROMPT, PROMPT, [1] + PROMPT], 0)])  # nothing shared; two rows with the same prompt run it once
def test_rows_get_the_logits_they_get_alone(int8_model, rows, n_shared, monkeypatch):
    """Several samples of a prompt (or prompts that start alike) share its cache: the same logits as each
    row alone (they were equal to the bit on this machine; kernels may sum in another order elsewhere)."""
    run_prompt, rows_run = int8.Int8Model.run_prompt, []

    def counting_rows(model, block, x, *args):
        rows_run.append(len(x))
        return run_prompt(model, block, x, *args)

    monkeypatch.setattr(int8.Int8Model, "run_prompt", counting_rows)
    next_tokens = [[7, 8, 9], [10, 11, 12], [13, 14, 15]]  # 3 steps each
    together, engine = fed_logits(int8_model, rows, next_tokens)
    monkeypatch.undo()
    assert len(engine.prefix) == n_shared
    # Each block runs the shared tokens once (as the engine is made), then the 2 different rests: 3 rows run as 2.
    assert rows_run == ([1] * len(int8_model.blocks) if n_shared else []) + [2] * len(int8_model.blocks)
    for b, row in enumerate(rows):
        alone, engine = fed_logits(int8_model, [row], next_tokens[b:b + 1])
        assert len(engine.prefix) == len(row) - 1  # all of a lone row's prompt but its last token
        for got, want in zip(alone, together):
            np.testing.assert_allclose(got[0], want[b], rtol=0, atol=1e-4 * want[b].std())


def test_each_block_gets_its_own_weights(int8_model, full_logits):
    """Swapping two blocks' programs (wrong places for their weights) moves the logits far out of tolerance."""
    tokens = [5, 9, 100, 300]
    want = full_logits(tokens)[-1]
    assert relative_error(prompt_logits(int8_model, tokens)[0], want) < LOGIT_TOLERANCE
    swapped = int8.Int8Model(int8_model.hparams, int8_model.blocks[::-1], int8_model.head, int8_model.wte,
                             int8_model.wte_scale, int8_model.wpe)
    assert relative_error(prompt_logits(swapped, tokens)[0], want) > 4 * LOGIT_TOLERANCE


def test_the_output_layer_in_pieces_gives_the_logits_of_one_piece(tiny_model, model, int8_model, monkeypatch):
    monkeypatch.setenv("GPT2_XLA_CACHE", "off")
    monkeypatch.setattr(int8, "PIECE_WEIGHTS", 200 * 32)  # the tiny model's 657 tokens in 4 pieces of 165
    hparams, _ = model
    in_pieces = int8.load_int8(tiny_model, hparams)
    assert [len(int8_model.head), len(in_pieces.head)] == [1, 4]  # the last with 3 rows of padding
    contexts, next_tokens = [[5, 9, 100, 300], [7, 8, 9]], [[650], [656]]  # the prompts' logits, then a step's
    in_one_piece = fed_logits(int8_model, contexts, next_tokens)[0]
    for got, want in zip(fed_logits(in_pieces, contexts, next_tokens)[0], in_one_piece):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_greedy_text_is_float32s(model, int8_model):
    hparams, params = model
    context = [3, 40, 41, 7]
    want = sample(XlaEngine(params, hparams, 1), [context], 40, temperature=0)[0]
    made = list(decode_requests(engine_for(int8_model, [context]), [Request(context, 40, Settings(temperature=0))],
                                chunk_size=16))
    assert [len(m.tokens) for m in made] == [16, 16, 8] and made[-1].ended
    got = np.concatenate([m.tokens for m in made]).tolist()
    assert got == want


@pytest.mark.parametrize("flags", [dict(top_k=40), dict(top_p=0.9), dict(temperature=0.7)])
def test_samples_are_those_of_their_seed_and_number_whatever_the_batch(int8_model, flags):
    def rows(contexts, first_sample):
        return sample(engine_for(int8_model, contexts), contexts, 24, seed=5, sample=first_sample, **flags)

    batch = rows([[1, 2, 3]] * 3, first_sample=0)
    assert rows([[1, 2, 3]], first_sample=2)[0] == batch[2]
    assert rows([[1, 2, 3]] * 3, first_sample=0) == batch
    assert len({tuple(r) for r in batch}) == 3


def test_tokens_are_those_the_compiled_rules_draw_from_its_logits(int8_model):
    """The NumPy rules (gpt2.numpy_sampling) pick what gpt2.sampling's would from the int8 logits."""
    context, seed, sample_number = [1, 2, 3], 3, 2
    got = sample(engine_for(int8_model, [context]), [context], 8, top_k=40, top_p=0.9, temperature=0.8, seed=seed,
                 sample=sample_number)[0]
    compiled_choose = tf.function(sampling.choose, jit_compile=True)
    logits, _ = fed_logits(int8_model, [context], [got[:-1]])  # after the prompt, then after each token drawn
    assert len(got) == len(logits) == 8
    for step, (token, step_logits) in enumerate(zip(got, logits)):
        draws = sampling.Draws(tf.constant([[seed, sample_number]], tf.int64), tf.constant([step]),
                               tf.constant([0.8]), tf.constant([40]), tf.constant([0.9]), tf.constant([0.0]))
        assert token == compiled_choose(tf.constant(step_logits), draws).numpy()[0], step


def test_a_row_ends_at_its_stop_token_while_the_other_goes_on(int8_model):
    """A row that draws its stop token ends there (Step.ended; the stop token is its last token) and makes
    nothing more, while the row beside it, whose stop token is another, makes all of its tokens, the
    same as without a row that stops beside it."""
    contexts = [[1, 2], [3, 4]]
    free = sample(engine_for(int8_model, contexts), contexts, 12, temperature=2.0, seed=3, top_k=8)
    stop = free[0][3]
    end = free[0].index(stop)  # the step at which the first row draws it
    engine = engine_for(int8_model, contexts)
    rows = engine.admit([Request(context, 12, Settings(temperature=2.0, top_k=8, seed=3, sample=i,
                                                       stop_token=stop if i == 0 else None))
                         for i, context in enumerate(contexts)])
    steps = [engine.step() for _ in range(12)]
    for i, step in enumerate(steps):
        assert step.ended == ([rows[0]] if i == end else [rows[1]] if i == 11 else []), i
        assert list(step.tokens) == (rows if i <= end else rows[1:]), i
    assert [steps[i].tokens[rows[0]].tolist() for i in range(end + 1)] == [[t] for t in free[0][:end + 1]]
    assert np.concatenate([step.tokens[rows[1]] for step in steps]).tolist() == free[1]
    assert engine.step() == Step({}, [])


def test_greedy_text_ends_at_the_stop_token(int8_model, monkeypatch):
    free = sample(engine_for(int8_model, [[1, 2]]), [[1, 2]], 12, temperature=0)[0]
    stop = free[3]
    engine, forward, fed = engine_for(int8_model, [[1, 2]]), int8.Int8Engine.forward, []

    def counting_steps(engine, *args):
        fed.append(args)
        return forward(engine, *args)

    monkeypatch.setattr(int8.Int8Engine, "forward", counting_steps)
    made = list(decode_requests(engine, [Request([1, 2], 12, Settings(temperature=0, stop_token=stop))]))
    assert np.concatenate([m.tokens for m in made]).tolist() == free[:free.index(stop) + 1] and made[-1].ended
    assert len(fed) == free.index(stop) + 1  # the only row is done: no more steps


def test_the_api_generates_with_int8(tiny_model):
    model = gpt2.load("tiny", str(tiny_model.parent), dtype="int8")
    float32 = gpt2.load("tiny", str(tiny_model.parent))
    assert model.generate("The river", 20, temperature=0) == float32.generate("The river", 20, temperature=0)
    assert (model.generate("The river", 20, temperature=0, nsamples=3, batch_size=3)  # the prompt's cache shared
            == float32.generate("The river", 20, temperature=0, nsamples=3, batch_size=3))
    texts = model.generate(["a", "The mill by the river"], 10, top_k=40, seed=4, nsamples=2, batch_size=3)
    assert [len(t) for t in texts] == [2, 2]
    assert "".join(model.stream("The river", 10, top_p=0.9, seed=4)) == model.generate("The river", 10, top_p=0.9,
                                                                                        seed=4)[0]
    with pytest.raises(GPT2Error, match="scoring needs the model's float weights"):
        model.score("The river")
    with pytest.raises(GPT2Error, match="saving needs the model's float weights"):
        model.save(str(tiny_model.parent / "copy"))


def test_int8_is_for_generating_on_one_replica(tiny_model):
    with pytest.raises(ArgumentError, match="int8 weights run on this machine's CPU, as one replica"):
        gpt2.load("tiny", str(tiny_model.parent), dtype="int8", strategy="mirrored")
    with pytest.raises(ArgumentError, match="dtype must be one of float32, float16, bfloat16, not 'int8'"):
        check_dtype("int8")  # as training and scoring check it


def test_a_damaged_cached_program_is_made_again(model, tmp_path, monkeypatch):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))
    made = int8_programs.cached_template(hparams, "block")
    [path] = tmp_path.glob("int8/int8-block-*.tflite")
    assert path.read_bytes()[:len(made.program)] == made.program
    stored = path.read_bytes()
    for damage in (lambda: path.write_bytes(stored[:1000]), lambda: changed(path, 1.0), lambda: changed(path, 0.5)):
        damage()  # cut off, or bytes changed at its end (segmentation fault) or in its middle (other numbers)
        again = int8_programs.cached_template(hparams, "block")
        assert again == made and path.read_bytes() == stored
    monkeypatch.setitem(int8_programs.TEMPLATES, "block", (lambda hparams: pytest.fail("converted again"),
                                                          int8_programs.block_shapes))
    read = int8_programs.cached_template(hparams, "block")
    assert read == made


def test_making_a_program_removes_other_versions_programs(model, tmp_path, monkeypatch):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))
    folder = tmp_path / "int8"
    folder.mkdir()
    stale = [folder / "int8-block-32-4-8192.tflite", folder / f"int8-head-768-12-7180-{'0' * 12}.tflite"]
    kept = [folder / f"int8-head-768-12-12565-{int8.version()}.tflite",  # another size, this version
            folder / "int8-block-768-12-12565-0.tflite.999.tmp"]  # another process writing one
    for path in stale + kept:
        path.write_bytes(b"program")
    int8_programs.cached_template(hparams, "block")
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_the_programs_take_the_weights_in_place_of_the_stand_ins(model):
    hparams, _ = model
    template = int8_programs.cached_template(hparams, "block")
    rng = np.random.default_rng(2)
    weights = {name: int8_programs.quantize(rng.standard_normal((a * hparams.n_embd, b * hparams.n_embd)))
               for name, _, (a, b) in int8_programs.LAYERS}
    program = int8.Program(template.fill(weights), {}).interpreter
    for detail in program.get_tensor_details():
        for name, (q, scale) in weights.items():
            if detail["shape"].tolist() == list(q.shape) and detail["dtype"] == np.int8:
                assert (program.get_tensor(detail["index"]) == q).all()
                assert (detail["quantization_parameters"]["scales"] == scale).all()


def prompt_logits(model, tokens=(3, 1, 4, 1, 5)):
    return fed_logits(model, [list(tokens)])[0][0]


def stored_folders(cache):
    return sorted(path for path in cache.glob("int8/*") if path.is_dir())


def test_a_stored_model_loads_again_without_reading_its_checkpoint(model, tiny_model, int8_model, tmp_path,
                                                                   monkeypatch):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))
    first = int8.load_int8(tiny_model, hparams)
    [folder] = stored_folders(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "block0.tflite", "block1.tflite", "checksums.json", "head0.tflite", "ln_f_b.npy", "ln_f_g.npy", "vectors.npz",
        "wpe.npy", "wte.npy", "wte_scale.npy"]
    monkeypatch.setattr(int8_programs, "read_weights", lambda *args: pytest.fail("the checkpoint was read"))
    again = int8.load_int8(tiny_model, hparams)
    assert (prompt_logits(again) == prompt_logits(first)).all()
    assert (prompt_logits(again) == prompt_logits(int8_model)).all()  # the test session's cache: the same programs


def test_without_a_cache_folder_the_programs_stay_in_memory(model, tiny_model, int8_model, monkeypatch):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", "off")
    assert int8.stored_folder(tiny_model, hparams) is None
    in_memory = int8.load_int8(tiny_model, hparams)
    assert (prompt_logits(in_memory) == prompt_logits(int8_model)).all()


def test_a_changed_checkpoint_is_quantized_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "models" / "tiny"
    hparams = make_model_folder(model_dir)
    before = prompt_logits(int8.load_int8(model_dir, hparams))
    [old] = stored_folders(tmp_path / "cache")
    make_model_folder(model_dir, seed=1)  # new weights in the same folder (as fine-tuning saves them)
    after = prompt_logits(int8.load_int8(model_dir, hparams))
    [new] = stored_folders(tmp_path / "cache")  # the old checkpoint's programs are removed
    assert new != old and not (after == before).all()
    monkeypatch.setenv("GPT2_XLA_CACHE", "off")
    assert (after == prompt_logits(int8.load_int8(model_dir, hparams))).all()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_storing_cut_off_leaves_nothing_behind(model, tiny_model, int8_model, tmp_path, monkeypatch, failure):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))

    def save(*args, **kwargs):
        raise failure

    monkeypatch.setattr(np, "save", save)  # after the programs' files, before the arrays'
    if isinstance(failure, OSError):  # loaded anyway, with the programs in memory
        assert (prompt_logits(int8.load_int8(tiny_model, hparams)) == prompt_logits(int8_model)).all()
    else:
        with pytest.raises(KeyboardInterrupt):
            int8.load_int8(tiny_model, hparams)
    assert stored_folders(tmp_path) == [] and not list(tmp_path.glob("int8/*.tmp"))


def test_a_nearly_full_disk_stores_nothing(model, tiny_model, int8_model, tmp_path, monkeypatch):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))
    nearly_full = shutil.disk_usage(tmp_path)._replace(free=MIN_FREE_BYTES + 1)  # the cache's minimum
    monkeypatch.setattr(shutil, "disk_usage", lambda path: nearly_full)
    assert (prompt_logits(int8.load_int8(tiny_model, hparams)) == prompt_logits(int8_model)).all()
    assert stored_folders(tmp_path) == []


def changed(path, where):
    """Flip 64 bytes of the file at `where` (a fraction of its size), in place."""
    data = bytearray(path.read_bytes())
    start = min(int(len(data) * where), len(data) - 64)
    data[start:start + 64] = bytes(b ^ 0x5A for b in data[start:start + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [lambda folder: (folder / "block1.tflite").unlink(),
                                    lambda folder: (folder / "wte.npy").write_bytes(b""),
                                    lambda folder: (folder / "vectors.npz").write_bytes(b"PK\x03\x04 cut off"),
                                    # each of these crashed the process (a segmentation fault) or gave other text:
                                    lambda folder: (folder / "block1.tflite").write_bytes(
                                        (folder / "block1.tflite").read_bytes()[:-100]),
                                    lambda folder: changed(folder / "block0.tflite", 1.0),
                                    lambda folder: changed(folder / "head0.tflite", 0.5),
                                    lambda folder: changed(folder / "wpe.npy", 0.5)])
def test_a_damaged_stored_model_is_quantized_again(model, tiny_model, int8_model, tmp_path, monkeypatch, damage):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))
    int8.load_int8(tiny_model, hparams)
    [folder] = stored_folders(tmp_path)
    damage(folder)
    assert (prompt_logits(int8.load_int8(tiny_model, hparams)) == prompt_logits(int8_model)).all()
    assert stored_folders(tmp_path) == []  # removed; the next load stores it again
    int8.load_int8(tiny_model, hparams)
    assert [f.name for f in stored_folders(tmp_path)] == [folder.name]


def resident_bytes(folder):
    """How many bytes of the .tflite files in `folder` are in this process's memory where mapped."""
    total, path = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: address range ... [path]
                path = fields[5] if len(fields) == 6 else None
            elif fields[0] == "Rss:" and path and path.startswith(str(folder)) and path.endswith(".tflite"):
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_the_weights_are_in_memory_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "models" / "wide"
    hparams = make_model_folder(model_dir, n_embd=512, n_head=8, n_layer=1)  # a block's program: 3 MB of int8 weights
    loaded = int8.load_int8(model_dir, hparams)
    [folder] = stored_folders(tmp_path / "cache")
    folder = folder.resolve()
    files = sum(path.stat().st_size for path in folder.glob("*.tflite"))
    assert resident_bytes(folder) < files / 10  # XNNPACK's copies are the weights in memory
    prompt_logits(loaded)  # resizing the programs reads their descriptions again (about 60 kB each), not the weights
    assert resident_bytes(folder) < files / 10
    monkeypatch.setattr(int8, "release_mapped", lambda path: None)
    kept = int8.load_int8(model_dir, hparams)
    assert resident_bytes(folder) > files / 2  # what releasing saves
    del kept, loaded


def test_storing_removes_what_no_load_will_open(model, tiny_model, tmp_path, monkeypatch):
    hparams, _ = model
    monkeypatch.setenv("GPT2_XLA_CACHE", str(tmp_path))
    models = int8.stored_folder(tiny_model, hparams).rsplit(os.sep, 1)[0]
    other_version = os.path.join(models, "0123456789ab-another-version")
    abandoned = os.path.join(models, f"{int8.version()}-a-load.999.tmp")
    writing = os.path.join(models, f"{int8.version()}-a-load.998.tmp")  # another process's, still being written
    other_model = os.path.join(models, f"{int8.version()}-another-model-folder")
    for folder in (other_version, abandoned, writing, other_model):
        os.makedirs(folder)
    os.utime(abandoned, (0, 0))
    int8.load_int8(tiny_model, hparams)
    assert sorted(path.name for path in stored_folders(tmp_path)) == sorted([
        os.path.basename(int8.stored_folder(tiny_model, hparams)), os.path.basename(writing),
        os.path.basename(other_model)])


WITHOUT_TENSORFLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "without_tensorflow.py")
ROOT = os.path.dirname(os.path.dirname(WITHOUT_TENSORFLOW))
CASES = [("The river", 16, dict(seed=1, top_k=40, nsamples=2)), ("", 12, dict(seed=2, top_p=0.9)),
         ("One, two", 10, dict(seed=3, temperature=0, logprobs=2)),
         ("In the town", 14, dict(seed=4, repetition_penalty=1.2, nsamples=3, batch_size=2))]


def test_a_stored_model_runs_without_tensorflow(tiny_model):
    model = gpt2.GPT2.from_folder(tiny_model, "int8")  # stores its programs (in the tests' cache folder)
    want = [[s if isinstance(s, str) else s._asdict() for s in model.generate(prompt, length, **flags)]
            for prompt, length, flags in CASES]
    code = ("import json, sys\nimport gpt2\n"
            f"model = gpt2.load({str(tiny_model)!r}, dtype='int8')\n"
            f"got = [[s if isinstance(s, str) else s._asdict() for s in model.generate(prompt, length, **flags)]\n"
            f"       for prompt, length, flags in {CASES!r}]\n"
            "print(json.dumps(got))\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'keras')))")
    result = subprocess.run([sys.executable, WITHOUT_TENSORFLOW, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    got, imported = result.stdout.splitlines()
    assert json.loads(got) == json.loads(json.dumps(want)) and imported == "[]"

    command = subprocess.run([sys.executable, WITHOUT_TENSORFLOW, "generate_interactive.py", "--model_name", str(tiny_model),
                              "--dtype", "int8", "--length", "16", "--top_k", "40", "--seed", "1", "--nsamples", "2"],
                             input="The river\n", capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert command.returncode == 0 and command.stderr == "", command.stderr
    for text in want[0]:
        assert text in command.stdout


def test_a_first_load_without_tensorflow_says_what_is_missing(tmp_path):
    model_dir = tmp_path / "tiny"
    make_model_folder(model_dir, seed=3)  # its programs are not stored yet: they need TensorFlow
    result = subprocess.run([sys.executable, WITHOUT_TENSORFLOW, "generate_unconditional.py", "--model_name",
                             str(model_dir), "--dtype", "int8", "--length", "4"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "TensorFlow" in result.stderr


def test_the_api_says_in_one_line_that_a_first_load_needs_tensorflow(tmp_path):
    model_dir = tmp_path / "tiny"
    make_model_folder(model_dir, seed=5)
    code = ("import gpt2\ntry:\n    gpt2.load(%r, dtype='int8')\nexcept gpt2.GPT2Error as error:\n    print(error)\n"
            % str(model_dir))
    result = subprocess.run([sys.executable, WITHOUT_TENSORFLOW, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("int8 makes a model's programs with TensorFlow at its first load, and TensorFlow "
                                    "cannot be imported here (tensorflow is made unimportable")
