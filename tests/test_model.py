"""The TensorFlow forward pass against a NumPy GPT-2 written from the paper and the checkpoint layout."""
import numpy as np
import pytest
import tensorflow as tf

from gpt2.weights import load_params
from gpt2.folders import read_hparams
from gpt2.model import LayerCache, SharedPrefix, empty_cache, forward, forward_cached, logits


def reference_logits(model_dir, tokens):
    """GPT-2's logits [len(tokens), n_vocab], in float64, reading the checkpoint by OpenAI's names."""
    reader = tf.train.load_checkpoint(str(model_dir / "model.ckpt"))
    w = lambda name: reader.get_tensor("model/" + name).astype(np.float64)  # noqa: E731
    n_layer = len({n.split("/")[1] for n in reader.get_variable_to_shape_map() if n.startswith("model/h")})
    n_head = read_hparams(model_dir).n_head

    def norm(x, scope):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w(scope + "/g") + w(scope + "/b")

    def conv1d(x, scope):
        return x @ w(scope + "/w")[0] + w(scope + "/b")

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    n = len(tokens)
    x = w("wte")[tokens] + w("wpe")[:n]
    for i in range(n_layer):
        scope = f"h{i}"
        q, k, v = np.split(conv1d(norm(x, scope + "/ln_1"), scope + "/attn/c_attn"), 3, axis=-1)
        heads = []
        for qh, kh, vh in zip(*(np.split(t, n_head, axis=-1) for t in (q, k, v))):
            scores = qh @ kh.T / np.sqrt(qh.shape[-1])
            scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(probs / probs.sum(-1, keepdims=True) @ vh)
        x = x + conv1d(np.concatenate(heads, axis=-1), scope + "/attn/c_proj")
        h = gelu(conv1d(norm(x, scope + "/ln_2"), scope + "/mlp/c_fc"))
        x = x + conv1d(h, scope + "/mlp/c_proj")
    return norm(x, "ln_f") @ w("wte").T


def test_logits_match_reference(tiny_model, model, full_logits):
    hparams, _ = model
    tokens = np.random.default_rng(0).integers(0, hparams.n_vocab, size=hparams.n_ctx).tolist()
    ours, ref = full_logits(tokens), reference_logits(tiny_model, tokens)
    assert ref.std() > 0.5  # the random weights give logits far from zero, so 1e-4 is a real bound
    max_diff = np.abs(ours - ref).max()
    print(f"max |logit difference| over {hparams.n_ctx} positions: {max_diff:.2e}")
    assert max_diff < 1e-4


