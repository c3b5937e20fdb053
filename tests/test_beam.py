"""gpt2.beam and pipeline.py on Beam's local runner: model.score's and model.generate's own numbers and
texts, whatever the batches and the worker processes; bad records go to the errors file, the job goes on."""
import json
import math
import os
import re
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, is_empty

import gpt2
from gpt2.beam import ScoreDocuments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["The river ran past the old mill. ", "It's 12 o'clock, and we'll go on! ", "Ünïcödé and 🙂 too. "]


def document(i):
    """Documents of 1 to about 400 tokens: several are longer than the tiny model's context of 128."""
    return "".join(SENTENCES[(i + k) % 3] for k in range(1 + i * 9))


@pytest.fixture(scope="module")
def model(tiny_model):
    return gpt2.load("tiny", str(tiny_model.parent))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A .jsonl of documents with lines that cannot be scored, and two .txt documents."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"id": f"doc{i}", "text": document(i)}) for i in range(6)]
    lines[2:2] = ["{not json", json.dumps({"id": "empty", "text": ""}), json.dumps(["a", "list"]),
                  json.dumps({"id": "no-text", "body": "elsewhere"})]
    (folder / "documents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "long.txt").write_text(document(7), encoding="utf-8")
    (folder / "short.txt").write_text("A short one.", encoding="utf-8")
    return folder


def expected_record(model, document_id, text):
    score = model.score(text)
    return {"id": document_id, "tokens": len(score.tokens), "nll": score.nll, "perplexity": score.perplexity,
            "bytes": score.n_bytes, "bits_per_byte": score.bits_per_byte}


def assert_same_scores(records, expected):
    """Each document's record is model.score's numbers (to 1e-5: batches mix documents)."""
    assert sorted(r["id"] for r in records) == sorted(expected)
    for record in records:
        want = expected[record["id"]]
        assert record["tokens"] == want["tokens"] and record["bytes"] == want["bytes"], record
        for name in ("nll", "perplexity", "bits_per_byte"):
            assert record[name] == pytest.approx(want[name], rel=1e-5), (record, name)


def totals(records):
    nats = math.fsum(r["nll"] * r["tokens"] for r in records)
    tokens, n_bytes = sum(r["tokens"] for r in records), sum(r["bytes"] for r in records)
    return {"documents": len(records), "tokens": tokens, "nll": nats / tokens, "perplexity": math.exp(nats / tokens),
            "bytes": n_bytes, "bits_per_byte": nats / math.log(2) / n_bytes}


@pytest.mark.parametrize("batch_size, large_model", [(1, False), (3, False), (3, True)])
def test_each_document_gets_model_scores_numbers_whatever_the_batch_size(model, tiny_model, batch_size, large_model):
    """large_model: the model lives in a process of its own that this one's threads call (Beam's MultiProcessShared)."""
    texts = {f"doc{i}": document(i) for i in range(6)}
    expected = {name: expected_record(model, name, text) for name, text in texts.items()}

    def check_documents(records):
        assert_same_scores(records, expected)

    def check_summary(summaries):
        [summary] = summaries
        assert summary == pytest.approx(totals(list(expected.values())), rel=1e-5)

    with beam.Pipeline() as pipeline:
        records = pipeline | beam.Create([{"id": name, "text": text} for name, text in texts.items()])
        scored = records | ScoreDocuments("tiny", str(tiny_model.parent), batch_size=batch_size,
                                          large_model=large_model)
        assert_that(scored["documents"], check_documents, label="documents")
        assert_that(scored["summary"], check_summary, label="summary")
        assert_that(scored["errors"], is_empty(), label="errors")


def run_pipeline(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pipeline.py"), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_command_scores_a_corpus_with_two_worker_processes_and_sets_bad_records_aside(model, tiny_model, corpus,
                                                                                           tmp_path):
    out = tmp_path / "out" / "scores"
    result = run_pipeline("score", "--input", str(corpus / "*"), "--output", str(out), "--model_name", "tiny",
                          "--models_dir", str(tiny_model.parent), "--batch_size", "4", "--direct_num_workers", "2",
                          "--direct_running_mode", "multi_processing")
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(p.name for p in out.parent.glob("scores-*-of-*.jsonl"))  # as many as the runner made
    assert shards and all(re.fullmatch(rf"scores-\d{{5}}-of-{len(shards):05d}.jsonl", name) for name in shards)
    records = [json.loads(line) for name in shards for line in (out.parent / name).read_text().splitlines()]
    expected = {f"doc{i}": expected_record(model, f"doc{i}", document(i)) for i in range(6)}
    for name, text in (("long.txt", document(7)), ("short.txt", "A short one.")):
        expected[str(corpus / name)] = expected_record(model, str(corpus / name), text)
    assert_same_scores(records, expected)
    summary = json.loads((out.parent / "scores-summary.json").read_text())
    assert summary == pytest.approx(totals(records), rel=1e-12)  # the same sums, whatever the workers did
    errors = [json.loads(line) for line in (out.parent / "scores-errors.jsonl").read_text().splitlines()]
    where = str(corpus / "documents.jsonl")
    assert sorted(errors, key=lambda e: e["line"]) == [
        {"file": where, "line": 3, "reason": "the line is not a JSON object (Expecting property name enclosed in "
                                             "double quotes: line 1 column 2 (char 1))"},
        {"file": where, "line": 4, "id": "empty", "reason": "the text is empty"},
        {"file": where, "line": 5, "reason": "the line is list JSON, not an object"},
        {"file": where, "line": 6, "id": "no-text", "reason": "the record has no text (field 'text')"}]
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"; 4 records could not be used: see {out}-errors.jsonl")


