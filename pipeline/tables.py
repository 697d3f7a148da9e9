"""The three Parquet tables built from an aggregated Inseq output.

Tables are long and tidy (docs/tables.md). `job_id` is the Hive partition column: it
lives in the directory name (`job_id=<id>/`) and not inside the files, because
`pd.read_parquet` on the table folder fails with an ArrowTypeError when the files and
the partition paths both define the column (string in the files, dictionary in paths).
"""

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tokens import readable_tokens

SCHEMA_VERSION = "1"
METADATA_VERSION_KEY = b"tokviz.schema_version"
METADATA_TABLE_KEY = b"tokviz.table"


@dataclass(frozen=True)
class TableContext:
    """Per-job values copied into every row."""

    model: str
    method: str
    labels: dict
    step_scores: tuple[str, ...]

    @property
    def labels_json(self) -> str:
        return json.dumps(self.labels, sort_keys=True, ensure_ascii=False)


ATTRIBUTIONS_SCHEMA = pa.schema(
    [
        ("sequence_idx", pa.int32()),
        ("target_idx", pa.int32()),
        ("target_token", pa.string()),
        ("target_token_id", pa.int64()),
        ("side", pa.string()),
        ("input_idx", pa.int32()),
        ("input_token", pa.string()),
        ("input_token_id", pa.int64()),
        ("score", pa.float32()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("labels", pa.string()),
    ]
)

SEQUENCES_SCHEMA = pa.schema(
    [
        ("sequence_idx", pa.int32()),
        ("input_text", pa.string()),
        ("generated_text", pa.string()),
        ("source_token_count", pa.int32()),
        ("target_token_count", pa.int32()),
        ("generated_token_count", pa.int32()),
        ("attr_pos_start", pa.int32()),
        ("attr_pos_end", pa.int32()),
        ("chunk", pa.int32()),
        ("attribution_seconds", pa.float64()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("labels", pa.string()),
    ]
)


def step_scores_schema(names: tuple[str, ...]) -> pa.Schema:
    """Return the step_scores schema: token columns then one float32 column per score."""
    fields = [
        ("sequence_idx", pa.int32()),
        ("target_idx", pa.int32()),
        ("target_token", pa.string()),
        ("target_token_id", pa.int64()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("labels", pa.string()),
    ]
    return pa.schema(fields + [(name, pa.float32()) for name in names])


@dataclass
class ChunkTables:
    """The rows one chunk of inputs contributes to each table."""

    attributions: pa.Table
    step_scores: pa.Table
    sequences: pa.Table

    def by_name(self) -> dict[str, pa.Table]:
        return {"attributions": self.attributions, "step_scores": self.step_scores, "sequences": self.sequences}


def build_chunk_tables(aggregated, tokenizer, context: TableContext, first_sequence: int, chunk: int, input_texts: list[str], seconds: float) -> ChunkTables:
    """Turn one chunk's aggregated output into table rows, numbering sequences from `first_sequence`."""
    attribution_parts, step_parts, sequence_rows = [], [], []
    per_sequence_seconds = seconds / max(len(aggregated.sequence_attributions), 1)

    for offset, sequence in enumerate(aggregated.sequence_attributions):
        sequence_idx = first_sequence + offset
        tokens = _SequenceTokens.of(sequence, tokenizer)

        attribution_parts.append(_attribution_columns(sequence, tokens, sequence_idx))
        step_parts.append(_step_columns(sequence, tokens, sequence_idx, context.step_scores))
        sequence_rows.append(_sequence_row(sequence, tokens, sequence_idx, input_texts[offset], chunk, per_sequence_seconds))

    return ChunkTables(
        attributions=_finish(_concat(attribution_parts), ATTRIBUTIONS_SCHEMA, context, "attributions"),
        step_scores=_finish(_concat(step_parts), step_scores_schema(context.step_scores), context, "step_scores"),
        sequences=_finish(_rows_to_columns(sequence_rows), SEQUENCES_SCHEMA, context, "sequences"),
    )


def to_parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a table to Parquet in memory (zstd, statistics on)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@dataclass
class _SequenceTokens:
    source_text: list[str]
    source_ids: list[int]
    target_text: list[str]
    target_ids: list[int]
    generated_text: str

    @classmethod
    def of(cls, sequence, tokenizer) -> "_SequenceTokens":
        source = sequence.source or []
        return cls(
            source_text=readable_tokens(tokenizer, [token.token for token in source]),
            source_ids=[int(token.id) for token in source],
            target_text=readable_tokens(tokenizer, [token.token for token in sequence.target]),
            target_ids=[int(token.id) for token in sequence.target],
            generated_text=tokenizer.convert_tokens_to_string(
                [token.token for token in sequence.target[sequence.attr_pos_start : sequence.attr_pos_end]]
            ),
        )


def _attribution_columns(sequence, tokens: _SequenceTokens, sequence_idx: int) -> dict:
    start = sequence.attr_pos_start
    parts = []
    if sequence.source_attributions is not None:
        parts.append(_side_columns(sequence.source_attributions, "source", tokens.source_text, tokens.source_ids, start))
    if sequence.target_attributions is not None:
        parts.append(_side_columns(sequence.target_attributions, "target", tokens.target_text, tokens.target_ids, start))
    columns = _concat(parts)

    target_idx = columns["target_idx"]
    columns["sequence_idx"] = np.full(len(target_idx), sequence_idx, dtype=np.int32)
    columns["target_token"] = [tokens.target_text[index] for index in target_idx]
    columns["target_token_id"] = np.asarray([tokens.target_ids[index] for index in target_idx], dtype=np.int64)
    return columns


def _side_columns(scores, side: str, texts: list[str], ids: list[int], start: int) -> dict:
    """Flatten a (tokens x steps) score matrix to rows, dropping Inseq's NaN future cells."""
    matrix = scores.detach().float().cpu().numpy()
    input_idx, step = np.nonzero(~np.isnan(matrix))
    return {
        "target_idx": (start + step).astype(np.int32),
        "side": [side] * len(input_idx),
        "input_idx": input_idx.astype(np.int32),
        "input_token": [texts[index] for index in input_idx],
        "input_token_id": np.asarray([ids[index] for index in input_idx], dtype=np.int64),
        "score": matrix[input_idx, step].astype(np.float32),
    }


def _step_columns(sequence, tokens: _SequenceTokens, sequence_idx: int, names: tuple[str, ...]) -> dict:
    steps = np.arange(sequence.attr_pos_start, sequence.attr_pos_end, dtype=np.int32)
    columns = {
        "sequence_idx": np.full(len(steps), sequence_idx, dtype=np.int32),
        "target_idx": steps,
        "target_token": [tokens.target_text[index] for index in steps],
        "target_token_id": np.asarray([tokens.target_ids[index] for index in steps], dtype=np.int64),
    }
    for name in names:
        values = sequence.step_scores[name].detach().float().cpu().numpy().reshape(-1)
        columns[name] = values[: len(steps)].astype(np.float32)
    return columns


def _sequence_row(sequence, tokens: _SequenceTokens, sequence_idx: int, input_text: str, chunk: int, seconds: float) -> dict:
    start, end = sequence.attr_pos_start, sequence.attr_pos_end
    return {
        "sequence_idx": sequence_idx,
        "input_text": input_text,
        "generated_text": tokens.generated_text,
        "source_token_count": len(tokens.source_ids),
        "target_token_count": len(tokens.target_ids),
        "generated_token_count": end - start,
        "attr_pos_start": start,
        "attr_pos_end": end,
        "chunk": chunk,
        "attribution_seconds": seconds,
    }


def _concat(parts: list[dict]) -> dict:
    if not parts:
        return {}
    merged = {}
    for name in parts[0]:
        values = [part[name] for part in parts]
        merged[name] = np.concatenate(values) if isinstance(values[0], np.ndarray) else [item for value in values for item in value]
    return merged


def _rows_to_columns(rows: list[dict]) -> dict:
    if not rows:
        return {}
    return {name: [row[name] for row in rows] for name in rows[0]}


def _finish(columns: dict, schema: pa.Schema, context: TableContext, table_name: str) -> pa.Table:
    """Add per-job columns, order them by the schema and attach the version metadata."""
    count = len(next(iter(columns.values()))) if columns else 0
    columns = dict(columns)
    columns["model"] = [context.model] * count
    columns["method"] = [context.method] * count
    columns["labels"] = [context.labels_json] * count

    arrays = [pa.array(columns.get(field.name, [None] * count), type=field.type) for field in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table.replace_schema_metadata({METADATA_VERSION_KEY: SCHEMA_VERSION.encode(), METADATA_TABLE_KEY: table_name.encode()})
