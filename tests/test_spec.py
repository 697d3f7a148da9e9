"""Unit and property-based tests of pipeline.spec: parsing, normalizing and rejecting job specs."""

import json

import inseq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import registries
from pipeline.errors import SpecError
from pipeline.spec import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    GENERATION_ARG_RANGES,
    MAX_JSON_DEPTH,
    MAX_LABELS,
    MAX_SPEC_BYTES,
    MAX_TEXT_CHARS,
    OUTPUT_KINDS,
    RESERVED_METHOD_ARGS,
    JobSpec,
    SpecPolicy,
    parse_spec,
)

BUCKET = "jobs-bucket"
POLICY = SpecPolicy(bucket=BUCKET)

LEGACY_BODY = {
    "model": "gpt2",
    "method": "saliency",
    "input_text": "Hello",
    "step_scores": ["probability"],
    "force_cpu": True,
    "n_steps": 10,
}

FULL_BODY = {
    "spec_version": 1,
    "model": "openai-community/gpt2",
    "method": "integrated_gradients",
    "input_texts": ["The capital of France is", "Hello world"],
    "generated_texts": ["The capital of France is Paris", "Hello world, again"],
    "step_scores": ["probability", "entropy"],
    "attribute_target": True,
    "attributed_fn": "probability",
    "attr_pos_start": 1,
    "attr_pos_end": 8,
    "method_args": {"internal_batch_size": 4, "multiply_by_inputs": True},
    "generation_args": {"max_new_tokens": 8, "do_sample": False, "temperature": 0.7},
    "device": "cpu",
    "aggregation": {"aggregator": ["subwords", "mean"], "normalize": True},
    "batch_size": 2,
    "chunk_size": 10,
    "outputs": ["json", "tables"],
    "max_attempts": 2,
    "labels": {"team": "nlp", "run.id": "r-17"},
}

INSEQ_METHODS = sorted(inseq.list_feature_attribution_methods())
INSEQ_STEP_FUNCTIONS = sorted(inseq.list_step_functions())
INSEQ_AGGREGATORS = sorted(set(inseq.list_aggregators()) | set(inseq.list_aggregation_functions()))


def encode(data) -> bytes:
    """Encode a spec as the UTF-8 JSON body a user drops into the inbox."""
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


def with_fields(**fields) -> bytes:
    """Encode a minimal valid spec with some fields added or replaced."""
    return encode({"input_text": "Hello", **fields})


def rejection(body: bytes, policy: SpecPolicy = POLICY) -> SpecError:
    """Parse a body that must be rejected and return the SpecError."""
    with pytest.raises(SpecError) as caught:
        parse_spec(body, policy)
    return caught.value


def stored_form(normalized: dict) -> bytes:
    """Encode a normalized spec the way the intake writes spec.json."""
    return json.dumps(normalized, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")


# --- the earlier API body -----------------------------------------------------


def test_legacy_body_normalizes():
    normalized = parse_spec(encode(LEGACY_BODY), POLICY).normalized()

    assert normalized["device"] == "cpu", f"force_cpu: true must become device 'cpu': {normalized}"
    assert normalized["input_texts"] == ["Hello"], f"input_text must become a one-item input_texts: {normalized}"
    assert normalized["n_steps"] == 10, f"n_steps must be kept: {normalized}"
    assert "input_text" not in normalized, f"input_text must be folded into input_texts: {normalized}"
    assert "force_cpu" not in normalized, f"force_cpu must be folded into device: {normalized}"
    assert normalized["model"] == "gpt2", f"model changed: {normalized}"
    assert normalized["method"] == "saliency", f"method changed: {normalized}"
    assert normalized["step_scores"] == ["probability"], f"step_scores changed: {normalized}"


def test_legacy_body_defaults():
    normalized = parse_spec(encode(LEGACY_BODY), POLICY).normalized()

    assert normalized["generation_args"] == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}, f"default generation args missing: {normalized}"
    assert normalized["outputs"] == list(OUTPUT_KINDS), f"default outputs missing: {normalized}"
    assert normalized["spec_version"] == 1, f"spec_version missing: {normalized}"


def test_legacy_body_round_trip():
    first = parse_spec(encode(LEGACY_BODY), POLICY).normalized()
    second = parse_spec(stored_form(first), POLICY).normalized()

    assert second == first, "normalized legacy spec changed when parsed again"


def test_force_cpu_false_keeps_device():
    normalized = parse_spec(with_fields(force_cpu=False, device="cuda"), POLICY).normalized()

    assert normalized["device"] == "cuda", f"force_cpu false must not override device: {normalized}"


