"""A job's input texts: inline in the spec or read from an `inputs_uri` object.

An inputs object is JSONL, CSV or Parquet in the job's bucket, with one input per row
in a column named `text` (or `input_text`) and, for forced decoding, an optional
`generated_text` column.
"""

import csv
import io
import json
from dataclasses import dataclass

from pipeline.errors import ObjectNotFoundError, SpecError
from pipeline.spec import MAX_TEXT_CHARS, MAX_URI_INPUTS, JobSpec
from pipeline.store import ObjectStore

MAX_INPUTS_OBJECT_BYTES = 256 * 1024 * 1024
TEXT_COLUMNS = ("text", "input_text")


@dataclass(frozen=True)
class JobInputs:
    """Input texts with their forced generated texts, if any, and the ETag of the object they came from."""

    texts: list[str]
    generated_texts: list[str] | None
    source_etag: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def slice(self, start: int, end: int) -> "JobInputs":
        generated = self.generated_texts[start:end] if self.generated_texts is not None else None
        return JobInputs(self.texts[start:end], generated, self.source_etag)


def load_inputs(spec: JobSpec, store: ObjectStore) -> JobInputs:
    """Return the job's inputs, reading `inputs_uri` from the store when set."""
    if spec.inputs_uri is None:
        return JobInputs(spec.texts(), list(spec.generated_texts) if spec.generated_texts else None)

    key = spec.inputs_uri.removeprefix("s3://").split("/", 1)[1]
    head = store.head(key)
    if head is None:
        raise SpecError(f"Invalid spec: field 'inputs_uri' points to {spec.inputs_uri}, which does not exist; upload it first", field="inputs_uri")
    if head.size > MAX_INPUTS_OBJECT_BYTES:
        raise SpecError(f"Invalid spec: field 'inputs_uri' object is {head.size} bytes; at most {MAX_INPUTS_OBJECT_BYTES} are allowed", field="inputs_uri")

    try:
        stored = store.get(key)
    except ObjectNotFoundError as exc:
        raise SpecError(f"Invalid spec: field 'inputs_uri' points to {spec.inputs_uri}, which was deleted", field="inputs_uri") from exc

    rows = _read_rows(key, stored.body)
    inputs = _rows_to_inputs(spec.inputs_uri, rows)
    return JobInputs(inputs.texts, inputs.generated_texts, stored.etag)


def _read_rows(key: str, body: bytes) -> list[dict]:
    try:
        if key.endswith(".jsonl"):
            return [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if key.endswith(".csv"):
            return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(body)).to_pylist()
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise SpecError(f"Invalid spec: field 'inputs_uri' object {key!r} could not be parsed: {exc}; check its format") from exc


def _rows_to_inputs(uri: str, rows: list[dict]) -> JobInputs:
    if not rows:
        raise SpecError(f"Invalid spec: field 'inputs_uri' object {uri} has no rows; add at least one input", field="inputs_uri")
    if len(rows) > MAX_URI_INPUTS:
        raise SpecError(f"Invalid spec: field 'inputs_uri' object {uri} has {len(rows)} rows; at most {MAX_URI_INPUTS} are allowed", field="inputs_uri")

    texts, generated = [], []
    for number, row in enumerate(rows, start=1):
        text = _text_of(row, uri, number)
        texts.append(text)
        generated.append(row.get("generated_text") if isinstance(row, dict) else None)

    has_generated = [value is not None and value != "" for value in generated]
    if any(has_generated) and not all(has_generated):
        raise SpecError(f"Invalid spec: field 'inputs_uri' object {uri} sets generated_text on some rows only; set it on all or none", field="inputs_uri")
    return JobInputs(texts, [str(value) for value in generated] if all(has_generated) else None)


def _text_of(row, uri: str, number: int) -> str:
    if not isinstance(row, dict):
        raise SpecError(f"Invalid spec: field 'inputs_uri' row {number} of {uri} is not an object; write one {{\"text\": ...}} per line", field="inputs_uri")
    text = next((row[column] for column in TEXT_COLUMNS if column in row), None)
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"Invalid spec: field 'inputs_uri' row {number} of {uri} has no non-empty 'text' column", field="inputs_uri")
    if "\x00" in text:
        raise SpecError(f"Invalid spec: field 'inputs_uri' row {number} of {uri} contains a NUL character; remove it", field="inputs_uri")
    if len(text) > MAX_TEXT_CHARS:
        raise SpecError(f"Invalid spec: field 'inputs_uri' row {number} of {uri} is {len(text)} characters long; at most {MAX_TEXT_CHARS} are allowed", field="inputs_uri")
    return text
