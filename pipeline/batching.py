"""Running several small queued jobs in one Inseq call, where that leaves their results unchanged.

Inseq pads a batch of inputs to one length, which changes the scores of decoder-only
models. A batch here therefore only ever contains inputs of one token length, so the
inputs need no padding, and a job keeps its batched result only when its generated
target also needed no padding. The first batch of each batch key is also checked
against the same job run alone. A key that fails the check is never batched again by
this worker.
"""

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from pipeline.errors import TokvizError
from pipeline.models import LoadedModel, resolve_device
from pipeline.runner import ChunkAttribution, aggregate, attribute_inputs, attribute_kwargs
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)

# Spec fields that change the Inseq call, apart from the inputs. The other fields only
# act after it: `aggregation` is applied per job to its own slice of the output,
# `outputs` and `labels` shape what is written, `chunk_size` and `max_attempts` are
# bookkeeping, and `batch_size` is covered by `is_batchable`.
KEY_FIELDS = (
    "spec_version", "model", "device", "method", "method_args", "n_steps", "generation_args",
    "step_scores", "attribute_target", "attributed_fn", "attr_pos_start", "attr_pos_end",
)

# At most this many inputs go into one Inseq call and into one group of jobs, so that a
# batch holds the leases of its jobs for about as long as one chunk of a normal job.
MAX_BATCH_INPUTS = 64

# Tolerances of the equality check. Two score tensors are equal when no cell differs by
# more than ATOL + RTOL times the largest magnitude in the unbatched tensor. Batched
# float32 matrix products round differently from unbatched ones. For SmolLM2-135M
# (input_x_gradient, 6 new tokens, 8 inputs of one length, torch CPU), the raw scores
# differed by up to 2.5e-4 of that magnitude, so a cell-wise rtol of 1e-4 fails there.
RTOL = 1e-3
ATOL = 1e-6


@dataclass(frozen=True)
class BatchMember:
    """A queued job considered for a batch, with its validated spec (None when unreadable)."""

    job_id: str
    spec: JobSpec | None


@dataclass
class BatchResult:
    """Chunk results of the jobs that kept their batched result, by job id.

    `shared` lists the jobs with at least one input in a multi-input Inseq call. The
    other jobs were attributed one input per call, exactly as their own run does it.
    """

    chunks: dict[str, ChunkAttribution]
    shared: list[str]


def batch_key(spec: JobSpec) -> str:
    """Return the JSON text of everything in `spec` that changes the Inseq call, except the inputs."""
    normalized = spec.normalized()
    fields = {name: normalized.get(name) for name in KEY_FIELDS}
    fields["device"] = resolve_device(normalized["device"])
    return json.dumps(fields, sort_keys=True)


def is_batchable(spec: JobSpec) -> bool:
    """Tell whether a job may share Inseq calls with other jobs.

    The job must hold its inputs inline and in one chunk, and its own run must call Inseq
    with one input at a time, so a batch of same-length inputs reproduces it.
    """
    texts = spec.texts()
    if spec.inputs_uri is not None or spec.generated_texts is not None:
        # NOTE: forced generated_texts are left out to keep batches simple. Inseq 0.7.1
        # attributes decoder-only forced decoding one input at a time anyway.
        return False
    if len(texts) > min(spec.chunk_size, MAX_BATCH_INPUTS):
        return False
    if len(texts) > 1 and spec.batch_size > 1:
        return False

    # Sampling draws from one random stream for the whole batch, so no batched sample
    # equals the one the job would draw alone.
    return not spec.generation_args.get("do_sample", False)


def group_members(members: list[BatchMember], max_jobs: int, unbatchable_keys: set[str]) -> list[list[BatchMember]]:
    """Split queued jobs into run units: groups of batchable jobs sharing a batch key, and single jobs.

    Units keep queue order by their first job. A group contains at most `max_jobs` jobs and
    `MAX_BATCH_INPUTS` inputs. Jobs whose key is in `unbatchable_keys` run alone.
    """
    units: list[list[BatchMember]] = []
    open_groups: dict[str, list[BatchMember]] = {}

    for member in members:
        key = batch_key(member.spec) if member.spec is not None and is_batchable(member.spec) else None
        if key is None or key in unbatchable_keys:
            units.append([member])
            continue

        group = open_groups.get(key)
        if group is None or len(group) >= max_jobs or _input_count(group) + len(member.spec.texts()) > MAX_BATCH_INPUTS:
            group = []
            open_groups[key] = group
            units.append(group)
        group.append(member)
    return units