# --- the fuller form -----------------------------------------------------------


def test_full_body_keeps_fields():
    normalized = parse_spec(encode(FULL_BODY), POLICY).normalized()

    for name, value in FULL_BODY.items():
        if name in ("outputs", "aggregation"):
            continue
        assert normalized[name] == value, f"field {name!r} changed from {value!r} to {normalized[name]!r}"


def test_full_body_orders_outputs():
    normalized = parse_spec(encode(FULL_BODY), POLICY).normalized()

    assert normalized["outputs"] == ["tables", "json"], f"outputs must follow OUTPUT_KINDS order: {normalized['outputs']}"


def test_full_body_aggregation():
    normalized = parse_spec(encode(FULL_BODY), POLICY).normalized()
    expected = {"aggregator": ["subwords", "mean"], "normalize": True, "rescale": None}

    assert normalized["aggregation"] == expected, f"aggregation changed: {normalized['aggregation']}"


def test_full_body_round_trip():
    first = parse_spec(encode(FULL_BODY), POLICY).normalized()
    second = parse_spec(stored_form(first), POLICY).normalized()

    assert second == first, "normalized full spec changed when parsed again"


def test_inputs_uri_round_trip():
    body = encode({"inputs_uri": f"s3://{BUCKET}/inputs/rows.jsonl", "labels": {"set": "a"}})
    first = parse_spec(body, POLICY).normalized()
    second = parse_spec(stored_form(first), POLICY).normalized()

    assert "input_texts" not in first, f"a spec with inputs_uri must not gain input_texts: {first}"
    assert second == first, "normalized inputs_uri spec changed when parsed again"


def test_defaults_fill_model_and_method():
    spec = parse_spec(with_fields(), POLICY)

    assert spec.model == DEFAULT_MODEL, f"default model is {spec.model!r}"
    assert spec.method in INSEQ_METHODS, f"default method {spec.method!r} is not in Inseq's registry"


# --- Inseq registries -----------------------------------------------------------


def test_registry_methods_match_inseq():
    assert list(registries.attribution_methods()) == INSEQ_METHODS, "registries.attribution_methods differs from Inseq"


def test_registry_step_functions_match_inseq():
    assert list(registries.step_functions()) == INSEQ_STEP_FUNCTIONS, "registries.step_functions differs from Inseq"


def test_registry_aggregators_match_inseq():
    assert list(registries.aggregators()) == INSEQ_AGGREGATORS, "registries.aggregators differs from Inseq"


@pytest.mark.parametrize("method", INSEQ_METHODS)
def test_inseq_method_accepted(method):
    spec = parse_spec(with_fields(method=method), POLICY)

    assert spec.method == method, f"method {method!r} changed to {spec.method!r}"


@pytest.mark.parametrize("name", INSEQ_STEP_FUNCTIONS)
def test_inseq_step_score_accepted(name):
    spec = parse_spec(with_fields(step_scores=[name]), POLICY)

    assert spec.step_scores == [name], f"step score {name!r} changed to {spec.step_scores!r}"


@pytest.mark.parametrize("name", INSEQ_STEP_FUNCTIONS)
def test_inseq_attributed_fn_accepted(name):
    spec = parse_spec(with_fields(attributed_fn=name), POLICY)

    assert spec.attributed_fn == name, f"attributed_fn {name!r} changed to {spec.attributed_fn!r}"


@pytest.mark.parametrize("name", INSEQ_AGGREGATORS)
def test_inseq_aggregator_accepted(name):
    spec = parse_spec(with_fields(aggregation={"aggregator": name}), POLICY)

    assert spec.aggregation.aggregator == name, f"aggregator {name!r} changed to {spec.aggregation.aggregator!r}"


def test_all_step_scores_together():
    spec = parse_spec(with_fields(step_scores=INSEQ_STEP_FUNCTIONS), POLICY)

    assert spec.step_scores == INSEQ_STEP_FUNCTIONS, "the full list of Inseq step functions was changed"


def test_unknown_method_message():
    message = str(rejection(with_fields(method="shapley_magic")))

    assert "'method'" in message, f"message does not name the field: {message}"
    assert "'shapley_magic'" in message, f"message does not name the value: {message}"
    assert "saliency" in message, f"message does not list the known methods: {message}"


def test_unknown_step_score_message():
    message = str(rejection(with_fields(step_scores=["probability", "surprise"])))

    assert "'step_scores'" in message, f"message does not name the field: {message}"
    assert "'surprise'" in message, f"message does not name the value: {message}"
    assert "entropy" in message, f"message does not list the known step functions: {message}"


