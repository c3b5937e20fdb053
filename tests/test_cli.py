"""The scripts, run as a user runs them: in a pseudo-terminal (pexpect) or as piped subprocesses."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pexpect
import pytest

import gpt2
from gpt2 import cli
from gpt2.arguments import Controls
from gpt2.testing import make_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = "=" * 40 + " SAMPLE {} " + "=" * 40
PROMPT = "Model prompt >>> "


@pytest.fixture(scope="module")
def models_dir(tiny_model):
    """models/tiny (n_ctx 128) and models/long, whose 1024-token context makes samples take a while."""
    make_model_folder(tiny_model.parent / "long", n_ctx=1024)
    return tiny_model.parent


def run(script, *flags, stdin="", models_dir, env=None, model="tiny"):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--model_name", model,
                           "--models_dir", str(models_dir), *flags], input=stdin, capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


def spawn(*flags, models_dir, model="tiny"):
    return pexpect.spawn(sys.executable, [os.path.join(ROOT, "generate_interactive.py"), "--model_name", model,
                                          "--models_dir", str(models_dir), *flags],
                         encoding="utf-8", timeout=120, cwd=ROOT, dimensions=(50, 200))


# Interactive, in a terminal.

def test_streams_and_ctrl_c_returns_to_the_prompt(models_dir):
    child = spawn("--length", "1000", "--ignore_eot", "--seed", "1", model="long", models_dir=models_dir)
    child.expect_exact(PROMPT)
    child.sendline("The river ran past the old mill")
    child.expect_exact(BANNER.format(1))
    child.expect(r"\S")  # text of the sample shows while it is still being written...
    child.sendintr()
    child.expect_exact("[interrupted]")  # ...so Ctrl-C finds it unfinished and stops it
    assert "=" * 80 not in child.before
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D at the prompt
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_multi_line_and_empty_prompts(models_dir):
    child = spawn("--length", "6", "--temperature", "0", models_dir=models_dir)
    child.expect_exact(PROMPT)
    child.sendline("")
    child.expect_exact("Prompt should not be empty!")
    child.expect_exact(PROMPT)
    child.sendline("the river ran \\")
    child.expect_exact("... ")
    child.sendline("past the mill")
    child.expect_exact(BANNER.format(1) + "\r\n")
    child.expect_exact("\r\n" + "=" * 80)
    shown = child.before
    child.expect_exact(PROMPT)
    child.sendintr()  # Ctrl-C at the prompt ends the session
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    model = gpt2.load("tiny", str(models_dir))
    assert shown == model.generate("the river ran \npast the mill", length=6, temperature=0)[0].replace("\n", "\r\n")


def test_interactive_passes_the_controls_on(models_dir, monkeypatch, capsys):
    """To stream (batch_size 1) and to generate (larger batches)."""
    model = gpt2.load("tiny", str(models_dir))
    [forced] = model.encode(" the")
    for batch_size in ("1", "2"):
        monkeypatch.setattr("sys.stdin", io.StringIO("the river\n"))
        cli.interactive_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--length", "5", "--nsamples",
                              "2", "--batch_size", batch_size, "--ignore_eot", "--logit_bias", f"{{{forced}: 100}}"])
        out = capsys.readouterr().out
        for number in (1, 2):
            assert BANNER.format(number) + "\n" + model.decode([forced] * 5) + "\n" in out


def test_overlong_prompt_in_a_terminal(models_dir):
    child = spawn("--length", "100", models_dir=models_dir)
    child.expect_exact(PROMPT)
    child.sendline("the mill " * 40)
    child.expect_exact("error: the prompt is")
    child.expect_exact("--truncate_prompt")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# Interactive, piped.

def test_interactive_answers_each_prompt_until_end_of_input(models_dir):
    flags = ["--length", "12", "--seed", "7", "--nsamples", "4", "--batch_size", "2"]
    result = run("generate_interactive.py", *flags, stdin="The river\n\nthe mill\n", models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count(BANNER.format(1)) == 2 and out.count(BANNER.format(4)) == 2  # numbered 1..4 per prompt
    assert BANNER.format(5) not in out
    assert out.count("=" * 80 + "\n") == 2
    assert "Prompt should not be empty!" in out
    assert result.stderr == ""
    again = run("generate_interactive.py", *flags, stdin="The river\n\nthe mill\n", models_dir=models_dir)
    assert again.stdout == out  # the same seed gives the same text, run after run


def test_stop_strings_and_prompt_file(models_dir, tmp_path):
    model = gpt2.load("tiny", str(models_dir))
    prompt = "The river\nran past the mill"
    [full] = model.generate(prompt, length=40, temperature=0, ignore_eot=True)
    stop = full[8:11]
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    result = run("generate_interactive.py", "--prompt_file", str(tmp_path / "prompt.txt"), "--length", "40",
                 "--temperature", "0", "--ignore_eot", "--stop", stop, models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    assert PROMPT + "The river\n... ran past the mill\n" in result.stdout
    assert BANNER.format(1) + "\n" + full[:full.index(stop)] + "\n" + "=" * 80 in result.stdout


def test_a_huge_prompt_file_is_shown_by_its_first_lines_and_size(models_dir, tmp_path, monkeypatch, capsys):
    text = "the river ran past the mill\n" * 200_000  # 5.6 MB
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no prompts after the file's
    cli.interactive_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--length", "5",
                          "--prompt_file", str(tmp_path / "book.txt")])
    out = capsys.readouterr().out
    assert out.startswith(PROMPT + "the river ran past the mill\n... the river ran past the mill\n")
    assert f"has {len(text):,} bytes and 200,001 lines in all]" in out
    assert "error: the prompt is" in out  # too long for the tiny model's context, as before
    assert len(out) < 2000


def test_unknown_and_empty_model_names(models_dir):
    with pytest.raises(SystemExit) as exit:
        cli.interactive_main(["--model_name", "", "--models_dir", str(models_dir)])
    assert exit.value.code == ("error: --model_name must be one of 124M, 355M, 774M, 1558M or the name of a model "
                               "folder, not ''")
    with pytest.raises(SystemExit) as exit:
        cli.download_main(["", "--models_dir", str(models_dir)])
    assert exit.value.code.startswith("error: unknown model '': choose from 124M, ")
    with pytest.raises(gpt2.GPT2Error, match="model_name must be one of"):
        gpt2.load(" ", str(models_dir))


def test_any_output_encoding(models_dir):
    result = run("generate_interactive.py", "--length", "5", "--seed", "2", stdin="日本語 🙂 Привет\n",
                 models_dir=models_dir, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert BANNER.format(1) in result.stdout


@pytest.mark.parametrize("flags,message", [
    (["--top_p", "1.5"], "--top_p must be a number in (0, 1]"),
    (["--nsamples", "3", "--batch_size", "2"], "--nsamples (3) must be a multiple of --batch_size (2)"),
    (["--length", "-5"], "--length must be a whole number of at least 1"),
    (["--length", "500"], "--length 500 is more than the model's context of 128 tokens"),
    (["--model_name", "gpt-5"], "unknown model 'gpt-5'"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "cannot read --prompt_file /nonexistent/prompt.txt"),
    (["--dtype", "float8"], "--dtype must be one of float32, float16, bfloat16, int8, not 'float8'"),
    (["--stop", ""], "--stop must be text that ends a sample, never an empty string"),
    (["--min_p", "2"], "--min_p must be a number in [0, 1) (0 turns it off), not 2"),
    (["--min_p", "-0.1"], "--min_p must be a number in [0, 1)"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be a number > 0 (1 turns it off), not 0"),
    (["--repetition_penalty", "-1.2"], "--repetition_penalty must be a number > 0"),
    (["--repeat_last_n", "-1"], "--repeat_last_n must be a whole number >= 0 (0: the whole text), not -1"),
    (["--presence_penalty", "2.5"], "--presence_penalty must be a number from -2 to 2 (0 turns it off), not 2.5"),
    (["--frequency_penalty", "-3"], "--frequency_penalty must be a number from -2 to 2"),
    (["--no_repeat_ngram_size", "1.5"], "--no_repeat_ngram_size must be a whole number >= 0"),
    (["--logit_bias", "{50256: 101}"], "biases in --logit_bias must be numbers from -100 to 100, not 101 (token "),
    (["--logit_bias", "{-1: 5}"], "token ids in --logit_bias must be whole numbers >= 0, not -1"),
    (["--logit_bias", "{1.5: 5}"], "token ids in --logit_bias must be whole numbers >= 0, not 1.5"),
    (["--logit_bias", "50256"], "--logit_bias must be a dict of token ids to biases, such as {50256: -100}"),
    (["--bad_words", ""], "--bad_words must be text never generated, never an empty string"),
    (["--bad_words", '["the", ""]'], "--bad_words must be text never generated, never an empty string"),
])
def test_bad_flags_give_one_line_errors(models_dir, flags, message):
    """In this process: the command's exit message is the one line a user sees on stderr."""
    with pytest.raises(SystemExit) as exit:
        cli.interactive_main(["--model_name", "tiny", "--models_dir", str(models_dir), *flags])
    assert isinstance(exit.value.code, str) and exit.value.code.startswith("error: ")
    assert "\n" not in exit.value.code and message in exit.value.code


