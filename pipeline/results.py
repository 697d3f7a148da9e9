"""Writing a job's results to the bucket, chunk by chunk, and committing them.

Each chunk writes its Parquet parts, then its aggregated Inseq output, then a small
marker; the marker's presence means the chunk is done, so a resumed job skips it.
Part names are deterministic, so a chunk redone by another worker overwrites identical
rows instead of adding duplicates. `summary.json` is written last with
`If-None-Match: *`: its presence commits the job, and only one writer can create it.
"""

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PreconditionFailedError
from pipeline.layout import TABLES, BucketLayout
from pipeline.store import ObjectStore
from pipeline.tables import SCHEMA_VERSION, ChunkTables, to_parquet_bytes

log = logging.getLogger(__name__)

MAX_REPORT_SEQUENCES = 50


@dataclass(frozen=True)
class ChunkRecord:
    """A finished chunk's row counts and timing, read back from its marker."""

    index: int
    rows: dict
    seconds: float
    first_sequence: int
    sequences: int


class ResultWriter:
    """Writes one job's chunks and final files."""

    def __init__(self, store: ObjectStore, layout: BucketLayout, job_id: str):
        self.store = store
        self.layout = layout
        self.job_id = job_id
        # Aggregated outputs of the chunks written by this writer, so the final merge
        # reads back from the bucket only chunks that an earlier attempt wrote.
        self._written_outputs: dict[int, object] = {}

    def finished_chunks(self) -> dict[int, ChunkRecord]:
        """Return the chunks whose markers exist, by index."""
        records = {}
        for info in self.store.list(self.layout.chunks_prefix(self.job_id)):
            if info.key.endswith(".done.json"):
                data = self.store.get(info.key).json()
                records[data["index"]] = ChunkRecord(data["index"], data["rows"], data["seconds"], data["first_sequence"], data["sequences"])
        return records

    def write_chunk(self, index: int, first_sequence: int, tables: ChunkTables, aggregated, seconds: float, outputs: list[str]) -> ChunkRecord:
        """Persist one chunk: table parts, Inseq output, then the marker that records it as done."""
        rows = {}
        uploads = []
        if "tables" in outputs:
            for name, table in tables.by_name().items():
                uploads.append((self.layout.table_part_key(name, self.job_id, index), to_parquet_bytes(table), "application/vnd.apache.parquet"))
                rows[name] = table.num_rows
        uploads.append((self._inseq_chunk_key(index), _inseq_json_gz(aggregated), "application/gzip"))

        # The parts are independent, so they go up together. The marker goes last,
        # because its presence means that every part of the chunk is in the bucket.
        self.store.put_many(uploads)
        self._written_outputs[index] = aggregated

        record = ChunkRecord(index, rows, seconds, first_sequence, tables.sequences.num_rows)
        marker = {"index": index, "rows": rows, "seconds": seconds, "first_sequence": first_sequence, "sequences": record.sequences}
        self.store.put_json(self._marker_key(index), marker)
        return record

    def write_final_outputs(self, chunk_count: int, outputs: list[str]) -> dict:
        """Merge the chunks' Inseq outputs into the job's JSON and HTML report."""
        import inseq

        chunks = [self._chunk_output(index) for index in range(chunk_count)]
        merged = chunks[0] if len(chunks) == 1 else inseq.merge_attributions(chunks)
        uploads = []
        if "json" in outputs:
            uploads.append((self.layout.inseq_json_key(self.job_id), _inseq_json_gz(merged), "application/gzip"))
        if "html" in outputs:
            uploads.append((self.layout.report_key(self.job_id), render_report(merged).encode(), "text/html; charset=utf-8"))

        self.store.put_many(uploads)
        return {key: len(body) for key, body, _ in uploads}

    def commit(self, summary: dict) -> bool:
        """Write summary.json only if absent; return False when another writer committed first."""
        try:
            self.store.put_json(self.layout.summary_key(self.job_id), summary, if_none_match=True)
        except PreconditionFailedError:
            log.warning("job already committed by another writer", extra={"job_id": self.job_id})
            return False
        return True

    def table_keys(self, chunks: dict[int, ChunkRecord]) -> dict[str, list[str]]:
        """Return each table's part keys, known from the chunk records without listing the bucket."""
        keys = {name: [] for name in TABLES}
        for index in sorted(chunks):
            for name in chunks[index].rows:
                keys[name].append(self.layout.table_part_key(name, self.job_id, index))
        return keys

    def _marker_key(self, index: int) -> str:
        return f"{self.layout.chunks_prefix(self.job_id)}{index:05d}.done.json"

    def _inseq_chunk_key(self, index: int) -> str:
        return self.layout.chunk_key(self.job_id, index)

    def _chunk_output(self, index: int):
        if index in self._written_outputs:
            return self._written_outputs[index]
        return self._read_inseq_chunk(index)

    def _read_inseq_chunk(self, index: int):
        import inseq

        body = self.store.get(self._inseq_chunk_key(index)).body
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "chunk.json.gz"
            path.write_bytes(body)
            return inseq.FeatureAttributionOutput.load(str(path), decompress=True)


def render_report(output) -> str:
    """Render Inseq's HTML heatmap, capped to keep the page usable for big jobs."""
    shown = output
    if len(output.sequence_attributions) > MAX_REPORT_SEQUENCES:
        import copy

        shown = copy.copy(output)
        shown.sequence_attributions = output.sequence_attributions[:MAX_REPORT_SEQUENCES]
    html = shown.show(display=False, return_html=True, do_aggregation=False)
    if shown is not output:
        note = f"<p>Showing the first {MAX_REPORT_SEQUENCES} of {len(output.sequence_attributions)} sequences; the Parquet tables hold all of them.</p>"
        html = note + html
    return html


def _inseq_json_gz(output) -> bytes:
    """Serialize with Inseq's own compressed `save`, which `FeatureAttributionOutput.load` reads back."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "output.json.gz"
        output.save(str(path), overwrite=True, compress=True)
        return path.read_bytes()


def build_summary(job_id: str, record: dict, spec: dict, chunks: dict[int, ChunkRecord], files: dict, timings: dict, versions: dict) -> dict:
    """Build the manifest that commits a job."""
    rows = {name: sum(chunk.rows.get(name, 0) for chunk in chunks.values()) for name in TABLES}
    return {
        "job_id": job_id,
        "schema_version": SCHEMA_VERSION,
        "model": spec["model"],
        "method": spec["method"],
        "sequences": sum(chunk.sequences for chunk in chunks.values()),
        "chunks": len(chunks),
        "rows": rows,
        "files": files,
        "attempt": record["attempt"],
        "worker_id": record.get("worker_id"),
        "timings": timings,
        "versions": versions,
        "labels": spec.get("labels", {}),
    }


def json_dumps(data: dict) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False).encode()