def attribute_batch(loaded: LoadedModel, members: list[BatchMember]) -> BatchResult:
    """Attribute the inputs of jobs sharing one batch key, in one Inseq call per token length.

    A job whose inputs landed in an Inseq call that raised, or whose generated target
    was padded, or whose aggregation raised, is left out of the result and runs alone.
    """
    spec = members[0].spec
    attribution_model = loaded.attribution_model(spec.method)
    inputs = [(position, index, text) for position, member in enumerate(members) for index, text in enumerate(member.spec.texts())]

    singles: dict[tuple[int, int], tuple[object, float]] = {}
    failed: set[int] = set()
    shared: set[int] = set()
    for call in _calls_by_token_length(attribution_model, inputs):
        positions = {position for position, _, _ in call}
        try:
            outputs = _attribute_call(attribution_model, spec, call)
        except Exception as exc:  # noqa: BLE001 - the jobs of a failed call run alone and report their own errors
            job_ids = sorted({members[position].job_id for position in positions})
            log.warning("batched Inseq call over %d inputs of jobs %s failed, so they run alone: %s: %s", len(call), job_ids, type(exc).__name__, exc)
            failed.update(positions)
            continue
        singles.update(outputs)
        if len(call) > 1:
            shared.update(positions)

    chunks = {}
    for position, member in enumerate(members):
        pieces = [singles.get((position, index)) for index in range(len(member.spec.texts()))]
        if position in failed:
            continue
        if any(piece is None for piece in pieces):
            log.info("a generated target of job %s was padded in a batched Inseq call, so the job runs alone", member.job_id, extra={"job_id": member.job_id})
            continue
        chunk = _job_chunk(member, pieces)
        if chunk is not None:
            chunks[member.job_id] = chunk
    return BatchResult(chunks, [members[position].job_id for position in sorted(shared) if members[position].job_id in chunks])


def compare_outputs(batched, alone) -> str | None:
    """Return None when two raw Inseq outputs match, else a one-line description of the first difference.

    Tokens and attributed positions must be equal. Scores must agree within `ATOL` plus
    `RTOL` times the largest magnitude of the unbatched tensor, with NaN in the same cells.
    """
    if len(batched.sequence_attributions) != len(alone.sequence_attributions):
        return f"{len(batched.sequence_attributions)} sequences batched, {len(alone.sequence_attributions)} alone"

    for number, (left, right) in enumerate(zip(batched.sequence_attributions, alone.sequence_attributions, strict=True)):
        difference = _compare_sequences(left, right)
        if difference is not None:
            return f"sequence {number}: {difference}"
    return None


class JobBatcher:
    """Computes batched chunk results, and keeps this worker's verdict on each batch key."""

    def __init__(self):
        self.verdicts: dict[str, bool] = {}

    def unbatchable_keys(self) -> set[str]:
        return {key for key, equal in self.verdicts.items() if not equal}

    def compute(self, loaded: LoadedModel, members: list[BatchMember]) -> dict[str, ChunkAttribution]:
        """Return the batched chunk results to use, checking a key against an unbatched run the first time."""
        key = batch_key(members[0].spec)
        if self.verdicts.get(key) is False:
            return {}

        result = attribute_batch(loaded, members)
        if key in self.verdicts or not result.shared:
            return result.chunks

        reference = next(member for member in members if member.job_id == result.shared[0])
        try:
            alone = attribute_inputs(loaded, reference.spec, reference.spec.texts(), None)
        except TokvizError as exc:
            # The job's own run reports this error; without a reference nothing is checked.
            log.warning("the unbatched check run of job %s failed, so its batch runs unbatched: %s", reference.job_id, exc, extra={"job_id": reference.job_id})
            return {}

        difference = compare_outputs(result.chunks[reference.job_id].raw, alone.raw)
        self.verdicts[key] = difference is None
        if difference is not None:
            log.warning("batched results differ from the unbatched run of job %s (%s), so jobs with this batch key now run alone: %s", reference.job_id, difference, key, extra={"job_id": reference.job_id})
            return {}

        # The unbatched result is the reference itself, so the checked job keeps it.
        result.chunks[reference.job_id] = alone
        return result.chunks


def _calls_by_token_length(attribution_model, inputs: list[tuple[int, int, str]]) -> list[list[tuple[int, int, str]]]:
    """Bucket inputs by their token count under Inseq's own encoding, at most `MAX_BATCH_INPUTS` per call."""
    buckets: dict[int, list] = defaultdict(list)
    for item in inputs:
        buckets[_token_count(attribution_model, [item[2]])].append(item)

    calls = []
    for length, bucket in buckets.items():
        for start in range(0, len(bucket), MAX_BATCH_INPUTS):
            calls.extend(_unpadded_calls(attribution_model, bucket[start : start + MAX_BATCH_INPUTS], length))
    return calls