@pytest.mark.parametrize("flags,message", [
    (["--logprobs", "21", "--output", "x.jsonl"], "--logprobs must be a whole number from 0 to 20"),
    (["--logprobs", "-1", "--output", "x.jsonl"], "--logprobs must be a whole number from 0 to 20"),
    (["--logprobs", "2.5", "--output", "x.jsonl"], "--logprobs must be a whole number from 0 to 20"),
    (["--logprobs", "3"], "--logprobs needs --output FILE.jsonl, whose records hold the log-probabilities"),
    (["--logprobs", "0", "--output", "x.txt"], "--logprobs needs --output FILE.jsonl"),
    (["--logit_bias", '{"657": -100}', "--nsamples", "1", "--length", "2"],  # known once the model is loaded
     "--logit_bias names token 657, but the model has 657 tokens, 0 to 656"),
])
def test_bad_unconditional_flags_give_one_line_errors(models_dir, flags, message):
    with pytest.raises(SystemExit) as exit:
        cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), *flags])
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code
    assert exit.value.code.startswith("error: " + message)


@pytest.mark.parametrize("main,argv,message", [
    (cli.unconditional_main, ["--ouput", "x.jsonl"], "unknown flag --ouput: did you mean --output?"),
    (cli.unconditional_main, ["--nsample=3"], "unknown flag --nsample: did you mean --nsamples?"),
    (cli.interactive_main, ["--top-pp", "0.9"], "unknown flag --top-pp: did you mean --top_p?"),
    (cli.interactive_main, ["-temprature", "0"], "unknown flag -temprature: did you mean --temperature?"),
    (cli.download_main, ["--model_dir", "x"], "unknown flag --model_dir: did you mean --models_dir?"),
    (cli.score_main, ["a.txt", "--strid", "8"], "unknown flag --strid: did you mean --stride?"),
    (cli.score_main, ["a.txt", "--frobnicate"], "unknown flag --frobnicate: the flags are --model_name, "),
    (cli.interactive_main, ["-t", "0"], "ambiguous flag -t: use one of --temperature, --top_k, --top_p, "),
    (cli.unconditional_main, ["-n", "1"], "ambiguous flag -n: use one of --nsamples, --no_repeat_ngram_size"),
    (cli.interactive_main, ["--logprobs", "2"], "unknown flag --logprobs: the flags are --model_name, "),
])
def test_unknown_flags_are_refused_before_anything_loads(main, argv, message):
    """A typo is named at once, not after a generation that never ends; the model named does not exist,
    so an error about it would mean the command had started."""
    nowhere = ["nope"] if main is cli.download_main else ["--model_name", "nope", "--models_dir", "/nonexistent"]
    with pytest.raises(SystemExit) as exit:
        main([*nowhere, *argv])
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code
    assert exit.value.code.startswith("error: " + message)


