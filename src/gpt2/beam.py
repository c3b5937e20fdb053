"""Scoring and generating whole corpora on Apache Beam: one pipeline on a laptop, Dataflow, Flink or Spark.

    import apache_beam as beam
    from gpt2.beam import GenerateSamples, ScoreDocuments

    with beam.Pipeline() as pipeline:
        documents = pipeline | beam.Create([{"id": "a", "text": "The river ran"}, ...])
        scored = documents | ScoreDocuments("124M", models_dir="models")
        scored["documents"]  # {"id", "tokens", "nll", "perplexity", "bytes", "bits_per_byte"} each
        scored["summary"]    # one record: the corpus's totals
        scored["errors"]     # the records that could not be scored, with the reason

        prompts = pipeline | beam.Create([{"prompt": "Once", "seed": 1, "nsamples": 2, "top_k": 40}])
        made = prompts | GenerateSamples("124M", models_dir="models", length=40)
        made["samples"]      # {"text", "prompt", "seed", "sample_index", ...} each; made["errors"]

The model runs inside Beam's RunInference: each worker process loads it once and its threads
share it (with large_model, one copy per machine is shared by its processes). Batches have few
shapes, so XLA compiles a few programs, not one per batch: a scoring batch holds windows of one
length class (lengths within a factor of two, gathered with GroupIntoBatches, so that little of
it is padding), its rows padded to a power of two and its windows to the lengths of
gpt2.engine.bucket. A document's windows share batches with other documents' and come back in
any order; they are put together again by document, so a document's numbers are
`model.score(text)`'s. Bad records never stop a job: they
go to the "errors" output with the reason (Beam's dead-letter pattern).

This module is the only one that imports Apache Beam (`pip install .[beam]`).
"""
import argparse
import json
import logging
import math
import sys
import uuid
from typing import List, NamedTuple, Optional

import numpy as np

# Beam's import warns on the root logger that Google Cloud's clients are missing, which only its
# Google Cloud connectors use (they come with apache-beam[gcp]): not a line for every command.
_level = logging.getLogger().level
logging.getLogger().setLevel(logging.ERROR)
try:
    import apache_beam as beam
    from apache_beam.io import fileio
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
finally:
    logging.getLogger().setLevel(_level)

from .arguments import ArgumentError, check_dtype, check_stride, new_seed, whole
from .download import model_folder
from .encoder import read_encoder
from .errors import GPT2Error
from .folders import read_hparams

PROGRESS_EVERY = 1000  # documents or samples between two progress lines of a worker
# What a prompt record may hold besides its prompt and id: model.generate's arguments.
GENERATE_FIELDS = ("length", "seed", "nsamples", "first_sample", "temperature", "top_k", "top_p", "stop",
                   "truncate_prompt", "ignore_eot", "min_p", "repetition_penalty", "repeat_last_n", "presence_penalty",
                   "frequency_penalty", "no_repeat_ngram_size", "logit_bias", "bad_words", "logprobs")
SOURCE_FIELDS = ("file", "line")  # where a record was read (gpt2.cli's reader adds them), for the errors


class Model(NamedTuple):
    """Which model the workers load, as gpt2.load takes it."""
    name: str
    models_dir: Optional[str]
    dtype: str

    def folder(self):
        return model_folder(self.name, self.models_dir)


def error(record, reason):
    """A dead letter: where the record came from, its id (or the start of its prompt), and why it was not used."""
    where = {name: record[name] for name in (*SOURCE_FIELDS, "id") if name in record}
    if isinstance(record.get("prompt"), str) and "id" not in record:
        where["prompt"] = record["prompt"][:200]
    return {**where, "reason": reason}


