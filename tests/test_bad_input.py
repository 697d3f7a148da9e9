"""A catalogue of malformed inbox drops, each of which must end `rejected` with a helpful message.

Every case is dropped with a plain PUT into the inbox of one bucket on the moto server,
next to one valid job. Workers then run over the whole catalogue once, in a module
fixture. The parametrized tests below check each drop's outcome: the state, a one-line
message naming the field and value, the raw body kept byte for byte in submitted.json,
and the drop gone from the inbox. The valid job must still succeed.
"""

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.layout import BucketLayout, is_valid_job_id
from pipeline.lifecycle import REJECTED, SUCCEEDED
from pipeline.spec import MAX_SPEC_BYTES
from pipeline.store import ObjectStore, make_client
from pipeline.worker import Worker, WorkerConfig

VALID_NAME = "valid.json"
VALID_TEXT = "The capital of"
OTHER_BUCKET = "someone-elses-bucket"
ALLOWED_MODEL = "openai-community/gpt2"
MAX_POLLS = 5

_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class Env:
    """Values a case body may depend on: the test bucket and the tiny model's directory."""

    bucket: str
    model: str


@dataclass(frozen=True)
class Case:
    """One malformed drop: its inbox name, body, expected message fragments and worker settings key."""

    name: str
    body: Callable[[Env], bytes]
    fragments: tuple[str, ...]
    key: str | None = None
    settings: str = "default"
    # True when the spec passes intake and the worker rejects the job when it runs. Such a
    # job keeps its normalized spec.json, and no submitted.json (docs/bucket-layout.md).
    rejected_at_run: bool = False
    # Checks (by test function name) that fail today because of a pipeline bug, with the reason.
    known_gaps: dict[str, str] = field(default_factory=dict)

    def inbox_key(self) -> str:
        return self.key if self.key is not None else f"inbox/{self.name}.json"


def base_spec(env: Env) -> dict:
    return {"model": env.model, "method": "saliency", "input_text": VALID_TEXT, "generation_args": {"max_new_tokens": 2}}


def fields(**changes) -> Callable[[Env], bytes]:
    """Build a body from the valid tiny-model spec with fields replaced. A value of None removes the field."""

    def build(env: Env) -> bytes:
        spec = base_spec(env)
        for name, value in changes.items():
            if value is None:
                spec.pop(name, None)
            else:
                spec[name] = value(env) if callable(value) else value
        return json.dumps(spec, ensure_ascii=False).encode("utf-8")

    return build


def raw(body: bytes) -> Callable[[Env], bytes]:
    return lambda env: body


def spliced(fragment: str) -> Callable[[Env], bytes]:
    """Build the valid spec's JSON text with `fragment` inserted as extra raw members."""

    def build(env: Env) -> bytes:
        text = json.dumps(base_spec(env))
        return (text[:-1] + ", " + fragment + "}").encode("utf-8")

    return build


def oversized(env: Env) -> bytes:
    spec = json.dumps(base_spec(env))
    return (spec[:-1] + ' , "labels": {}' + " " * MAX_SPEC_BYTES + "}").encode("utf-8")


def nested(depth: int) -> Callable[[Env], bytes]:
    return lambda env: spliced('"method_args": {"baselines": ' + "[" * depth + "0" + "]" * depth + "}")(env)


def uri(key: str) -> Callable[[Env], str]:
    return lambda env: f"s3://{env.bucket}/{key}"


ACCEPTED_BY_MISTAKE = "pipeline/spec.py decode_body keeps the last of duplicate keys, so the drop is accepted and run"