def test_known_flags_in_every_spelling_are_accepted(models_dir, tmp_path, capsys):
    output = tmp_path / "out.txt"
    cli.unconditional_main(["--model-name", "tiny", f"--models_dir={models_dir}", "--nsamples", "1", "--length",
                            "2", "--noignore_eot", "-o", str(output), "--seed", "-5"])
    assert output.read_text(encoding="utf-8") == capsys.readouterr().out


def exit_without_tensorflow(main, argv, imports=""):
    """What gpt2.cli's `main`(argv) exits with, in a fresh Python, and whether TensorFlow was imported:
    "<exit code> | <True or False>"."""
    code = (f"import sys; {imports}from gpt2.cli import {main}\n"
            f"try: {main}({argv!r})\n"
            "except SystemExit as e: print(e.code, '|', 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    return result.stdout.strip()


def test_flags_are_checked_before_tensorflow_starts():
    """And downloading needs no TensorFlow: download_model.py starts in a fraction of a second."""
    assert exit_without_tensorflow("unconditional_main", ["--top_k", "-1"], imports="import gpt2.download; ") == \
        "error: --top_k must be a whole number >= 0 (0 turns it off), not -1 | False"
    assert exit_without_tensorflow("interactive_main", ["--min_p", "2"]) == \
        "error: --min_p must be a number in [0, 1) (0 turns it off), not 2 | False"
    assert exit_without_tensorflow("unconditional_main", ["--logprobs", "3", "--output", "x.txt"]) == \
        "error: --logprobs needs --output FILE.jsonl, whose records hold the log-probabilities | False"


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


# Unconditional.

def test_unconditional_writes_numbered_samples_to_stdout_and_file(models_dir, tmp_path):
    output = tmp_path / "samples.txt"
    result = run("generate_unconditional.py", "--length", "10", "--seed", "3", "--nsamples", "6",
                 "--batch_size", "3", "--output", str(output), models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    for n in range(1, 7):
        assert result.stdout.count(BANNER.format(n)) == 1
    assert BANNER.format(7) not in result.stdout
    assert output.read_text(encoding="utf-8") == result.stdout
    assert "6/6" in result.stderr  # the progress bar


def test_int8_weights_write_the_apis_int8_samples(models_dir):
    result = run("generate_unconditional.py", "--length", "12", "--seed", "5", "--nsamples", "2", "--top_k", "40",
                 "--dtype", "int8", models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no notices from TensorFlow Lite
    model = gpt2.load("tiny", str(models_dir), dtype="int8")
    for number, text in enumerate(model.generate("", 12, top_k=40, seed=5, nsamples=2), 1):
        assert BANNER.format(number) + "\n" + text in result.stdout


def test_jsonl_records_reproduce_their_samples(models_dir, tmp_path):
    output = tmp_path / "samples.jsonl"
    result = run("generate_unconditional.py", "--length", "20", "--seed", "11", "--nsamples", "4", "--batch_size",
                 "2", "--top_k", "40", "--temperature", "0.8", "--dtype", "bfloat16", "--output", str(output),
                 models_dir=models_dir)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["number"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == {"number", "text", "sample_index", "model_name", "dtype", "length", "temperature",
                               "top_k", "top_p", "seed", "stop", "ignore_eot"}  # no controls left at their defaults
    model = gpt2.load("tiny", str(models_dir), dtype=records[2]["dtype"])
    r = records[2]
    again = model.generate("", r["length"], seed=r["seed"], first_sample=r["sample_index"],
                           temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"],
                           ignore_eot=r["ignore_eot"], stop=r["stop"])
    assert again == [r["text"]]


def test_jsonl_records_hold_the_controls_set_and_reproduce_their_samples(models_dir, tmp_path):
    output = tmp_path / "samples.jsonl"
    cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--length", "12", "--seed", "2",
                            "--nsamples", "2", "--ignore_eot", "--min_p", "0.05", "--repetition_penalty", "1.3",
                            "--repeat_last_n", "0", "--presence_penalty", "0.5", "--frequency_penalty", "-0.5",
                            "--no_repeat_ngram_size", "2", "--logit_bias", "{5: 3}", "--bad_words", '["mill"]',
                            "--output", str(output)])
    r = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()][1]
    assert {name: r[name] for name in Controls._fields if name in r} == {  # repeat_last_n 0 is its default
        "min_p": 0.05, "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "no_repeat_ngram_size": 2, "logit_bias": {"5": 3.0}, "bad_words": ["mill"]}
    model = gpt2.load("tiny", str(models_dir))
    flags = {k: v for k, v in r.items() if k not in ("number", "text", "sample_index", "model_name", "dtype", "length")}
    assert model.generate("", r["length"], first_sample=r["sample_index"], **flags) == [r["text"]]
    assert model.generate("", r["length"], seed=r["seed"], first_sample=r["sample_index"], ignore_eot=True) != \
        [r["text"]]  # the controls changed it


def test_logprobs_are_the_models_own_in_jsonl_records(models_dir, tmp_path, full_logits):
    """Before temperature and top_k: each token's log-probability and the 3 likeliest, from the model's logits."""
    output = tmp_path / "samples.jsonl"
    cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--length", "8", "--seed", "3",
                            "--nsamples", "2", "--ignore_eot", "--temperature", "0.7", "--top_k", "5", "--logprobs",
                            "3", "--output", str(output)])
    model = gpt2.load("tiny", str(models_dir))
    for r in (json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()):
        assert len(r["tokens"]) == len(r["logprobs"]) == len(r["top_logprobs"]) == 8
        assert model.decode(r["tokens"]) == r["text"]
        logits = full_logits([model.encoder.eot_token] + r["tokens"][:-1]).astype("float64")
        expected = logits - logits.max(axis=1, keepdims=True)
        expected -= np.log(np.exp(expected).sum(axis=1, keepdims=True))
        for row, token, logprob, top in zip(expected, r["tokens"], r["logprobs"], r["top_logprobs"]):
            assert logprob == pytest.approx(row[token], abs=1e-4)
            assert [t for t, _ in top] == np.argsort(-row)[:3].tolist()
            assert [p for _, p in top] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)


