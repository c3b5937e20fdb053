"""The benchmark scripts run and print their numbers (a check that they work, not a timing)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_encoder_benchmark_prints_throughputs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "encoder.py"), "--megabytes", "0.2",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"gpt2.encoder : +\d+\.\d+ MB/s", result.stdout)
    assert re.search(r"ratio +: +\d+\.\d% of tiktoken's throughput", result.stdout)


@pytest.mark.parametrize("flags,prompts,dtype", [([], "one", "float32"), (["--distinct"], "one per row", "float32"),
                                                (["--dtype", "int8"], "one", "int8")])
def test_generate_benchmark_prints_its_table(tmp_path, flags, prompts, dtype):
    RATE = r"-?[\d.]+"  # a tiny model's decode is too quick to time: only the format is checked
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "generate.py"), "--tiny",
                             "--models_dir", str(tmp_path)] + flags, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"tiny: [\d.]+ GB of {dtype} weights; load [\d.]+ s, peak memory [\d.]+ GB", result.stdout)
    for flag_set in ("greedy", "top_k=40", "top_p=0.9"):
        for batch, batch_prompts in ((1, "one"), (8, prompts)):
            row = (rf"\| tiny \| {dtype} \| {re.escape(flag_set)} \| {batch} \| {batch_prompts} \| -?[\d.]+ "
                   rf"\| \d+ \(\d+% of GEMM\) \| {RATE} \({RATE}-{RATE}\) \| -?\d+% \| [\d.]+ "
                   rf"\| [\d.]+ GB/s, \d+ GFLOP/s \|")
            assert re.search(row, result.stdout), result.stdout


def test_int8_benchmark_prints_its_comparison(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "int8.py"), "--tiny", "--models_dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    match = re.search(r"\| tiny \| ([\d.]+)% \| ([\d.]+)% \| (\d+) of 16 \([\d.]+%\) \|", result.stdout)
    assert match, result.stdout
    assert float(match[1]) <= float(match[2]) < 12  # within test_int8's tolerance, as the tests measure it
    assert int(match[3]) >= 14


def test_int8_benchmark_times_both_interpreters(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "int8.py"), "--tiny", "--interpreters",
                             "--steps", "8", "--models_dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for interpreter in ("ai-edge-litert", "tf.lite.Interpreter"):
        match = re.search(rf"\| {re.escape(interpreter)} \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+) \| [\d.]+ \|",
                          result.stdout)
        assert match, result.stdout
        blocks, output_layer, rest, step = map(float, match.groups())
        assert 0 < blocks < step and 0 < output_layer < step and abs(blocks + output_layer + rest - step) < 0.02


@pytest.mark.parametrize("script,row", [
    ("score.py", r"\| tiny \| \d+ \(\d+-\d+\) \| \d+% \| [\d.]+ \| [\d.]+ GB \| \d+ GFLOP/s \|"),
    ("train.py", r"\| tiny \| 64 \| \d+ \| \d+% \| [\d.]+ \| [\d.]+ GB \| \d+ GFLOP/s \|"),
])
def test_score_and_train_benchmarks_print_their_tables(tmp_path, script, row):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--tiny", "--models_dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(row, result.stdout), result.stdout


def test_train_benchmark_prints_its_memory_table(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train.py"), "--tiny", "--memory",
                             "--options", "adamw", "recompute, bfloat16, lora_rank 8", "--models_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for option in ("adamw", "recompute, bfloat16, lora_rank 8"):
        row = rf"\| tiny \| {re.escape(option)} \| [\d.]+ GB \| [\d.]+ GB \| (no GPU|[\d.]+ GB) \| \d+ \|"
        assert re.search(row, result.stdout), result.stdout


def test_serve_benchmark_prints_its_table(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve.py"), "--tiny", "--models_dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    number = r"[\d.]+"
    for concurrency in (1, 4):  # a tiny model sends its 16 tokens in one event: no gaps between events, ITL "-"
        row = (rf"\| {concurrency} \| 8 \| 0 \| {number} \| {number} \| {number} \| {number} \| {number} \| {number} "
               rf"\| {number} \| ({number}|-) \| ({number}|-) \|")
        assert re.search(row, result.stdout), result.stdout


@pytest.mark.slow
def test_pipeline_benchmark_prints_its_table(tmp_path):
    """And checks that pipeline.py made the samples that generate_unconditional.py made (it exits otherwise)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "pipeline.py"), "--tiny", "--models_dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for row in (r"\| score \| score.py \(a file per document\) \| [\d.]+ \| \d+ tokens/s \| 100% \|",
                r"\| score \| pipeline.py, 1 worker process \| [\d.]+ \| \d+ tokens/s \| \d+% \|",
                r"\| generate \| pipeline.py, 1 worker process \| [\d.]+ \| [\d.]+ samples/s \| \d+% \|"):
        assert re.search(row, result.stdout), result.stdout