CASES = [
    # The body is not a JSON object.
    Case("not_json", raw(b"{input_text: Hello}"), ("not valid JSON", "check the syntax")),
    Case("truncated_json", raw(b'{"input_text": "Hello"'), ("not valid JSON",)),
    Case("invalid_utf8", raw(b'{"input_text": "caf\xe9"}'), ("not valid UTF-8", "byte 19")),
    Case("utf8_bom", lambda env: b"\xef\xbb\xbf" + fields()(env), ("byte-order mark", "without BOM")),
    Case("empty_body", raw(b""), ("body is empty",)),
    Case("top_array", raw(b'[{"input_text": "Hello"}]'), ("JSON array, not an object", "wrap the fields")),
    Case("top_string", raw(b'"Hello"'), ("not an object",)),
    Case("top_number", raw(b"42"), ("not an object",)),
    Case("top_null", raw(b"null"), ("not an object",)),
    Case("nan_constant", spliced('"n_steps": NaN'), ("NaN is not a JSON number",)),
    Case("infinity_constant", spliced('"method_args": {"n_steps": -Infinity}'), ("-Infinity is not a JSON number",)),
    Case("deep_nesting", nested(50), ("nested more than 8 levels",)),
    Case("oversized_body", oversized, (f"at most {MAX_SPEC_BYTES} are allowed", "use inputs_uri")),
    # Wrong types.
    Case("text_number", fields(input_text=42), ("'input_text' is 42", "valid string")),
    Case("texts_item_number", fields(input_text=None, input_texts=["Hello", 7]), ("'input_texts.1' is 7", "valid string")),
    Case("scores_string", fields(step_scores="probability"), ("'step_scores' is 'probability'", "valid list")),
    Case("steps_string", fields(n_steps="10"), ("'n_steps' is '10'", "valid integer")),
    Case("cpu_string", fields(force_cpu="yes"), ("'force_cpu' is 'yes'", "valid boolean")),
    Case("label_number", fields(labels={"team": 5}), ("'labels.team' is 5", "valid string")),
    Case("sample_number", fields(generation_args={"do_sample": 1}), ("do_sample must be true or false", "not 1")),
    # Unknown names.
    Case("unknown_field", fields(colour="red"), ("unknown field 'colour'", "check its spelling")),
    Case("unknown_aggregation_field", fields(aggregation={"norm": True}), ("unknown field 'aggregation.norm'",)),
    Case("unknown_method", fields(method="shapley"), ("'method' is 'shapley'", "saliency")),
    Case("unknown_step_score", fields(step_scores=["surprise"]), ("unknown step score 'surprise'", "probability")),
    Case("unknown_aggregator", fields(aggregation={"aggregator": "median"}), ("unknown aggregator 'median'", "mean")),
    Case("unknown_attributed_fn", fields(attributed_fn="loss"), ("'attributed_fn' is 'loss'", "probability")),
    Case("bad_spec_version", fields(spec_version=2), ("'spec_version' is 2", "should be 1")),
    Case("bad_device", fields(device="tpu"), ("'device' is 'tpu'", "'cuda'")),
    Case("bad_model_name", fields(model="not a model!"), ("'model' is 'not a model!'", "not a hub id")),
    # Values out of range.
    Case("n_steps_high", fields(n_steps=501), ("'n_steps' is 501", "allowed range is 1 to 500")),
    Case("max_new_tokens_high", fields(generation_args={"max_new_tokens": 513}), ("max_new_tokens is 513", "1 to 512")),
    Case("temperature_zero", fields(generation_args={"temperature": 0}), ("temperature is 0", "0.01 to 10.0")),
    Case("batch_size_high", fields(batch_size=65), ("'batch_size' is 65", "allowed range is 1 to 64")),
    Case("chunk_size_zero", fields(chunk_size=0), ("'chunk_size' is 0", "allowed range is 1 to 1000")),
    Case("max_attempts_high", fields(max_attempts=11), ("'max_attempts' is 11", "allowed range is 1 to 10")),
    Case("attr_pos_negative", fields(attr_pos_start=-1), ("'attr_pos_start' is -1", "allowed range is 0 to 4096")),
    Case("attr_pos_reversed", fields(attr_pos_start=5, attr_pos_end=5), ("attr_pos_end (5)", "greater than attr_pos_start (5)")),
    Case("outputs_empty", fields(outputs=[]), ("'outputs' is []", "tables, json, html")),
    # Arguments passed on to Inseq and transformers.
    Case("generation_arg_unknown", fields(generation_args={"num_beams": 4}), ("unsupported generation argument 'num_beams'", "max_new_tokens")),
    Case("method_arg_reserved", fields(method_args={"batch_size": 2}), ("'batch_size' is set by tokviz", "top-level")),
    Case("method_arg_nested", fields(method_args={"baselines": {"zero": 0}}), ("'baselines' must be a number", "list of them")),
    Case("method_arg_name", fields(method_args={"nSteps": 5}), ("argument name 'nSteps'", "lowercase")),
    Case(
        "method_arg_newline",
        fields(method_args={"baselines\n": {"zero": 0}}),
        ("baselines",),
    ),
    # Labels.
    Case("too_many_labels", fields(labels={f"key{n}": "v" for n in range(33)}), ("33 labels given", "at most 32")),
    Case("bad_label_key", fields(labels={"1team": "nlp"}), ("label key '1team'", "must match")),
    # Input texts.
    Case("oversized_text", fields(input_text="a" * 20_001), ("20001 characters", "at most 20000")),
    Case("too_many_inputs", fields(input_text=None, input_texts=["a"] * 1001), ("1001 texts given", "use inputs_uri")),
    Case("empty_input_texts", fields(input_text=None, input_texts=[]), ("'input_texts' is []", "at least one text")),
    Case("whitespace_text", fields(input_text=" \t\n "), ("'input_text'", "only whitespace")),
    Case("nul_text", fields(input_text="The\x00capital"), ("'input_text'", "NUL characters")),
    Case("text_and_texts", fields(input_texts=["Hello"]), ("exactly one of input_text", "given: input_text, input_texts")),
    Case("no_inputs", fields(input_text=None), ("exactly one of input_text", "given: none")),
    Case("duplicate_step_scores", fields(step_scores=["probability", "probability"]), ("'step_scores'", "list each step score once")),
    Case("generated_mismatch", fields(input_text=None, input_texts=["a", "b"], generated_texts=["a x"]), ("generated_texts has 1 texts for 2 inputs",)),
    Case("cpu_and_cuda", fields(force_cpu=True, device="cuda"), ("force_cpu is true but device is 'cuda'",)),
    Case("normalize_and_rescale", fields(aggregation={"normalize": True, "rescale": True}), ("at most one of normalize and rescale",)),
    Case("duplicate_key", spliced('"n_steps": 5, "n_steps": 50'), ("'n_steps'", "duplicate")),
    # inputs_uri.
    Case("uri_other_bucket", fields(input_text=None, inputs_uri=f"s3://{OTHER_BUCKET}/inputs/rows.jsonl"), (f"bucket {OTHER_BUCKET!r}", "job's bucket")),
    Case("uri_dotdot", fields(input_text=None, inputs_uri=uri("inputs/../secrets/rows.jsonl")), ("'inputs_uri'", "'..' path segments")),
    Case("uri_extension", fields(input_text=None, inputs_uri=uri("inputs/rows.txt")), ("'inputs_uri'", "ending in .jsonl, .csv or .parquet")),
    Case(
        "uri_missing",
        fields(input_text=None, inputs_uri=uri("inputs/missing.jsonl")),
        ("inputs/missing.jsonl", "does not exist; upload it first"),
        rejected_at_run=True,
    ),
    Case(
        "uri_row_without_text",
        fields(input_text=None, inputs_uri=uri("inputs/no-text.jsonl")),
        ("row 2", "no non-empty 'text' column"),
        rejected_at_run=True,
    ),
    # Forced decoding with a decoder-only model, checked when the job runs.
    Case(
        "forced_prefix",
        fields(generated_texts=["Paris is the capital"]),
        ("'generated_texts' item 0", "repeat the input as its prefix"),
        rejected_at_run=True,
    ),
    # Drop names.
    Case("name_with_slash", fields(), ("'a/b.json'", "path separator"), key="inbox/a/b.json"),
    Case("name_with_dots", fields(), ("'a..b.json'", "'..'"), key="inbox/a..b.json"),
    Case("name_not_json", fields(), ("'spec.txt'", "does not end in .json"), key="inbox/spec.txt"),
    Case("id_collision", fields(input_text="A different body"), ("job id 'valid' already exists", "new name"), key=f"inbox/{VALID_NAME}"),
    # Worker policy.
    Case("model_not_allowed", fields(model="EleutherAI/pythia-14m"), ("'EleutherAI/pythia-14m'", f"use one of {ALLOWED_MODEL}"), settings="allowlist"),
    Case("local_model", fields(), ("local path", "--allow-local-models"), settings="no_local"),
    Case("gguf_model", fields(model="models/tiny.gguf"), ("'models/tiny.gguf'", "--allow-local-models"), settings="no_local"),
]