class ReadRecords(beam.DoFn):
    """Files (fileio's ReadableFile) -> records, each with the "file" (and "line") it came from.

    A .jsonl file holds a record per line, a JSON object, whose id is its path:line where it has
    none; any other file is one record, its text under `text_field` and its path as its id. A line
    that is not a JSON object, or a file that is not UTF-8, goes to "errors".
    """

    def __init__(self, text_field):
        self.text_field = text_field

    def process(self, readable):
        path = readable.metadata.path
        if not path.endswith(".jsonl"):
            try:
                yield {"file": path, "id": path, self.text_field: readable.read_utf8()}
            except UnicodeDecodeError as e:
                yield beam.pvalue.TaggedOutput("errors", {"file": path, "reason": f"the file is not UTF-8 text ({e})"})
            return
        with readable.open() as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:  # UnicodeDecodeError too
                    record = e
                if not isinstance(record, dict):
                    reason = f"the line is not a JSON object ({record})" if isinstance(record, ValueError) else (
                        f"the line is {type(record).__name__} JSON, not an object")
                    yield beam.pvalue.TaggedOutput("errors", {"file": path, "line": number, "reason": reason})
                    continue
                yield {"id": f"{path}:{number}", **record, "file": path, "line": number}


class ReadCorpus(beam.PTransform):
    """The files that `pattern` matches (any filesystem Beam reads: local, gs://, s3://...) ->
    {"records", "errors"}, the records spread over the workers (see ReadRecords)."""

    def __init__(self, pattern, text_field="text"):
        super().__init__()
        self.pattern, self.text_field = pattern, text_field

    def expand(self, pipeline):
        read = (pipeline
                | "Match" >> fileio.MatchFiles(self.pattern)
                | "Open" >> fileio.ReadMatches()
                | "Read" >> beam.ParDo(ReadRecords(self.text_field)).with_outputs("errors", main="records"))
        # A file is read by one worker; its records are then shared out.
        return {"records": read.records | "Spread" >> beam.Reshuffle(), "errors": read.errors}


class Handler(ModelHandler):
    """RunInference's ModelHandler for a GPT2: loads it, and runs `task(model, batch)` on batches of
    batch_size elements."""

    def __init__(self, model, task, batch_size, large_model=False):
        super().__init__()
        self.model, self.task, self.batch_size, self.large_model = model, task, batch_size, large_model

    def load_model(self):
        from .api import GPT2  # in the worker: TensorFlow starts as a float model loads

        return GPT2.from_folder(self.model.folder(), self.model.dtype)

    def run_inference(self, batch, model, inference_args=None):
        return [PredictionResult(element, result) for element, result in zip(batch, self.task(model, batch))]

    def batch_elements_kwargs(self):
        # Full batches: Beam's adaptive batching would start at one element and grow, and each
        # size of its way is another shape to compile (a bundle's last batch may still be smaller).
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def share_model_across_processes(self):
        return self.large_model


def check_settings(model, batch_size):
    check_dtype(model.dtype, ("float32", "float16", "bfloat16", "int8"))
    whole("batch_size", batch_size, 1)


# Scoring ------------------------------------------------------------------------------------------

class Window(NamedTuple):
    """One scoring window of a document (see gpt2.score.windows)."""
    key: str  # the document's own key: ids need not be unique
    id: str
    index: int  # its place among the document's windows
    count: int  # how many windows the document has
    tokens: List[int]
    n_scored: int  # its last n_scored tokens are scored
    n_bytes: int  # the document's UTF-8 bytes