def test_unknown_aggregator_message():
    message = str(rejection(with_fields(aggregation={"aggregator": ["spans", "median"]})))

    assert "'aggregation.aggregator'" in message, f"message does not name the field: {message}"
    assert "'median'" in message, f"message does not name the value: {message}"
    assert "vnorm" in message, f"message does not list the known aggregators: {message}"


# --- messages for invalid specs --------------------------------------------------


@pytest.mark.parametrize("name", ["colour", "inputText", "n-steps"])
def test_unknown_field_message(name):
    error = rejection(with_fields(**{name: 1}))
    message = str(error)

    assert f"unknown field {name!r}" in message, f"message does not name the unknown field: {message}"
    assert error.field == name, f"SpecError.field is {error.field!r}"


def test_unknown_nested_field_message():
    message = str(rejection(with_fields(aggregation={"aggregator": "mean", "norm": True})))

    assert "unknown field 'aggregation.norm'" in message, f"message does not name the nested field: {message}"


RANGE_CASES = [
    pytest.param({"n_steps": 0}, "'n_steps'", "0", "1 to 500", id="n_steps-low"),
    pytest.param({"n_steps": 501}, "'n_steps'", "501", "1 to 500", id="n_steps-high"),
    pytest.param({"batch_size": 65}, "'batch_size'", "65", "1 to 64", id="batch_size"),
    pytest.param({"chunk_size": 1001}, "'chunk_size'", "1001", "1 to 1000", id="chunk_size"),
    pytest.param({"max_attempts": 0}, "'max_attempts'", "0", "1 to 10", id="max_attempts"),
    pytest.param({"attr_pos_start": -1}, "'attr_pos_start'", "-1", "0 to 4096", id="attr_pos_start"),
    pytest.param({"attr_pos_end": 0}, "'attr_pos_end'", "0", "1 to 4096", id="attr_pos_end"),
    pytest.param({"generation_args": {"max_new_tokens": 513}}, "max_new_tokens", "513", "1 to 512", id="max_new_tokens"),
    pytest.param({"generation_args": {"top_p": 1.5}}, "top_p", "1.5", "0.01 to 1.0", id="top_p"),
    pytest.param({"generation_args": {"top_k": 0}}, "top_k", "0", "1 to 1000", id="top_k"),
    pytest.param({"method_args": {"n_steps": 600}}, "n_steps", "600", "1 to 500", id="method_n_steps"),
    pytest.param({"method_args": {"n_samples": 0}}, "n_samples", "0", "1 to 1000", id="method_n_samples"),
]


@pytest.mark.parametrize(("fields", "field", "value", "allowed"), RANGE_CASES)
def test_range_message(fields, field, value, allowed):
    message = str(rejection(with_fields(**fields)))

    assert field in message, f"message does not name the field {field}: {message}"
    assert value in message, f"message does not name the value {value}: {message}"
    assert allowed in message, f"message does not give the range {allowed}: {message}"


@pytest.mark.parametrize("name", sorted(GENERATION_ARG_RANGES))
def test_generation_arg_bounds_accepted(name):
    kind, low, high = GENERATION_ARG_RANGES[name]
    for value in (low, high):
        typed = kind(value)
        spec = parse_spec(with_fields(generation_args={name: typed}), POLICY)
        assert spec.generation_args[name] == typed, f"{name}={typed!r} at the edge of its range was changed"


@pytest.mark.parametrize("name", sorted(RESERVED_METHOD_ARGS))
def test_reserved_method_arg_rejected(name):
    message = str(rejection(with_fields(method_args={name: 1})))

    assert repr(name) in message, f"message does not name the reserved argument: {message}"
    assert "top-level" in message, f"message does not point to the top-level field: {message}"


def test_text_length_limit():
    longest = parse_spec(with_fields(input_text="a" * MAX_TEXT_CHARS), POLICY)
    message = str(rejection(with_fields(input_text="a" * (MAX_TEXT_CHARS + 1))))

    assert len(longest.input_text) == MAX_TEXT_CHARS, "a text of exactly the limit must be accepted"
    assert f"{MAX_TEXT_CHARS + 1} characters" in message, f"message does not give the length: {message}"
    assert str(MAX_TEXT_CHARS) in message, f"message does not give the limit: {message}"


def test_label_count_limit():
    labels = {f"key{number}": "v" for number in range(MAX_LABELS + 1)}
    message = str(rejection(with_fields(labels=labels)))

    assert f"{MAX_LABELS + 1} labels" in message, f"message does not give the count: {message}"
    assert f"at most {MAX_LABELS}" in message, f"message does not give the limit: {message}"