WORKER_SETTINGS = {
    "default": {},
    "allowlist": {"model_allowlist": (ALLOWED_MODEL,)},
    "no_local": {"allow_local_models": False},
}

# Objects that the inputs_uri cases read. The second row lacks a text column.
INPUT_OBJECTS = {"inputs/no-text.jsonl": b'{"text": "The capital of"}\n{"label": "no text here"}\n'}


@dataclass
class Drop:
    """A case as dropped: its body, the ETag the PUT returned, and the job it became."""

    case: Case
    body: bytes
    etag: str
    job_id: str | None = None


@dataclass
class Catalogue:
    store: ObjectStore
    layout: BucketLayout
    drops: dict[str, Drop]
    valid_job_id: str | None


def find_job_id(store: ObjectStore, layout: BucketLayout, inbox_key: str, etag: str) -> str | None:
    """Find the job a drop became: the file stem when that job's source matches, else a generated id.

    Matching on the ETag as well as the original name distinguishes two drops under the
    same name, such as a job and a later drop that collides with its id.
    """
    name = layout.inbox_name(inbox_key)
    stem = layout.job_id_from_inbox_key(inbox_key)
    if stem is not None and store.exists(layout.status_key(stem)):
        record = store.get_json(layout.status_key(stem))[0]
        if _same_drop(record["source"], name, etag):
            return stem

    for info in store.list(layout.jobs_prefix):
        if not info.key.endswith("/status.json"):
            continue
        record = store.get_json(info.key)[0]
        if _same_drop(record["source"], name, etag):
            return record["job_id"]
    return None