def _unpadded_calls(attribution_model, bucket: list, length: int) -> list[list]:
    """Keep a bucket as one call only if encoding it together needs no padding either.

    Inseq 0.7.1 drops a doubled leading BOS token only when it encodes one text, so a
    text can have one length alone and another in a batch.
    """
    if len(bucket) == 1 or _token_count(attribution_model, [text for _, _, text in bucket]) == length:
        return [bucket]
    return [[item] for item in bucket]


def _token_count(attribution_model, texts: list[str]) -> int:
    return int(attribution_model.encode(texts, return_baseline=True).input_ids.shape[1])


def _attribute_call(attribution_model, spec: JobSpec, call: list) -> dict[tuple[int, int], tuple[object, float]]:
    """Run one Inseq call and split its output into one single-input output per unpadded input."""
    texts = [text for _, _, text in call]
    kwargs = attribute_kwargs(attribution_model, spec, texts, None)
    kwargs["batch_size"] = len(texts)

    started = time.perf_counter()
    output = attribution_model.attribute(**kwargs)
    # Each input is charged an even share of the call's time; Inseq reports no per-input time.
    share = (time.perf_counter() - started) / len(texts)

    target_lengths = [len(sequence.target) for sequence in output.sequence_attributions]
    split = {}
    for offset, (position, index, _) in enumerate(call):
        if target_lengths[offset] < max(target_lengths):
            # Inseq padded this target to the longest one, which changes decoder-only scores.
            continue
        split[(position, index)] = (_single_output(output, offset, len(texts)), share)
    return split


def _single_output(output, offset: int, count: int):
    """Return the output a direct Inseq call on input `offset` alone would produce."""
    import inseq

    info = dict(output.info)
    info["input_texts"] = [output.info["input_texts"][offset]]
    info["generated_texts"] = [output.info["generated_texts"][offset]]
    info["generation_args"] = dict(output.info.get("generation_args") or {})
    if "exec_time" in info:
        info["exec_time"] = output.info["exec_time"] / count
    return inseq.FeatureAttributionOutput(sequence_attributions=[output.sequence_attributions[offset]], step_attributions=None, info=info)


def _job_chunk(member: BatchMember, pieces: list[tuple[object, float]]) -> ChunkAttribution | None:
    """Assemble one job's chunk result from its single-input outputs, as its own run merges them."""
    import inseq

    outputs = [output for output, _ in pieces]
    raw = outputs[0] if len(outputs) == 1 else inseq.merge_attributions(outputs)
    try:
        aggregated = aggregate(raw, member.spec)
    except Exception as exc:  # noqa: BLE001 - the job's own run reports its aggregation error
        log.info("aggregating the batched result of job %s failed (%s); it runs alone", member.job_id, exc)
        return None
    return ChunkAttribution(raw, aggregated, sum(seconds for _, seconds in pieces))


def _compare_sequences(left, right) -> str | None:
    for side in ("source", "target"):
        left_tokens = [(token.token, int(token.id)) for token in getattr(left, side) or []]
        right_tokens = [(token.token, int(token.id)) for token in getattr(right, side) or []]
        if left_tokens != right_tokens:
            return f"{side} tokens differ"
    if (left.attr_pos_start, left.attr_pos_end) != (right.attr_pos_start, right.attr_pos_end):
        return "attributed positions differ"

    for name in ("source_attributions", "target_attributions"):
        difference = _compare_tensors(name, getattr(left, name), getattr(right, name))
        if difference is not None:
            return difference
    for group in ("step_scores", "sequence_scores"):
        left_scores, right_scores = getattr(left, group) or {}, getattr(right, group) or {}
        if set(left_scores) != set(right_scores):
            return f"{group} names differ"
        for name in left_scores:
            difference = _compare_tensors(f"{group} {name!r}", left_scores[name], right_scores[name])
            if difference is not None:
                return difference
    return None


def _compare_tensors(name: str, left, right) -> str | None:
    if left is None or right is None:
        return None if left is None and right is None else f"{name} present on one side only"
    left_values = left.detach().float().cpu().numpy()
    right_values = right.detach().float().cpu().numpy()
    if left_values.shape != right_values.shape:
        return f"{name} shapes differ: {left_values.shape} and {right_values.shape}"
    if not np.array_equal(np.isnan(left_values), np.isnan(right_values)):
        return f"{name} have NaN in different cells"
    if np.isnan(right_values).all():
        return None

    limit = ATOL + RTOL * float(np.nanmax(np.abs(right_values)))
    worst = float(np.nanmax(np.abs(left_values - right_values)))
    if worst > limit:
        return f"{name} differ by up to {worst:g}, more than the allowed {limit:g}"
    return None


def _input_count(group: list[BatchMember]) -> int:
    return sum(len(member.spec.texts()) for member in group)