def test_body_size_limit():
    body = with_fields(labels={"pad": "x"})
    padded = body[:-1] + b" " * (MAX_SPEC_BYTES + 1 - len(body)) + b"}"
    message = str(rejection(padded))

    assert f"{MAX_SPEC_BYTES + 1} bytes" in message, f"message does not give the size: {message}"
    assert f"at most {MAX_SPEC_BYTES}" in message, f"message does not give the limit: {message}"


def test_nesting_limit():
    nested = 1
    for _ in range(MAX_JSON_DEPTH):
        nested = [nested]
    message = str(rejection(with_fields(method_args={"x": nested})))

    assert f"more than {MAX_JSON_DEPTH} levels" in message, f"message does not give the limit: {message}"


@pytest.mark.parametrize(
    "body",
    [b"", b"\xef\xbb\xbf{}", b"{\"input_text\": \"\xff\"}", b"[]", b"{\"input_text\": NaN}", b"{", b"null"],
    ids=["empty", "bom", "utf8", "array", "nan", "truncated", "null"],
)
def test_decode_message_one_line(body):
    message = str(rejection(body))

    assert "\n" not in message, f"message spans several lines: {message!r}"
    assert message.startswith("Invalid spec: "), f"message lacks the common prefix: {message!r}"


# --- known gaps (fixes belong in pipeline/spec.py) ---------------------------------


def test_deep_nesting_rejected():
    depth = 700
    body = b'{"input_text": "a", "labels": ' + b"[" * depth + b"]" * depth + b"}"
    message = str(rejection(body))

    assert "nested" in message, f"message does not name the nesting: {message}"


def test_lone_surrogate_rejected():
    message = str(rejection(b'{"input_text": "a\\ud800b"}'))

    assert "'input_text'" in message, f"message does not name the field: {message}"


def test_float_overflow_rejected():
    message = str(rejection(b'{"input_text": "a", "method_args": {"abs": 1e400}}'))

    assert "abs" in message, f"message does not name the argument: {message}"


def test_duplicate_key_rejected():
    message = str(rejection(b'{"input_text": "a", "n_steps": 5, "n_steps": 50}'))

    assert "'n_steps'" in message, f"message does not name the duplicate key: {message}"


def test_model_newline_rejected():
    message = str(rejection(with_fields(model="gpt2\n")))

    assert "'model'" in message, f"message does not name the field: {message}"


def test_label_key_newline_rejected():
    message = str(rejection(with_fields(labels={"team\n": "nlp"})))

    assert "label key" in message, f"message does not name the label key: {message}"


def test_arg_name_newline_one_line():
    message = str(rejection(with_fields(method_args={"baselines\n": {"a": 1}})))

    assert "\n" not in message, f"message spans several lines: {message!r}"


# --- property-based tests ----------------------------------------------------------

FIELD_NAMES = sorted(JobSpec.model_fields)

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
spec_like_objects = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=12), json_values, max_size=8)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_raise_spec_error(body):
    try:
        parse_spec(body, POLICY)
    except SpecError as error:
        assert "\n" not in str(error), f"message spans several lines: {error}"


@PROPERTY_SETTINGS
@given(json_values)
def test_any_json_raises_spec_error(value):
    try:
        parse_spec(encode(value), POLICY)
    except SpecError as error:
        assert "\n" not in str(error), f"message spans several lines: {error}"


@PROPERTY_SETTINGS
@given(spec_like_objects)
def test_spec_like_json_raises_spec_error(value):
    try:
        parse_spec(encode(value), POLICY)
    except SpecError as error:
        assert str(error).startswith("Invalid spec: "), f"message lacks the common prefix: {error}"


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
hub_names = st.builds(lambda first, rest: first + rest, st.sampled_from(LETTERS), st.text(LETTERS + "._-", max_size=20))
hub_ids = hub_names | st.builds(lambda org, name: f"{org}/{name}", hub_names, hub_names)
models = hub_ids | st.just(DEFAULT_MODEL) | st.just(f"s3://{BUCKET}/models/tiny/")
texts = st.text(min_size=1, max_size=40).filter(lambda text: text.strip() and "\x00" not in text)
label_keys = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.-]{0,20}\Z")
method_arg_names = st.from_regex(r"\A[a-z_][a-z0-9_]{0,15}\Z").filter(lambda name: name not in RESERVED_METHOD_ARGS and name not in ("n_steps", "internal_batch_size", "n_samples"))
plain_values = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(-1e6, 1e6, allow_nan=False) | st.text(max_size=10)


