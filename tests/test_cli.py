"""The two scripts, run as a user runs them: subprocesses on a factory-made model folder."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = "=" * 40 + " SAMPLE {} " + "=" * 40


def run(script, *flags, stdin="", models_dir):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--model_name", "tiny",
                           "--models_dir", str(models_dir), *flags],
                          input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def models_dir(tiny_model):
    return tiny_model.parent


def test_interactive_answers_each_prompt_until_end_of_input(models_dir):
    result = run("generate_interactive.py", "--length", "12", "--seed", "7", "--nsamples", "4",
                 "--batch_size", "2", stdin="The river\n\nthe mill\n", models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count(BANNER.format(1)) == 2 and out.count(BANNER.format(4)) == 2  # numbered 1..4 per prompt
    assert BANNER.format(5) not in out
    assert out.count("=" * 80 + "\n") == 2
    assert "Prompt should not be empty!" in out
    assert result.stderr == ""
    again = run("generate_interactive.py", "--length", "12", "--seed", "7", "--nsamples", "4",
                "--batch_size", "2", stdin="The river\n\nthe mill\n", models_dir=models_dir)
    assert again.stdout == out  # the same seed gives the same text, run after run


def test_unconditional_writes_numbered_samples_to_stdout_and_file(models_dir, tmp_path):
    output = tmp_path / "samples.txt"
    result = run("generate_unconditional.py", "--length", "10", "--seed", "3", "--nsamples", "6",
                 "--batch_size", "3", "--output", str(output), models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    for n in range(1, 7):
        assert result.stdout.count(BANNER.format(n)) == 1
    assert BANNER.format(7) not in result.stdout
    assert output.read_text(encoding="utf-8") == result.stdout


@pytest.mark.parametrize("flags,message", [
    (["--top_p", "1.5"], "--top_p must be a number in (0, 1]"),
    (["--nsamples", "3", "--batch_size", "2"], "--nsamples (3) must be a multiple of --batch_size (2)"),
    (["--length", "-5"], "--length must be a whole number of at least 1"),
    (["--length", "500"], "--length 500 is more than the model's context of 128 tokens"),
    (["--model_name", "gpt-5"], "unknown model 'gpt-5'"),
])
def test_bad_flags_give_one_line_errors(models_dir, flags, message):
    result = run("generate_interactive.py", *flags, stdin="hello\n", models_dir=models_dir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_prompt_too_long_is_reported_and_the_loop_goes_on(models_dir):
    long_prompt = "the river ran past the mill " * 30
    result = run("generate_interactive.py", "--length", "64", "--seed", "1",
                 stdin=long_prompt + "\nthe mill\n", models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    assert "which leaves room for" in result.stdout and "--truncate_prompt" in result.stdout
    assert result.stdout.count(BANNER.format(1)) == 1  # the second prompt still got its sample
    truncated = run("generate_interactive.py", "--length", "64", "--seed", "1", "--truncate_prompt",
                    stdin=long_prompt + "\n", models_dir=models_dir)
    assert truncated.stdout.count(BANNER.format(1)) == 1
