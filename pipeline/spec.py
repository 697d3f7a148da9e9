"""The job spec: what a user drops into the inbox, validated and normalized.

A spec is accepted in two forms: the earlier Token Visualization API's request body
(`model`, `method`, `input_text`, `step_scores`, `force_cpu`, `n_steps`) and the fuller
form documented in docs/spec.md. Both normalize to one shape, which is stored as
`jobs/<job_id>/spec.json`. Every rejection is a `SpecError` whose one-line message names
the field, the value and the allowed range.
"""

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import registries
from pipeline.errors import SpecError

SPEC_VERSION = 1
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_METHOD = "input_x_gradient"
MAX_SPEC_BYTES = 1_048_576
MAX_TEXT_CHARS = 20_000
MAX_INLINE_INPUTS = 1_000
MAX_URI_INPUTS = 100_000
MAX_JSON_DEPTH = 8
MAX_LABELS = 32
OUTPUT_KINDS = ("tables", "json", "html")

HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
LABEL_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
ARG_NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,63}")

# Keyword arguments of `AttributionModel.attribute` that tokviz sets itself, so
# `method_args` may not override them.
RESERVED_METHOD_ARGS = frozenset(
    {
        "input_texts", "generated_texts", "method", "override_default_attribution", "attr_pos_start",
        "attr_pos_end", "show_progress", "pretty_progress", "output_step_attributions",
        "attribute_target", "step_scores", "include_eos_baseline", "attributed_fn",
        "device", "batch_size", "generate_from_target_prefix", "generation_args",
        "skip_special_tokens", "clean_special_chars",
    }
)

# Range-checked `method_args`; other names pass through to Inseq, which rejects unknown ones.
METHOD_ARG_RANGES = {"n_steps": (1, 500), "internal_batch_size": (1, 1024), "n_samples": (1, 1000)}

GENERATION_ARG_RANGES: dict[str, tuple[type, float, float]] = {
    "max_new_tokens": (int, 1, 512),
    "min_new_tokens": (int, 0, 512),
    "do_sample": (bool, 0, 1),
    "temperature": (float, 0.01, 10.0),
    "top_k": (int, 1, 1000),
    "top_p": (float, 0.01, 1.0),
    "repetition_penalty": (float, 0.5, 10.0),
    "no_repeat_ngram_size": (int, 0, 16),
}
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass(frozen=True)
class SpecPolicy:
    """What the accepting worker allows beyond the spec's own limits."""

    bucket: str | None = None
    allow_local_models: bool = False
    model_allowlist: tuple[str, ...] = ()
    max_inputs: int = MAX_INLINE_INPUTS
    extra: dict = field(default_factory=dict)