def _same_drop(source: dict, name: str, etag: str) -> bool:
    return source.get("original_name") == name and source.get("etag", "").strip('"') == etag.strip('"')


def drop(store: ObjectStore, key: str, body: bytes) -> str:
    """PUT a body into the inbox as a user would, with no tokviz code involved, and return the ETag."""
    response = store.client.put_object(Bucket=store.bucket, Key=key, Body=body)
    return response["ETag"]


def run_until_idle(worker: Worker) -> None:
    """Poll until the inbox and the queue are empty."""
    for _ in range(MAX_POLLS):
        worker.poll_once()
        inbox_left = list(worker.intake.pending())
        queue_left = worker.queued_job_ids()
        if not inbox_left and not queue_left:
            return
    raise AssertionError(f"worker still has work after {MAX_POLLS} polls: inbox {inbox_left}, queue {queue_left}")


@pytest.fixture(scope="module")
def catalogue(moto_server, causal_model_dir, model_cache) -> Catalogue:
    """Drop every case next to one valid job and run the workers over them once."""
    bucket = f"bad-input-{next(_bucket_numbers)}-{os.getpid()}"
    moto_server.create_bucket(bucket)
    store = ObjectStore(make_client(moto_server.endpoint_url), bucket)
    layout = BucketLayout("")
    env = Env(bucket=bucket, model=str(Path(causal_model_dir)))

    def make_worker(settings: str) -> Worker:
        config = WorkerConfig(**{"allow_local_models": True, "lease_seconds": 30, **WORKER_SETTINGS[settings]})
        return Worker(store, layout, config, model_cache)

    for key, body in INPUT_OBJECTS.items():
        store.put(key, body)

    # Accept the valid job first, so that the id_collision drop finds its id taken.
    valid_key = f"inbox/{VALID_NAME}"
    valid_etag = drop(store, valid_key, fields()(env))
    make_worker("default").intake.accept(next(info for info in make_worker("default").intake.pending() if info.key == valid_key))

    drops = {}
    for settings in WORKER_SETTINGS:
        for case in CASES:
            if case.settings != settings:
                continue
            body = case.body(env)
            drops[case.name] = Drop(case, body, drop(store, case.inbox_key(), body))
        run_until_idle(make_worker(settings))

    for item in drops.values():
        item.job_id = find_job_id(store, layout, item.case.inbox_key(), item.etag)
    return Catalogue(store, layout, drops, find_job_id(store, layout, valid_key, valid_etag))


def status_of(catalogue: Catalogue, case: Case) -> dict:
    job_id = catalogue.drops[case.name].job_id
    assert job_id is not None, f"no job records the drop {case.inbox_key()!r}"
    return catalogue.store.get_json(catalogue.layout.status_key(job_id))[0]


def params(check: str, rejected_at_run: bool | None = None) -> list:
    """Parametrize a check over the catalogue, marking the cases with a known gap in it.

    With `rejected_at_run` set, only the cases rejected at that stage are included.
    """
    marked = []
    for case in CASES:
        if rejected_at_run is not None and case.rejected_at_run != rejected_at_run:
            continue
        reason = case.known_gaps.get(check)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        marked.append(pytest.param(case, id=case.name, marks=marks))
    return marked


def test_catalogue_size():
    names = [case.name for case in CASES]

    assert len(set(names)) == len(names), "two cases share a name"
    assert len(CASES) >= 40, f"the catalogue has only {len(CASES)} cases"


@pytest.mark.parametrize("case", params("test_drop_rejected"))
def test_drop_rejected(catalogue, case):
    record = status_of(catalogue, case)

    assert record["state"] == REJECTED, f"{case.name} ended {record['state']!r}: {record.get('message')!r}"