def test_generated_samples_are_what_model_generate_gives(model, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    records = [{"id": "river", "prompt": "The river ran", "seed": 3, "nsamples": 3, "top_k": 40},
               {"prompt": "It's", "seed": 5, "first_sample": 7, "temperature": 0.7, "stop": "."},
               {"prompt": "", "seed": 11, "length": 20, "top_p": 0.9, "logprobs": 2},
               {"id": "too-long", "prompt": "river " * 130, "seed": 1},
               {"id": "typo", "prompt": "Hello", "top_kk": 4}]
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "samples"
    result = run_pipeline("generate", "--input", str(prompts), "--output", str(out), "--model_name", "tiny",
                          "--models_dir", str(tiny_model.parent), "--batch_size", "4", "--length", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for path in sorted(tmp_path.glob("samples-*-of-*.jsonl"))
               for line in path.read_text().splitlines()]
    assert sorted((s["prompt"], s["sample_index"]) for s in samples) == [
        ("", 0), ("It's", 7), ("The river ran", 0), ("The river ran", 1), ("The river ran", 2)]
    kept = ("id", "prompt", "text", "sample_index", "model_name", "dtype", "length", "seed", "tokens", "logprobs",
            "top_logprobs")
    for sample in samples:
        flags = {name: value for name, value in sample.items() if name not in kept}
        if "logprobs" in sample:  # the values, as generate_unconditional.py writes them; N is in top_logprobs
            flags["logprobs"] = len(sample["top_logprobs"][0])
        made = model.generate(sample["prompt"], sample["length"], seed=sample["seed"],
                              first_sample=sample["sample_index"], **flags)[0]
        if "logprobs" in sample:  # a Sample, and the record holds its tokens and log-probabilities
            assert sample["tokens"] == made.tokens and sample["logprobs"] == pytest.approx(made.logprobs)
            made = made.text
        assert sample["text"] == made, sample
    assert {s["length"] for s in samples} == {12, 20}  # the command's --length unless the record says
    errors = {e["id"]: e["reason"] for e in map(json.loads, (tmp_path / "samples-errors.jsonl").read_text().split("\n")[:-1])}
    assert errors["too-long"].startswith(f"the prompt is {len(model.encode('river ' * 130))} tokens, which leaves room for 0 new")
    assert errors["typo"] == "the record has fields that model.generate does not take: top_kk"


@pytest.mark.parametrize("flags, message", [
    (["--input", "x", "--output", "y"], "error: name the task first: `pipeline.py score ...` or "
                                        "`pipeline.py generate ...`"),
    (["score", "--output", "y"], "error: --input must be a path or a glob (the files to read), not None"),
    (["score", "--input", "nothing-here-*.txt", "--output", "y"], "error: no file matches --input nothing-here-*.txt"),
    (["score", "--input", "x", "--output", "y", "--stride", "128"], "error: --stride must be less than the model's "
                                                                    "context of 128 tokens, not 128"),
    (["score", "--input", "x", "--output", "y", "--runer", "DirectRunner"], "error: unknown flag --runer: neither "
                                                                            "gpt2-pipeline's nor a Beam pipeline option"),
    (["generate", "--input", "x", "--output", "y", "--top_p", "2"], "error: --top_p must be a number in (0, 1]"),
])
def test_bad_flags_are_one_line_before_the_job_starts(tiny_model, flags, message):
    result = run_pipeline(*flags, "--model_name", "tiny", "--models_dir", str(tiny_model.parent))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(message), result.stderr