@pytest.mark.parametrize("dtype,bound", [("float16", 0.02), ("bfloat16", 0.1)])
def test_half_precision_stays_within_its_precision(tiny_model, model, dtype, bound):
    """Logits in float16 / bfloat16 (11 / 8 bits of mantissa) against the float64 reference.

    Measured on this model: max error 0.7% (float16) and 5% (bfloat16) of the logits' spread.
    """
    hparams, _ = model
    params = load_params(tiny_model, hparams, dtype)
    assert params["wte"].dtype == dtype and params["h"][0]["mlp"]["c_fc"]["w"].dtype == dtype
    tokens = np.random.default_rng(0).integers(0, hparams.n_vocab, size=hparams.n_ctx).tolist()
    h = forward(params, hparams, tf.constant([tokens]))
    ours, ref = logits(params, h)[0].numpy(), reference_logits(tiny_model, tokens)
    assert ours.dtype == np.float32
    error = np.abs(ours - ref).max()
    print(f"{dtype}: max |logit difference| {error:.4f} = {error / ref.std():.2%} of the logits' spread")
    assert error < bound * ref.std()
    # The likeliest token is the reference's wherever its top two are further apart than the error.
    top_two = np.sort(ref, axis=-1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * error
    assert clear.sum() > len(tokens) // 2
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_one_pass_with_a_cache_equals_the_plain_forward_pass(model, full_logits):
    """The two paths of gpt2.model: a whole sequence into an empty cache (prompts) and the plain pass
    (scoring, training); the plain pass itself is checked against the reference above."""
    hparams, params = model
    tokens = np.random.default_rng(7).integers(0, hparams.n_vocab, size=(2, 50))
    h, _ = forward_cached(params, hparams, tf.constant(tokens), empty_cache(hparams, 2, 64), 0)
    plain = logits(params, forward(params, hparams, tf.constant(tokens))).numpy()
    np.testing.assert_allclose(logits(params, h).numpy(), plain, atol=1e-4)
    np.testing.assert_allclose(plain[1], full_logits(tokens[1].tolist()), atol=1e-5)  # rows do not mix


def test_cached_steps_equal_full_recomputation(model, full_logits):
    hparams, params = model
    tokens = np.random.default_rng(1).integers(0, hparams.n_vocab, size=40).tolist()
    expected = full_logits(tokens)
    # A prompt of 25 tokens in one pass, then 15 single tokens, each attending to the cache.
    past = empty_cache(hparams, 1, 64)
    h, past = forward_cached(params, hparams, tf.constant([tokens[:25]]), past, 0)
    steps = [logits(params, h)[0].numpy()]
    for pos in range(25, 40):
        h, past = forward_cached(params, hparams, tf.constant([[tokens[pos]]]), past, pos)
        steps.append(logits(params, h)[0].numpy())
    np.testing.assert_allclose(np.concatenate(steps), expected, atol=1e-4)


def test_batch_rows_are_independent(model, full_logits):
    hparams, params = model
    rng = np.random.default_rng(2)
    batch = rng.integers(0, hparams.n_vocab, size=(3, 20))
    past = empty_cache(hparams, 3, 20)
    h, _ = forward_cached(params, hparams, tf.constant(batch), past, 0)
    for row, row_logits in zip(batch.tolist(), logits(params, h).numpy()):
        np.testing.assert_allclose(row_logits, full_logits(row), atol=1e-4)


def test_rows_at_different_positions(model, full_logits):
    """Two rows continue prompts of different lengths in one step: each as if alone."""
    hparams, params = model
    rng = np.random.default_rng(5)
    long, short = rng.integers(0, hparams.n_vocab, size=12).tolist(), rng.integers(0, hparams.n_vocab, size=5).tolist()
    padded = [long[:-1], short[:-1] + [0] * 7]  # right padding, as the sampler pads prompts
    past = empty_cache(hparams, 2, 16)
    _, past = forward_cached(params, hparams, tf.constant(padded), past, 0)
    h, _ = forward_cached(params, hparams, tf.constant([[long[-1]], [short[-1]]]), past, tf.constant([11, 4]))
    step_logits = logits(params, h)[:, 0].numpy()
    np.testing.assert_allclose(step_logits[0], full_logits(long)[-1], atol=1e-4)
    np.testing.assert_allclose(step_logits[1], full_logits(short)[-1], atol=1e-4)


def test_rows_that_start_alike_keep_those_tokens_once(model, full_logits):
    """Three rows start with the same 9 tokens: those run once, into a shared cache of 16 slots
    (7 of them empty); each row's own tokens attend to it and give the logits of the row alone."""
    hparams, params = model
    rng = np.random.default_rng(6)
    start = rng.integers(0, hparams.n_vocab, size=9).tolist()
    rows = [start + rng.integers(0, hparams.n_vocab, size=n).tolist() for n in (4, 1, 7)]
    _, one_row = forward_cached(params, hparams, tf.constant([start]), empty_cache(hparams, 1, 16), 0)
    shared = SharedPrefix([LayerCache(layer.keys[0], layer.values[0]) for layer in one_row], tf.constant(9))
    # Each row's own tokens but its last, padded to 6, in one pass; then the last ones in one step.
    own = [row[9:-1] + [0] * (6 - len(row[9:-1])) for row in rows]
    h, past = forward_cached(params, hparams, tf.constant(own), empty_cache(hparams, 3, 16), 0, shared)
    np.testing.assert_allclose(logits(params, h)[2].numpy(), full_logits(rows[2])[9:-1], atol=1e-4)
    h, _ = forward_cached(params, hparams, tf.constant([[row[-1]] for row in rows]), past, tf.constant([3, 0, 6]),
                          shared)
    for row, row_logits in zip(rows, logits(params, h)[:, 0].numpy()):
        np.testing.assert_allclose(row_logits, full_logits(row)[-1], atol=1e-4)