@st.composite
def generation_args(draw) -> dict:
    names = draw(st.lists(st.sampled_from(sorted(GENERATION_ARG_RANGES)), unique=True, max_size=4))
    args = {}
    for name in names:
        kind, low, high = GENERATION_ARG_RANGES[name]
        if kind is bool:
            args[name] = draw(st.booleans())
        elif kind is int:
            args[name] = draw(st.integers(int(low), int(high)))
        else:
            args[name] = draw(st.floats(low, high, allow_nan=False))
    return args


@st.composite
def valid_specs(draw) -> dict:
    spec = {"model": draw(models), "method": draw(st.sampled_from(INSEQ_METHODS))}

    source = draw(st.sampled_from(["input_text", "input_texts", "inputs_uri"]))
    if source == "input_text":
        spec["input_text"] = draw(texts)
    elif source == "input_texts":
        spec["input_texts"] = draw(st.lists(texts, min_size=1, max_size=4))
    else:
        spec["inputs_uri"] = f"s3://{BUCKET}/inputs/{draw(hub_names)}" + draw(st.sampled_from([".jsonl", ".csv", ".parquet"]))

    if source != "inputs_uri" and draw(st.booleans()):
        count = 1 if source == "input_text" else len(spec["input_texts"])
        spec["generated_texts"] = draw(st.lists(texts, min_size=count, max_size=count))

    if draw(st.booleans()):
        spec["step_scores"] = draw(st.lists(st.sampled_from(INSEQ_STEP_FUNCTIONS), unique=True, max_size=4))
    if draw(st.booleans()):
        spec["attributed_fn"] = draw(st.sampled_from(INSEQ_STEP_FUNCTIONS))
    if draw(st.booleans()):
        spec["attribute_target"] = draw(st.booleans())
    if draw(st.booleans()):
        start = draw(st.integers(0, 4095))
        spec["attr_pos_start"] = start
        spec["attr_pos_end"] = draw(st.integers(start + 1, 4096))

    if draw(st.booleans()):
        spec["method_args"] = draw(st.dictionaries(method_arg_names, plain_values | st.lists(plain_values, max_size=4), max_size=3))
        if draw(st.booleans()):
            spec["method_args"]["internal_batch_size"] = draw(st.integers(1, 1024))
    spec["generation_args"] = draw(generation_args())
    if draw(st.booleans()):
        spec["n_steps"] = draw(st.integers(1, 500))

    force_cpu = draw(st.none() | st.booleans())
    if force_cpu is not None:
        spec["force_cpu"] = force_cpu
    devices = ["auto", "cpu"] if force_cpu else ["auto", "cpu", "cuda"]
    spec["device"] = draw(st.sampled_from(devices))

    aggregator = draw(st.none() | st.sampled_from(INSEQ_AGGREGATORS) | st.lists(st.sampled_from(INSEQ_AGGREGATORS), min_size=1, max_size=3))
    flag = draw(st.sampled_from(["normalize", "rescale", None]))
    spec["aggregation"] = {"aggregator": aggregator, **({flag: draw(st.booleans())} if flag else {})}

    spec["batch_size"] = draw(st.integers(1, 64))
    spec["chunk_size"] = draw(st.integers(1, 1000))
    spec["outputs"] = draw(st.lists(st.sampled_from(OUTPUT_KINDS), min_size=1, max_size=4))
    spec["max_attempts"] = draw(st.integers(1, 10))
    spec["labels"] = draw(st.dictionaries(label_keys, st.text(max_size=30), max_size=5))
    return spec


@PROPERTY_SETTINGS
@given(valid_specs())
def test_valid_spec_parses(spec):
    try:
        parse_spec(encode(spec), POLICY)
    except SpecError as error:
        pytest.fail(f"valid spec rejected: {error}")


@PROPERTY_SETTINGS
@given(valid_specs())
def test_normalized_spec_is_stable(spec):
    first = parse_spec(encode(spec), POLICY).normalized()
    second = parse_spec(stored_form(first), POLICY).normalized()

    assert second == first, "normalized spec changed when parsed again"


def test_top_level_generation_arg_points_to_generation_args():
    with pytest.raises(SpecError) as raised:
        parse_spec(b'{"input_text": "a", "max_new_tokens": 3}', SpecPolicy())

    assert "unknown field 'max_new_tokens'" in str(raised.value)
    assert "inside 'generation_args'" in str(raised.value), str(raised.value)