class Windows(beam.DoFn):
    """Documents -> their scoring windows; a record without text goes to "errors"."""

    def __init__(self, model, stride, text_field, id_field):
        self.model, self.stride, self.text_field, self.id_field = model, stride, text_field, id_field

    def setup(self):
        folder = self.model.folder()
        self.encoder, self.n_ctx = read_encoder(folder), read_hparams(folder).n_ctx
        self.stride = check_stride(self.stride, self.n_ctx)

    def process(self, record):
        from .score import windows

        text = record.get(self.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            reason = "the text is empty" if text == "" else f"the record has no text (field {self.text_field!r})"
            yield beam.pvalue.TaggedOutput("errors", error(record if isinstance(record, dict) else {}, reason))
            return
        document_id = record.get(self.id_field, record.get("id"))
        key = uuid.uuid4().hex
        tokens = [self.encoder.eot_token] + self.encoder.encode(text)
        parts = list(windows(tokens, self.n_ctx, self.stride))
        for index, (_, window, n_scored) in enumerate(parts):
            yield Window(key, document_id, index, len(parts), window, n_scored, len(text.encode("utf-8")))


def length_class(window):
    """Windows of one class have lengths within a factor of two: batched together, little is padding."""
    return (len(window.tokens) - 1).bit_length(), window


def score_task(model, batch):
    """Each element is a batch of windows of one length class: their log-probabilities, computed as a
    power of two rows (a few shapes, so a few compiled programs)."""
    return [model.score_windows([(window.tokens, window.n_scored) for window in windows],
                                rows=1 << (len(windows) - 1).bit_length()) for windows in batch]


def scored_windows(result):
    """(window, its log-probabilities) of each window of a scored batch."""
    return zip(result.example, result.inference)


def document_key(scored):
    return scored[0].key


def document_record(key_and_windows):
    """A document's record from its windows' log-probabilities: model.score's numbers."""
    from .score import Score

    _, scored = key_and_windows
    scored = sorted(scored, key=lambda pair: pair[0].index)
    first = scored[0][0]
    if len(scored) != first.count:  # never expected: a window lost on the way
        raise GPT2Error(f"document {first.id!r} came back with {len(scored)} of its {first.count} windows")
    score = Score(None, np.concatenate([logprobs for _, logprobs in scored]), first.n_bytes)
    return {"id": first.id, "tokens": len(score.logprobs), "nll": score.nll, "perplexity": score.perplexity,
            "bytes": score.n_bytes, "bits_per_byte": score.bits_per_byte}


class CorpusTotals(beam.CombineFn):
    """The corpus's totals from its documents' records: documents, tokens, token-weighted nll,
    perplexity, bytes, bits per byte. Each document's nats are summed with math.fsum (exactly
    rounded), so that how the work was split cannot change the totals."""

    def create_accumulator(self):
        return 0, 0, []  # tokens, bytes, each document's nats

    def add_input(self, accumulator, record):
        tokens, n_bytes, nats = accumulator
        nats.append(record["nll"] * record["tokens"])
        return tokens + record["tokens"], n_bytes + record["bytes"], nats

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return (sum(a[0] for a in accumulators), sum(a[1] for a in accumulators),
                [n for a in accumulators for n in a[2]])

    def extract_output(self, accumulator):
        return corpus_totals(*accumulator)


def corpus_totals(tokens, n_bytes, nats):
    """The summary record of a corpus: nats is each document's nll x tokens."""
    total = math.fsum(nats)
    nll = total / tokens if tokens else None
    return {"documents": len(nats), "tokens": tokens, "nll": nll,
            "perplexity": math.exp(nll) if tokens else None, "bytes": n_bytes,
            "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None}


class Progress(beam.DoFn):
    """Passes elements on, and says on stderr each PROGRESS_EVERY of them that this worker passed."""

    def __init__(self, what):
        self.what, self.count = what, 0

    def process(self, element):
        self.count += 1
        if self.count % PROGRESS_EVERY == 0:
            print(f"gpt2-pipeline: {self.count} {self.what} by one worker", file=sys.stderr, flush=True)
        yield element


class ScoreDocuments(beam.PTransform):
    """Documents (dicts with a text and an optional id) -> {"documents", "summary", "errors"}: each
    document's record with model.score(text)'s numbers, the corpus's totals (one record), and the
    records that could not be scored.

    stride: how far apart a long document's windows start, as for score.py (default n_ctx // 2).
    batch_size: windows computed at once. large_model: one model per machine, shared by its
    worker processes (Beam's multi-process sharing), instead of one per process.
    """

    def __init__(self, model_name="124M", models_dir=None, stride=None, batch_size=8, dtype="float32",
                 text_field="text", id_field="id", large_model=False):
        super().__init__()
        self.model = Model(str(model_name), models_dir, dtype)
        check_settings(self.model, batch_size)
        if dtype == "int8":
            raise ArgumentError("{dtype} int8 is for generating: score with float32, float16 or bfloat16", "dtype")
        if stride is not None:
            whole("stride", stride, 1)
        self.stride, self.batch_size, self.large_model = stride, batch_size, large_model
        self.text_field, self.id_field = text_field, id_field

    def expand(self, records):
        windows = records | "Windows" >> beam.ParDo(
            Windows(self.model, self.stride, self.text_field, self.id_field)).with_outputs("errors", main="windows")
        # Beam's batches would mix windows of any lengths, each padded to the longest: batches of
        # windows of one length class instead, each of them one element of RunInference.
        documents = (windows.windows
                     | "ByLength" >> beam.Map(length_class)
                     | "Batches" >> beam.GroupIntoBatches(self.batch_size)
                     | "Batch" >> beam.Values()
                     | "Score" >> RunInference(Handler(self.model, score_task, 1, self.large_model))
                     | "Scored" >> beam.FlatMap(scored_windows)
                     | "ByDocument" >> beam.GroupBy(document_key)
                     | "Document" >> beam.Map(document_record)
                     | "Progress" >> beam.ParDo(Progress("documents scored")))
        summary = documents | "Summary" >> beam.CombineGlobally(CorpusTotals())
        return {"documents": documents, "summary": summary, "errors": windows.errors}


# Generating ---------------------------------------------------------------------------------------

class SampleSpec(NamedTuple):
    """One sample to make: its prompt record's id and source, the prompt, and model.generate's
    arguments for it (a seed always; sample_index as first_sample)."""
    source: dict
    prompt: str
    sample_index: int
    arguments: dict


class Samples(beam.DoFn):
    """Prompt records -> a SampleSpec per sample (nsamples of them); a bad record goes to "errors"."""

    def __init__(self, defaults):
        self.defaults = defaults

    def process(self, record):
        if not isinstance(record, dict):
            yield beam.pvalue.TaggedOutput("errors", error({}, f"a prompt record is a JSON object, not {record!r}"))
            return
        source = {name: record[name] for name in (*SOURCE_FIELDS, "id") if name in record}
        unknown = sorted(set(record) - {"prompt", "id", *SOURCE_FIELDS, *GENERATE_FIELDS})
        prompt = record.get("prompt", "")
        try:
            if unknown:
                raise ArgumentError(f"the record has fields that model.generate does not take: {', '.join(unknown)}")
            if not isinstance(prompt, str):
                raise ArgumentError(f"the prompt must be a string, not {prompt!r}")
            arguments = {**self.defaults, **{name: record[name] for name in GENERATE_FIELDS if name in record}}
            nsamples = whole("nsamples", arguments.pop("nsamples", 1), 1)
            first = whole("first_sample", arguments.pop("first_sample", 0), 0)
        except ArgumentError as e:
            yield beam.pvalue.TaggedOutput("errors", error(record, str(e)))
            return
        if arguments.get("seed") is None:  # a fresh one, written into each sample's record
            arguments["seed"] = new_seed()
        for index in range(first, first + nsamples):
            yield SampleSpec(source, prompt, index, arguments)


def generate_task(model, batch):
    """Each SampleSpec's text (its Row checked first: an impossible one is a GPT2Error in its place)."""
    results, made = [], []
    for spec in batch:
        try:
            made.append(model.sample_row(spec.prompt, sample_index=spec.sample_index, **spec.arguments))
            results.append(None)
        except GPT2Error as e:
            results.append(e)
        except TypeError as e:  # an argument of the wrong kind that the checks did not name
            results.append(GPT2Error(str(e)))
    texts = iter(model.generate_rows(made, len(made)) if made else [])
    return [next(texts) if result is None else result for result in results]


class SampleRecords(beam.DoFn):
    """RunInference's results -> sample records, or "errors"."""

    def __init__(self, model):
        self.model = model

    def process(self, result):
        spec, made = result.example, result.inference
        if isinstance(made, GPT2Error):
            yield beam.pvalue.TaggedOutput("errors", error({**spec.source, "prompt": spec.prompt}, str(made)))
            return
        # With logprobs (a gpt2.api.Sample), the record's "logprobs" are the values, as in
        # generate_unconditional.py's records; N is the length of each top_logprobs.
        arguments = {name: value for name, value in spec.arguments.items() if name != "logprobs" or isinstance(made, str)}
        record = {**{k: v for k, v in spec.source.items() if k == "id"}, "prompt": spec.prompt,
                  "text": made if isinstance(made, str) else made.text, "sample_index": spec.sample_index,
                  "model_name": self.model.name, "dtype": self.model.dtype, **arguments}
        yield record if isinstance(made, str) else {**record, **made.logprob_fields()}


class GenerateSamples(beam.PTransform):
    """Prompt records -> {"samples", "errors"}.

    A prompt record is a dict with `prompt` (default "": unconditional text), an optional `id`,
    and any of model.generate's arguments under the same names (length, seed, nsamples,
    temperature, top_k, top_p, stop, ...); `defaults` are those of records that leave them out.
    Each sample's record carries what reproduces it: `model.generate(prompt, length, seed=seed,
    first_sample=sample_index, **flags)[0]` is its text. batch_size: samples computed at once.
    """

    def __init__(self, model_name="124M", models_dir=None, batch_size=8, dtype="float32", large_model=False,
                 **defaults):
        super().__init__()
        self.model = Model(str(model_name), models_dir, dtype)
        check_settings(self.model, batch_size)
        unknown = sorted(set(defaults) - set(GENERATE_FIELDS))
        if unknown:
            raise ArgumentError(f"model.generate takes no {', '.join(unknown)}")
        self.defaults, self.batch_size, self.large_model = defaults, batch_size, large_model

    def expand(self, records):
        specs = records | "Samples" >> beam.ParDo(Samples(self.defaults)).with_outputs("errors", main="specs")
        made = (specs.specs
                | "Generate" >> RunInference(Handler(self.model, generate_task, self.batch_size, self.large_model))
                | "Records" >> beam.ParDo(SampleRecords(self.model)).with_outputs("errors", main="samples"))
        samples = made.samples | "Progress" >> beam.ParDo(Progress("samples made"))
        errors = (specs.errors, made.errors) | "Errors" >> beam.Flatten()
        return {"samples": samples, "errors": errors}


def to_json(record):
    return json.dumps(record, ensure_ascii=False)


# The command (pipeline.py) --------------------------------------------------------------------------

def pipeline_options(flags):
    """Beam's PipelineOptions of {name: value} flags (True: a flag alone); an unknown one is an error."""
    argv = [f"--{name}" if value is True else f"--{name}={value}" for name, value in flags.items()]
    parser = argparse.ArgumentParser(allow_abbrev=False, conflict_handler="resolve")
    classes, seen = [PipelineOptions], set()
    while classes:  # every options class Beam has, however deep
        cls = classes.pop()
        if cls not in seen:
            seen.add(cls)
            cls._add_argparse_args(parser)
            classes.extend(cls.__subclasses__())
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        raise GPT2Error(f"unknown flag {unknown[0].split('=', 1)[0]}: neither gpt2-pipeline's nor a Beam pipeline "
                        "option (pipeline.py --help lists gpt2-pipeline's)")
    return PipelineOptions(argv)


def run_corpus(transform, pattern, output, text_field, options):
    """Run `transform` (ScoreDocuments or GenerateSamples) on the files of `pattern`, writing its
    records to output-SSSSS-of-NNNNN.jsonl, the summary (scoring) to output-summary.json and the
    bad records to output-errors.jsonl; returns (how many bad records, the summary or None)."""
    if not FileSystems.match([pattern])[0].metadata_list:
        raise GPT2Error(f"no file matches --input {pattern}")
    scoring = isinstance(transform, ScoreDocuments)
    with beam.Pipeline(options=options) as pipeline:
        corpus = pipeline | "Read" >> ReadCorpus(pattern, text_field)
        done = corpus["records"] | transform
        made = done["documents" if scoring else "samples"]
        made | "JSON" >> beam.Map(to_json) | "Write" >> beam.io.WriteToText(output, ".jsonl")
        if scoring:
            (done["summary"] | "SummaryJSON" >> beam.Map(json.dumps, indent=2)
             | "WriteSummary" >> beam.io.WriteToText(output + "-summary", ".json", num_shards=1,
                                                     shard_name_template=""))
        ((corpus["errors"], done["errors"]) | "Errors" >> beam.Flatten() | "ErrorJSON" >> beam.Map(to_json)
         | "WriteErrors" >> beam.io.WriteToText(output + "-errors", ".jsonl", num_shards=1, shard_name_template=""))
    with FileSystems.open(output + "-errors.jsonl") as f:
        errors = sum(1 for line in f if line.strip())
    if not scoring:
        return errors, None
    with FileSystems.open(output + "-summary.json") as f:
        return errors, json.load(f)