class Aggregation(BaseModel):
    """How Inseq's raw scores are reduced to one score per token pair."""

    model_config = ConfigDict(extra="forbid", strict=True)

    aggregator: str | list[str] | None = None
    normalize: bool | None = None
    rescale: bool | None = None

    @field_validator("aggregator")
    @classmethod
    def _known_aggregators(cls, value):
        names = [value] if isinstance(value, str) else value or []
        known = registries.aggregators()
        for name in names:
            if name not in known:
                raise ValueError(f"unknown aggregator {name!r}; use one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _normalize_or_rescale(self):
        if self.normalize and self.rescale:
            raise ValueError("set at most one of normalize and rescale to true")
        return self


class JobSpec(BaseModel):
    """A validated job spec. Build it with `parse_spec`, not directly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    spec_version: Literal[1] = SPEC_VERSION
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=1024)
    method: str = DEFAULT_METHOD
    input_text: str | None = None
    input_texts: list[str] | None = None
    inputs_uri: str | None = None
    generated_texts: list[str] | None = None
    step_scores: list[str] = Field(default_factory=list, max_length=16)
    attribute_target: bool = False
    attributed_fn: str | None = None
    attr_pos_start: int | None = Field(default=None, ge=0, le=4096)
    attr_pos_end: int | None = Field(default=None, ge=1, le=4096)
    method_args: dict[str, Any] = Field(default_factory=dict)
    generation_args: dict[str, Any] = Field(default_factory=dict)
    n_steps: int | None = Field(default=None, ge=1, le=500)
    force_cpu: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    aggregation: Aggregation = Field(default_factory=Aggregation)
    batch_size: int = Field(default=1, ge=1, le=64)
    chunk_size: int = Field(default=32, ge=1, le=1000)
    outputs: list[Literal["tables", "json", "html"]] = Field(default_factory=lambda: list(OUTPUT_KINDS))
    max_attempts: int = Field(default=3, ge=1, le=10)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value):
        known = registries.attribution_methods()
        if value not in known:
            raise ValueError(f"unknown attribution method; use one of {', '.join(known)}")
        return value

    @field_validator("step_scores")
    @classmethod
    def _known_step_scores(cls, value):
        known = registries.step_functions()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown step score {name!r}; use any of {', '.join(known)}")
        if len(set(value)) != len(value):
            raise ValueError("list each step score once")
        return value

    @field_validator("attributed_fn")
    @classmethod
    def _known_attributed_fn(cls, value):
        known = registries.step_functions()
        if value is not None and value not in known:
            raise ValueError(f"unknown step function; use one of {', '.join(known)}")
        return value

    @field_validator("input_text")
    @classmethod
    def _check_text(cls, value):
        if value is not None:
            _check_one_text(value)
        return value

    @field_validator("input_texts", "generated_texts")
    @classmethod
    def _check_texts(cls, value):
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one text")
        if len(value) > MAX_INLINE_INPUTS:
            raise ValueError(f"{len(value)} texts given; at most {MAX_INLINE_INPUTS} fit in a spec, use inputs_uri for more")
        for text in value:
            _check_one_text(text)
        return value

    @field_validator("inputs_uri")
    @classmethod
    def _check_inputs_uri(cls, value):
        if value is None:
            return value
        if not value.startswith("s3://") or not value.endswith((".jsonl", ".csv", ".parquet")):
            raise ValueError("must be s3://BUCKET/KEY ending in .jsonl, .csv or .parquet")
        if ".." in value.split("/"):
            raise ValueError("must not contain '..' path segments")
        return value

    @field_validator("method_args")
    @classmethod
    def _check_method_args(cls, value):
        for name, arg in value.items():
            _check_arg_name(name)
            if name in RESERVED_METHOD_ARGS:
                raise ValueError(f"{name!r} is set by tokviz; use the top-level spec field instead")
            if name in METHOD_ARG_RANGES:
                low, high = METHOD_ARG_RANGES[name]
                _check_number(name, arg, int, low, high)
            _check_plain_value(name, arg)
        return value

    @field_validator("generation_args")
    @classmethod
    def _check_generation_args(cls, value):
        for name, arg in value.items():
            if name not in GENERATION_ARG_RANGES:
                raise ValueError(f"unsupported generation argument {name!r}; use any of {', '.join(GENERATION_ARG_RANGES)}")
            kind, low, high = GENERATION_ARG_RANGES[name]
            _check_number(name, arg, kind, low, high)
        return value

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, value):
        if not value:
            raise ValueError(f"name at least one of {', '.join(OUTPUT_KINDS)}")
        return sorted(set(value), key=OUTPUT_KINDS.index)

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value):
        if len(value) > MAX_LABELS:
            raise ValueError(f"{len(value)} labels given; at most {MAX_LABELS} are allowed")
        for key, label in value.items():
            if not LABEL_KEY_PATTERN.fullmatch(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_PATTERN.pattern}")
            if len(label) > 256:
                raise ValueError(f"label {key!r} is {len(label)} characters long; at most 256 are allowed")
        return value

    @model_validator(mode="after")
    def _check_combinations(self):
        sources = [name for name in ("input_text", "input_texts", "inputs_uri") if getattr(self, name) is not None]
        if len(sources) != 1:
            given = ", ".join(sources) or "none"
            raise ValueError(f"give exactly one of input_text, input_texts or inputs_uri (given: {given})")
        if self.generated_texts is not None:
            if self.inputs_uri is not None:
                raise ValueError("generated_texts cannot be combined with inputs_uri; put a generated_text column in the inputs file")
            if len(self.generated_texts) != len(self.texts()):
                raise ValueError(f"generated_texts has {len(self.generated_texts)} texts for {len(self.texts())} inputs; give one per input")
        if self.attr_pos_start is not None and self.attr_pos_end is not None and self.attr_pos_end <= self.attr_pos_start:
            raise ValueError(f"attr_pos_end ({self.attr_pos_end}) must be greater than attr_pos_start ({self.attr_pos_start})")
        if self.force_cpu and self.device == "cuda":
            raise ValueError("force_cpu is true but device is 'cuda'; set only one of them")
        return self

    def texts(self) -> list[str]:
        """Return the inline input texts (empty when the inputs come from `inputs_uri`)."""
        if self.input_text is not None:
            return [self.input_text]
        return list(self.input_texts or [])

    def normalized(self) -> dict:
        """Return the canonical form stored as spec.json: legacy fields folded in."""
        data = self.model_dump(mode="json")
        data["input_texts"] = self.texts() if self.inputs_uri is None else None
        data["input_text"] = None
        if self.force_cpu:
            data["device"] = "cpu"
        data["force_cpu"] = None
        data["generation_args"] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **self.generation_args}
        return {key: value for key, value in data.items() if value is not None}


def parse_spec(body: bytes, policy: SpecPolicy | None = None) -> JobSpec:
    """Parse and validate a raw inbox body, raising `SpecError` with a one-line reason."""
    policy = policy or SpecPolicy()
    data = decode_body(body)

    spec = validate_spec(data)

    check_policy(spec, policy)
    return spec


def decode_body(body: bytes) -> dict:
    """Decode the raw body into a JSON object, rejecting what no JSON parser should guess at."""
    if len(body) == 0:
        raise SpecError("Invalid spec: the body is empty; drop a JSON object such as {\"input_text\": \"Hello\"}")
    if len(body) > MAX_SPEC_BYTES:
        raise SpecError(f"Invalid spec: the body is {len(body)} bytes; at most {MAX_SPEC_BYTES} are allowed, use inputs_uri for many inputs")
    if body.startswith(b"\xef\xbb\xbf"):
        raise SpecError("Invalid spec: the body starts with a UTF-8 byte-order mark; save the file as UTF-8 without BOM")

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"Invalid spec: the body is not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from exc

    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise SpecError(f"Invalid spec: the JSON is nested too deeply; at most {MAX_JSON_DEPTH} levels are allowed") from exc
    except ValueError as exc:
        raise SpecError(f"Invalid spec: the body is not valid JSON ({exc}); check the syntax") from exc

    if not isinstance(data, dict):
        raise SpecError(f"Invalid spec: the body is a JSON {_json_type(data)}, not an object; wrap the fields in {{...}}")
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise SpecError(f"Invalid spec: the JSON is nested more than {MAX_JSON_DEPTH} levels deep; flatten the values")
    for key, value in data.items():
        if _has_surrogate(key) or _has_surrogate(value):
            raise SpecError(
                f"Invalid spec: field {_short(key)} holds an unpaired UTF-16 surrogate escape (U+D800 to U+DFFF); write the character as UTF-8",
                field=key,
            )
    return data


def validate_spec(data: dict) -> JobSpec:
    """Validate a decoded spec object, turning pydantic's report into one line."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_one_line(exc), field=_error_field(exc)) from exc


def check_policy(spec: JobSpec, policy: SpecPolicy) -> None:
    """Apply the worker's rules: model allowlist, local paths, bucket, input count."""
    check_model_allowed(spec.model, policy)

    if spec.inputs_uri is not None and policy.bucket is not None:
        bucket = spec.inputs_uri.removeprefix("s3://").split("/", 1)[0]
        if bucket != policy.bucket:
            raise SpecError(
                f"Invalid spec: field 'inputs_uri' points to bucket {bucket!r}; inputs must live in the job's bucket {policy.bucket!r}",
                field="inputs_uri",
            )

    if len(spec.texts()) > policy.max_inputs:
        raise SpecError(
            f"Invalid spec: field 'input_texts' has {len(spec.texts())} texts; this worker accepts at most {policy.max_inputs}",
            field="input_texts",
        )


def check_model_allowed(model: str, policy: SpecPolicy) -> None:
    """Reject model names this worker may not load, before anything is downloaded."""
    if policy.model_allowlist and not any(fnmatch.fnmatchcase(model, pattern) for pattern in policy.model_allowlist):
        raise SpecError(
            f"Invalid spec: field 'model' is {model!r}, which this worker's allowlist does not include; "
            f"use one of {', '.join(policy.model_allowlist)}",
            field="model",
        )

    if model == DEFAULT_MODEL or model.startswith("s3://"):
        return
    if is_local_model_path(model):
        if not policy.allow_local_models:
            raise SpecError(
                f"Invalid spec: field 'model' is the local path {model!r}, and this worker does not allow local paths; "
                "use a hub id or the bundled model, or start the worker with --allow-local-models",
                field="model",
            )
        return
    if not HUB_ID_PATTERN.fullmatch(model):
        raise SpecError(
            f"Invalid spec: field 'model' is {model!r}, which is not a hub id (ORG/NAME), an s3:// prefix "
            f"or {DEFAULT_MODEL!r}; local paths and .gguf files need a worker started with --allow-local-models",
            field="model",
        )


def is_local_model_path(model: str) -> bool:
    """Tell whether a model name points into the worker's file system."""
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or "\\" in model


def _check_one_text(text: str) -> None:
    if not text.strip():
        raise ValueError("texts must not be empty or only whitespace")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"a text is {len(text)} characters long; at most {MAX_TEXT_CHARS} are allowed")
    if "\x00" in text:
        raise ValueError("texts must not contain NUL characters")