def test_shards_write_the_samples_of_one_run_between_them(models_dir, tmp_path):
    """Three processes with --shard K/3 write the samples (numbers and texts) one process writes."""
    flags = ["--length", "6", "--seed", "5", "--nsamples", "8", "--batch_size", "2"]
    cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), *flags,
                            "--output", str(tmp_path / "all.jsonl")])
    for k in range(3):
        cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), *flags,
                                "--shard", f"{k}/3", "--output", str(tmp_path / f"shard{k}.jsonl")])
    shards = [(tmp_path / f"shard{k}.jsonl").read_text(encoding="utf-8").splitlines() for k in range(3)]
    assert [[json.loads(line)["number"] for line in lines] for lines in shards] == [[1, 2, 7, 8], [3, 4], [5, 6]]
    merged = sorted((line for lines in shards for line in lines), key=lambda line: json.loads(line)["number"])
    assert merged == (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()
    with pytest.raises(SystemExit, match=r"^error: --shard must be K/N, this process's number K from 0 to N - 1 and "
                                         r"the number of processes N \(such as 0/4\), not '3/3'$"):
        cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--shard", "3/3"])


def wait_for_lines(path, n, process):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines")


def test_killed_run_leaves_only_complete_samples(models_dir, tmp_path):
    output = tmp_path / "forever.jsonl"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate_unconditional.py"), "--model_name",
                                "long", "--models_dir", str(models_dir), "--length", "300", "--ignore_eot",
                                "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(output, 2, process)
    process.kill()
    process.wait()
    data = output.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert len(records) >= 2 and [r["number"] for r in records] == list(range(1, len(records) + 1))


def test_ctrl_c_stops_unconditional_with_a_count(models_dir, tmp_path):
    output = tmp_path / "forever.txt"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate_unconditional.py"), "--model_name",
                                "long", "--models_dir", str(models_dir), "--length", "300", "--ignore_eot",
                                "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(output, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted after ") and last.endswith(" complete samples")
    n = int(last.split()[3])
    assert output.read_text(encoding="utf-8").count("=" * 40 + " SAMPLE ") == n


