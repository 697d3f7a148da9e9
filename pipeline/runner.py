"""Running Inseq on a batch of a job's inputs.

Inseq mutates some dict arguments it receives (generation and step score arguments),
which would leak settings from one job into the next in a warm worker. Every call here
therefore builds fresh dicts and lists from the immutable spec.
"""

import inspect
import logging
import time
from dataclasses import dataclass

from pipeline.errors import AttributionError, SpecError
from pipeline.models import LoadedModel
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class ChunkAttribution:
    """Inseq's raw output for some inputs, its aggregated form, and the time it took."""

    raw: object
    aggregated: object
    seconds: float


def attribute_inputs(loaded: LoadedModel, spec: JobSpec, texts: list[str], generated_texts: list[str] | None) -> ChunkAttribution:
    """Attribute `texts` with the spec's method and settings, then aggregate the scores."""
    if generated_texts is not None and not loaded.is_encoder_decoder:
        check_forced_prefixes(texts, generated_texts)

    attribution_model = loaded.attribution_model(spec.method)
    groups = _input_groups(texts, generated_texts, spec.batch_size)

    started = time.perf_counter()
    try:
        outputs = [attribution_model.attribute(**attribute_kwargs(attribution_model, spec, group_texts, group_generated)) for group_texts, group_generated in groups]
        raw = outputs[0] if len(outputs) == 1 else _merge(outputs)
        aggregated = aggregate(raw, spec)
    except (SpecError, AttributionError):
        raise
    except Exception as exc:  # noqa: BLE001 - any Inseq failure becomes the job's readable error
        raise AttributionError(_inseq_failure_message(spec, exc)) from exc
    return ChunkAttribution(raw, aggregated, time.perf_counter() - started)


def _input_groups(texts: list[str], generated_texts: list[str] | None, batch_size: int) -> list[tuple[list[str], list[str] | None]]:
    """Split inputs into the groups passed to one Inseq call each.

    Inseq pads a batch of inputs to one length before generating, and with batch size 1
    it still generates from that padded encoding, which changes decoder-only outputs.
    Calling Inseq once per group of `batch_size` inputs keeps each group's padding its own.
    """
    groups = []
    for start in range(0, len(texts), batch_size):
        generated = generated_texts[start : start + batch_size] if generated_texts is not None else None
        groups.append((texts[start : start + batch_size], generated))
    return groups


def _merge(outputs):
    import inseq

    return inseq.merge_attributions(outputs)


def attribute_kwargs(attribution_model, spec: JobSpec, texts: list[str], generated_texts: list[str] | None) -> dict:
    """Build the keyword arguments of `AttributionModel.attribute`, all freshly allocated."""
    kwargs = {
        "input_texts": list(texts),
        "generated_texts": list(generated_texts) if generated_texts is not None else None,
        "attribute_target": spec.attribute_target,
        "step_scores": list(spec.step_scores),
        "generation_args": dict(spec.generation_args),
        "batch_size": spec.batch_size,
        "show_progress": False,
        "device": attribution_model.device,
    }
    if spec.attr_pos_start is not None:
        kwargs["attr_pos_start"] = spec.attr_pos_start
    if spec.attr_pos_end is not None:
        kwargs["attr_pos_end"] = spec.attr_pos_end
    if spec.attributed_fn is not None:
        kwargs["attributed_fn"] = spec.attributed_fn

    method_args = dict(spec.method_args)
    if spec.n_steps is not None and "n_steps" not in method_args and _accepts(attribution_model, "n_steps"):
        method_args["n_steps"] = spec.n_steps
    kwargs.update(method_args)
    return kwargs


def aggregate(raw, spec: JobSpec):
    """Aggregate raw scores with the spec's aggregation, down to one score per token pair."""
    options = {name: value for name, value in (("normalize", spec.aggregation.normalize), ("rescale", spec.aggregation.rescale)) if value is not None}
    aggregated = raw.aggregate(spec.aggregation.aggregator, **options)

    # A custom aggregator may stop short of 2-D scores (e.g. subword merging alone);
    # the default aggregation then reduces the remaining dimensions.
    if any(_has_extra_dimensions(sequence) for sequence in aggregated.sequence_attributions):
        aggregated = aggregated.aggregate()
    return aggregated


def check_forced_prefixes(texts: list[str], generated_texts: list[str]) -> None:
    """Reject forced outputs that a decoder-only model cannot continue from its input."""
    for index, (text, generated) in enumerate(zip(texts, generated_texts, strict=True)):
        if not generated.startswith(text):
            raise SpecError(
                f"Invalid spec: field 'generated_texts' item {index} does not start with its input text {_short(text)}; "
                "for decoder-only models the generated text must repeat the input as its prefix",
                field="generated_texts",
            )


def _has_extra_dimensions(sequence) -> bool:
    for tensor in (sequence.source_attributions, sequence.target_attributions):
        if tensor is not None and tensor.ndim > 2:
            return True
    return False


def _accepts(attribution_model, parameter: str) -> bool:
    """Tell whether the attribution method's underlying `attribute` takes `parameter`."""
    method = getattr(attribution_model.attribution_method, "method", None)
    attribute = getattr(method, "attribute", None)
    if attribute is None:
        return False
    return parameter in inspect.signature(attribute).parameters


def _inseq_failure_message(spec: JobSpec, exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return f"Inseq failed running {spec.method!r} on model {spec.model!r}: {type(exc).__name__}: {detail}".rstrip(": ")


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")