def _check_arg_name(name: str) -> None:
    if not ARG_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"argument name {name!r} must be a lowercase Python identifier")


def _check_number(name: str, value: Any, kind: type, low: float, high: float) -> None:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return
    allowed = (int, float) if kind is float else (int,)
    noun = "a number" if kind is float else "an integer"
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{name} must be {noun} between {low} and {high}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} is {value}; allowed range is {low} to {high}")


def _check_plain_value(name: str, value: Any) -> None:
    scalars = (str, int, float, bool, type(None))
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
        raise ValueError(f"{name!r} is too large to be a finite number; use a smaller value")
    if isinstance(value, scalars):
        return
    if isinstance(value, list) and all(isinstance(item, scalars) for item in value) and len(value) <= 64:
        return
    raise ValueError(f"{name!r} must be a number, string, boolean or a short list of them")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    data = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {key!r} in one object; keep one of them")
        data[key] = value
    return data


def _deeper_than(value: Any, limit: int) -> bool:
    """Tell whether containers nest more than `limit` levels, without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def _has_surrogate(value: Any) -> bool:
    """Tell whether any key or string value contains a lone surrogate, which UTF-8 cannot encode."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if any("\ud800" <= char <= "\udfff" for char in item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {"str": "string", "list": "array"}.get(type(value).__name__, type(value).__name__)