def test_a_batch_too_large_for_memory_is_one_line(models_dir, monkeypatch):
    from gpt2 import api

    monkeypatch.setattr(api, "available_memory", lambda: 10_000_000)
    with pytest.raises(SystemExit) as exit:
        cli.unconditional_main(["--model_name", "long", "--models_dir", str(models_dir), "--batch_size", "4096",
                                "--nsamples", "4096", "--length", "1024"])
    assert exit.value.code.startswith("error: --batch_size 4096 with --length 1024 needs about ")
    assert " but 10.0 MB is available: use --batch_size " in exit.value.code and "\n" not in exit.value.code


# Full disks.

class SmallDisk:
    """A file open for --output on a disk with `room` bytes left, whose writes take at most
    `per_write` bytes each (as a system may): what cli.open_output returns, for the tests."""

    def __init__(self, path, room, per_write):
        self.file, self.room, self.per_write = open(path, "wb", buffering=0), room, per_write

    def write(self, data):
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self.room, self.per_write)
        self.room -= self.file.write(data[:n])
        return n

    def __getattr__(self, name):  # truncate, seek, close
        return getattr(self.file, name)


def test_full_disk_during_output_leaves_whole_samples_and_says_how_many(models_dir, tmp_path, monkeypatch):
    output = tmp_path / "samples.jsonl"
    monkeypatch.setattr(cli, "open_output", lambda path: SmallDisk(path, room=2000, per_write=50))
    with pytest.raises(SystemExit) as exit:
        cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--nsamples", "40",
                                "--length", "30", "--ignore_eot", "--seed", "4", "--output", str(output)])
    data = output.read_bytes()
    records = [json.loads(line) for line in data.decode().splitlines()]  # each written in pieces of 50 bytes
    n = len(records)
    assert 0 < n < 40 and data.endswith(b"\n") and [r["number"] for r in records] == list(range(1, n + 1))
    assert exit.value.code == (f"error: disk full after {n} complete samples (writing {output}): "
                               "free some space and run again")


