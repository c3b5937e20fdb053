"""The benchmark scripts run and print their numbers (a check that they work, not a timing)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_encoder_benchmark_prints_throughputs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "encoder.py"), "--megabytes", "0.2",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"gpt2.encoder : +\d+\.\d+ MB/s", result.stdout)
    assert re.search(r"ratio +: +\d+\.\d% of tiktoken's throughput", result.stdout)
