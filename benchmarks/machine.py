"""What the benchmarks share: the machine's measured limits and a model's operation counts."""
import statistics
import time

import numpy as np


def parameter_count(hparams):
    from gpt2.checkpoint import variable_shapes
    return sum(int(np.prod(shape)) for shape in variable_shapes(hparams).values())


def median_seconds(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_bandwidth(n_bytes):
    """GB/s of a float32 matrix-vector product over n_bytes of matrix (capped at 2 GiB)."""
    matrix = np.ones((min(n_bytes, 2 << 30) // 4 // 4096, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    return matrix.nbytes / median_seconds(lambda: matrix @ vector) / 1e9


def machine_gemm(n=2048):
    """GFLOP/s of a float32 n x n matrix product."""
    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    return 2 * n ** 3 / median_seconds(lambda: a @ b) / 1e9


def forward_flops(hparams, n_tokens):
    """Multiply-adds x 2 of one pass over n_tokens: the weight matrices, then attention's two products."""
    weights = parameter_count(hparams) - hparams.n_vocab * hparams.n_embd - hparams.n_ctx * hparams.n_embd
    return 2 * weights * n_tokens + 4 * hparams.n_layer * n_tokens ** 2 * hparams.n_embd