def test_full_disk_during_score_output_leaves_whole_records(models_dir, tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text("the river ran past the old mill. " * 60, encoding="utf-8")
    output = tmp_path / "tokens.jsonl"
    monkeypatch.setattr(cli, "open_output", lambda path: SmallDisk(path, room=40000, per_write=1000))
    with pytest.raises(SystemExit) as exit:
        cli.score_main([str(tmp_path / "text.txt"), "--model_name", "tiny", "--models_dir", str(models_dir),
                        "--output", str(output)])
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(len(lines)))
    assert 0 < len(lines) < 420 and output.read_text(encoding="utf-8").endswith("\n")
    assert exit.value.code == (f"error: disk full after the records of {len(lines)} tokens (writing {output}): "
                               "free some space and run again")


def test_output_on_a_full_device(models_dir):
    with pytest.raises(SystemExit) as exit:
        cli.unconditional_main(["--model_name", "tiny", "--models_dir", str(models_dir), "--nsamples", "2",
                                "--length", "5", "--output", "/dev/full"])
    assert exit.value.code == ("error: disk full after 0 complete samples (writing /dev/full): "
                               "free some space and run again")


@pytest.mark.parametrize("main,argv,message", [
    (cli.interactive_main, ["--length", "3"], "disk full (writing standard output)"),
    (cli.score_main, ["TEXT"], "disk full (writing standard output)"),
    (cli.download_main, ["124M"], "disk full (writing standard output)"),
])
def test_stdout_on_a_full_device_is_one_line(models_dir, tiny_model, tmp_path, monkeypatch, main, argv, message):
    """stdout is /dev/full (`> /dev/full`): a one-line error, whichever write finds it full."""
    (tmp_path / "text.txt").write_text("the mill", encoding="utf-8")
    argv = [str(tmp_path / "text.txt") if a == "TEXT" else a for a in argv]
    if main is cli.download_main:  # already complete: nothing to fetch, one line to print
        shutil.copytree(tiny_model, tmp_path / "124M")
        argv += ["--models_dir", str(tmp_path)]
    else:
        argv += ["--model_name", "tiny", "--models_dir", str(models_dir)]
    monkeypatch.setattr("sys.stdin", io.StringIO("the river\n"))
    with open("/dev/full", "w") as full:
        monkeypatch.setattr("sys.stdout", full)
        with pytest.raises(SystemExit) as exit:
            main(argv)
    assert exit.value.code == f"error: {message}: free some space and run again"


def test_unconditional_to_a_full_stdout_ends_in_one_line(models_dir):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_unconditional.py"), "--model_name",
                                 "tiny", "--models_dir", str(models_dir), "--nsamples", "3", "--length", "5"],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == ("error: disk full after 0 complete samples (writing standard output): "
                             "free some space and run again\n")


def test_output_on_a_full_filesystem_keeps_whole_samples(models_dir, small_filesystem):
    output = small_filesystem / "samples.jsonl"
    result = run("generate_unconditional.py", "--nsamples", "100", "--batch_size", "4", "--length", "60",
                 "--ignore_eot", "--output", str(output), models_dir=models_dir)
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    n = len(records)
    assert 0 < n < 100 and output.read_bytes().endswith(b"\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith(f"error: disk full after {n} complete samples (writing {output}): "
                                                   "free some space and run again")


def test_console_commands_point_at_the_cli():
    """pyproject's console commands name functions that exist; once installed, they run."""
    import importlib
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == {"gpt2-interactive", "gpt2-unconditional", "gpt2-download", "gpt2-score", "gpt2-finetune",
                            "gpt2-serve", "gpt2-pipeline"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    if shutil.which("gpt2-download"):  # installed (CI installs the package): a bad name is a one-line error
        result = subprocess.run(["gpt2-download", "9B"], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and result.stderr.startswith("error: unknown model 9B")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 0.8, 1.5, 3.0, 6.0])
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(models_dir, delay):
    """SIGINT while the command's modules, fire and TensorFlow import, the model loads, the loop compiles or
    samples run. (Earlier, during the interpreter's own start, what happens is Python's.)"""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate_unconditional.py"), "--model_name",
                                "long", "--models_dir", str(models_dir), "--length", "300", "--ignore_eot"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    [line] = stderr.strip().splitlines()
    assert line == "interrupted" or line.startswith("error: interrupted after "), stderr