@pytest.mark.parametrize("case", params("test_message_one_line"))
def test_message_one_line(catalogue, case):
    message = status_of(catalogue, case)["message"]

    assert isinstance(message, str), f"{case.name} has no status message"
    assert "\n" not in message, f"{case.name} message spans several lines: {message!r}"
    assert message.startswith("Invalid spec: "), f"{case.name} message lacks the common prefix: {message!r}"


@pytest.mark.parametrize("case", params("test_message_fragment"))
def test_message_fragment(catalogue, case):
    message = status_of(catalogue, case)["message"] or ""

    for fragment in case.fragments:
        assert fragment in message, f"{case.name} message lacks {fragment!r}: {message!r}"


@pytest.mark.parametrize("case", params("test_submitted_copy", rejected_at_run=False))
def test_submitted_copy(catalogue, case):
    job_id = catalogue.drops[case.name].job_id
    assert job_id is not None, f"no job records the drop {case.inbox_key()!r}"
    key = catalogue.layout.submitted_key(job_id)

    assert catalogue.store.exists(key), f"{case.name} has no {key}"
    assert catalogue.store.get(key).body == catalogue.drops[case.name].body, f"{key} differs from the dropped body"


@pytest.mark.parametrize("case", params("test_run_rejection_keeps_spec", rejected_at_run=True))
def test_run_rejection_keeps_spec(catalogue, case):
    job_id = catalogue.drops[case.name].job_id
    assert job_id is not None, f"no job records the drop {case.inbox_key()!r}"

    assert catalogue.store.exists(catalogue.layout.spec_key(job_id)), f"{case.name} was rejected at run time but has no spec.json"


@pytest.mark.parametrize("case", params("test_drop_removed"))
def test_drop_removed(catalogue, case):
    assert not catalogue.store.exists(case.inbox_key()), f"{case.inbox_key()} is still in the inbox"


def test_inbox_empty(catalogue):
    left = [info.key for info in catalogue.store.list(catalogue.layout.inbox_prefix)]

    assert left == [], f"drops left in the inbox: {left}"


def test_queue_empty(catalogue):
    left = [info.key for info in catalogue.store.list(catalogue.layout.queue_prefix)]

    assert left == [], f"queue markers left: {left}"


def test_valid_job_succeeds(catalogue):
    assert catalogue.valid_job_id == "valid", f"the valid drop became job {catalogue.valid_job_id!r}"
    record = catalogue.store.get_json(catalogue.layout.status_key("valid"))[0]

    assert record["state"] == SUCCEEDED, f"valid job ended {record['state']!r}: {record.get('message')!r}"


def test_collision_keeps_original(catalogue):
    collision = catalogue.drops["id_collision"].job_id
    spec = catalogue.store.get_json(catalogue.layout.spec_key("valid"))[0]

    assert collision != "valid", "the colliding drop took the existing job id"
    assert collision.startswith("drop-"), f"the colliding drop got id {collision!r}, not a generated one"
    assert spec["input_texts"] == [VALID_TEXT], f"the existing job's spec was replaced: {spec['input_texts']}"


def test_oversized_never_read(catalogue):
    job_id = catalogue.drops["oversized_body"].job_id
    record = status_of(catalogue, catalogue.drops["oversized_body"].case)

    assert record["source"]["size"] > MAX_SPEC_BYTES, f"oversized drop recorded size {record['source']['size']}"
    assert not catalogue.store.exists(catalogue.layout.spec_key(job_id)), "an oversized drop got a spec.json"


# --- drops that once stopped the worker before any job ran ---------------

POISON_DROPS = [
    pytest.param(
        b'{"input_text": "a\\ud800b"}',
        id="lone_surrogate",
    ),
    pytest.param(
        b'{"input_text": "a", "labels": ' + b"[" * 700 + b"]" * 700 + b"}",
        id="nesting_700",
    ),
]


@pytest.mark.parametrize("body", POISON_DROPS)
def test_poison_drop_rejected(store, layout, make_worker, body):
    etag = drop(store, "inbox/poison.json", body)
    make_worker().poll_once()
    job_id = find_job_id(store, layout, "inbox/poison.json", etag)
    assert job_id == "poison", f"the drop became job {job_id!r}"
    record = store.get_json(layout.status_key(job_id))[0]

    assert record["state"] == REJECTED, f"poison drop ended {record['state']!r}"
    assert not store.exists("inbox/poison.json"), "the poison drop is still in the inbox"


def test_job_id_newline_invalid():
    assert not is_valid_job_id("report\n"), "a job id with a final newline would put a newline into every key"