def _error_field(exc: ValidationError) -> str | None:
    errors = exc.errors()
    if not errors:
        return None
    return ".".join(str(part) for part in errors[0]["loc"]) or None


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    value = _short(error.get("input"))
    extra = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""

    bounds = _field_bounds(location) if error["type"] in ("greater_than_equal", "less_than_equal") else None
    if bounds is not None:
        message = f"allowed range is {bounds[0]} to {bounds[1]}"
    if error["type"] == "extra_forbidden" and location in GENERATION_ARG_RANGES:
        return f"Invalid spec: unknown field {location!r}; generation settings go inside 'generation_args', e.g. {{\"generation_args\": {{\"{location}\": ...}}}}{extra}"
    if error["type"] == "extra_forbidden":
        return f"Invalid spec: unknown field {location!r}; remove it or check its spelling (see docs/spec.md){extra}"
    if not location:
        return f"Invalid spec: {message}{extra}"
    return f"Invalid spec: field {location!r} is {value}: {message}{extra}"


def _field_bounds(location: str) -> tuple[Any, Any] | None:
    """Return a top-level field's (ge, le) bounds, or None when it has no full range."""
    info = JobSpec.model_fields.get(location)
    if info is None:
        return None
    low = next((item.ge for item in info.metadata if getattr(item, "ge", None) is not None), None)
    high = next((item.le for item in info.metadata if getattr(item, "le", None) is not None), None)
    return None if low is None or high is None else (low, high)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
