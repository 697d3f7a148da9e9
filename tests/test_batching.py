"""Batching small compatible jobs into one Inseq call: results equal unbatched runs, or the worker falls back."""

import json
import logging
import time

import numpy as np
import pytest

from pipeline import batching
from pipeline.spec import SpecPolicy, parse_spec

# Five tokens each under the tiny tokenizer, so they share one unpadded Inseq call.
SAME_LENGTH = ["The capital of France is", "The capital of Italy is", "The capital of Spain is"]
SHORTER = "A cat sat"
GENERATION = {"max_new_tokens": 3}
# The tiny BART emits only special tokens unless repeats are banned and a length forced.
SEQ2SEQ_GENERATION = {"max_new_tokens": 3, "min_new_tokens": 3, "no_repeat_ngram_size": 1}


@pytest.fixture
def inseq_calls(monkeypatch):
    """Record the input texts of every `AttributionModel.attribute` call; set `fail_batches` to make multi-input calls raise."""
    from inseq.models import AttributionModel

    original = AttributionModel.attribute
    recorder = CallRecorder()

    def spy(self, *args, **kwargs):
        texts = list(kwargs["input_texts"] if "input_texts" in kwargs else args[0])
        recorder.calls.append(texts)
        if recorder.fail_batches and len(texts) > 1:
            raise RuntimeError("simulated failure of a batched call")
        if recorder.during_batch is not None and len(texts) > 1:
            recorder.during_batch()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AttributionModel, "attribute", spy)
    return recorder


class CallRecorder:
    def __init__(self):
        self.calls: list[list[str]] = []
        self.fail_batches = False
        self.during_batch = None

    def batched(self) -> list[list[str]]:
        return [call for call in self.calls if len(call) > 1]


def decoder_spec(model_dir, text: str, **overrides) -> dict:
    spec = {"input_text": text, "model": str(model_dir), "method": "input_x_gradient", "step_scores": ["probability"], "generation_args": dict(GENERATION)}
    return {**spec, **overrides}


def submit_all(client, specs: list[dict], prefix: str) -> list[str]:
    return [client.submit(spec, job_id=f"{prefix}-{number}") for number, spec in enumerate(specs)]


def assert_succeeded(client, job_ids):
    for job_id in job_ids:
        record = client.status(job_id)
        assert record["state"] == "succeeded", f"job {job_id} ended {record['state']}: {record['message']}"


def assert_same_tables(client, batched_id: str, alone_id: str) -> None:
    """Tokens and ids must be equal; scores may differ only by float rounding."""
    for table in ("attributions", "step_scores", "sequences"):
        left = client.table(batched_id, table).drop(columns=["job_id"])
        right = client.table(alone_id, table).drop(columns=["job_id"])
        assert list(left.columns) == list(right.columns), f"{table} columns differ for {batched_id}"
        assert len(left) == len(right), f"{table} of {batched_id} has {len(left)} rows, unbatched {len(right)}"
        for column in left.columns:
            if column == "attribution_seconds":
                continue
            if left[column].dtype.kind == "f":
                np.testing.assert_allclose(left[column].to_numpy(), right[column].to_numpy(), rtol=1e-4, atol=1e-6, err_msg=f"{table}.{column} of {batched_id} differs from its unbatched run")
            else:
                assert left[column].tolist() == right[column].tolist(), f"{table}.{column} of {batched_id} differs from its unbatched run"


def assert_same_inseq_output(left, right, name: str) -> None:
    """Compare two Inseq outputs: info (except timing) and tokens exactly, scores with tolerance."""
    left_info = {key: value for key, value in left.info.items() if key != "exec_time"}
    right_info = {key: value for key, value in right.info.items() if key != "exec_time"}
    differing = sorted(key for key in left_info.keys() | right_info.keys() if left_info.get(key) != right_info.get(key))
    assert not differing, f"{name}: Inseq info differs in {differing}: {[(left_info.get(key), right_info.get(key)) for key in differing]}"
    assert len(left.sequence_attributions) == len(right.sequence_attributions), f"{name}: sequence counts differ"

    for left_sequence, right_sequence in zip(left.sequence_attributions, right.sequence_attributions, strict=True):
        for side in ("source", "target"):
            left_tokens = [(token.token, token.id) for token in getattr(left_sequence, side) or []]
            right_tokens = [(token.token, token.id) for token in getattr(right_sequence, side) or []]
            assert left_tokens == right_tokens, f"{name}: {side} tokens differ"
        for field in ("source_attributions", "target_attributions"):
            left_scores, right_scores = getattr(left_sequence, field), getattr(right_sequence, field)
            assert (left_scores is None) == (right_scores is None), f"{name}: {field} present on one side only"
            if left_scores is not None:
                np.testing.assert_allclose(left_scores.float().numpy(), right_scores.float().numpy(), rtol=1e-4, atol=1e-6, err_msg=f"{name}: {field} differ")
        assert set(left_sequence.step_scores) == set(right_sequence.step_scores), f"{name}: step score names differ"
        for score in left_sequence.step_scores:
            np.testing.assert_allclose(left_sequence.step_scores[score].float().numpy(), right_sequence.step_scores[score].float().numpy(), rtol=1e-4, atol=1e-6, err_msg=f"{name}: step score {score} differs")


def direct_output(model_dir, text: str, method: str = "input_x_gradient", **attribute_args):
    """Attribute one text with a freshly loaded model and a direct Inseq call, then aggregate."""
    import inseq
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    attribution_model = inseq.load_model(model, method, tokenizer=tokenizer)
    return attribution_model.attribute([text], show_progress=False, **attribute_args).aggregate()


def test_same_length_jobs_share_one_call(client, make_worker, causal_model_dir, inseq_calls):
    batched_ids = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH], "batched")
    worker = make_worker()
    worker.poll_once()

    assert_succeeded(client, batched_ids)
    assert inseq_calls.calls == [SAME_LENGTH, SAME_LENGTH[:1]], "expected one batched call plus one unbatched check of the first job"

    inseq_calls.calls.clear()
    alone_ids = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH], "alone")
    make_worker(max_batch_jobs=1).poll_once()

    assert_succeeded(client, alone_ids)
    assert inseq_calls.calls == [[text] for text in SAME_LENGTH], "with batching off every job calls Inseq alone"
    for batched_id, alone_id, text in zip(batched_ids, alone_ids, SAME_LENGTH, strict=True):
        assert_same_tables(client, batched_id, alone_id)
        assert_same_inseq_output(client.inseq_output(batched_id), client.inseq_output(alone_id), f"{batched_id} against unbatched")
        direct = direct_output(causal_model_dir, text, step_scores=["probability"], generation_args=dict(GENERATION))
        assert_same_inseq_output(client.inseq_output(batched_id), direct, f"{batched_id} against a direct Inseq call")


def test_checked_key_batches_without_recheck(client, make_worker, causal_model_dir, inseq_calls):
    worker = make_worker()
    submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH[:2]], "first")
    worker.poll_once()

    inseq_calls.calls.clear()
    later = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH], "later")
    worker.poll_once()

    assert_succeeded(client, later)
    assert inseq_calls.calls == [SAME_LENGTH], "a key that passed its check is batched with no further unbatched run"


def test_different_lengths_and_settings_split(client, make_worker, causal_model_dir, inseq_calls):
    specs = [
        decoder_spec(causal_model_dir, SAME_LENGTH[0]),
        decoder_spec(causal_model_dir, SAME_LENGTH[1]),
        decoder_spec(causal_model_dir, SHORTER),
        decoder_spec(causal_model_dir, SAME_LENGTH[2], method="saliency"),
        decoder_spec(causal_model_dir, SAME_LENGTH[2], generation_args={"max_new_tokens": 2}),
        decoder_spec(causal_model_dir, SAME_LENGTH[2], method="integrated_gradients", method_args={"n_steps": 4}),
        decoder_spec(causal_model_dir, SAME_LENGTH[1], method="integrated_gradients", method_args={"n_steps": 5}),
    ]
    job_ids = submit_all(client, specs, "mixed")
    make_worker().poll_once()

    assert_succeeded(client, job_ids)
    assert inseq_calls.batched() == [SAME_LENGTH[:2]], f"only the two same-length jobs with equal settings may share a call, got {inseq_calls.batched()}"
    assert [SHORTER] in inseq_calls.calls, "the shorter input runs in its own call"
    assert len(inseq_calls.calls) == 7, f"expected 1 batched call, 1 check and 5 single calls, got {inseq_calls.calls}"


def test_batch_key_ignores_post_call_fields():
    base = {"input_text": "Hello", "model": "gpt2", "method": "saliency", "generation_args": {"max_new_tokens": 20}}

    def key(**fields):
        return batching.batch_key(parse_spec(json.dumps({**base, **fields}).encode()))

    assert key() == key(generation_args={}), "the default max_new_tokens is folded in before comparing"
    assert key() == key(labels={"run": "a"}, aggregation={"normalize": True}, outputs=["tables"], input_text="Bye"), "fields applied after the Inseq call must not split batches"
    assert key() != key(method="input_x_gradient"), "the method changes the call"
    assert key() != key(n_steps=4), "n_steps changes the call"
    assert key() != key(step_scores=["probability"]), "step scores change the call"
    assert key() != key(attr_pos_start=2), "attributed positions change the call"


def test_batchable_excludes_unsafe_specs():
    def batchable(**fields):
        return batching.is_batchable(parse_spec(json.dumps({"model": "gpt2", **fields}).encode()))

    assert batchable(input_text="Hello")
    assert batchable(input_texts=["a b", "c d e"])
    assert not batchable(input_texts=["a b", "c d e"], batch_size=2), "its own run pads two inputs together"
    assert not batchable(input_text="Hello", generated_texts=["Hello there"]), "forced decoding is left out"
    assert not batchable(input_text="Hello", generation_args={"do_sample": True}), "sampled outputs never repeat"
    assert not batchable(input_texts=["a", "b", "c"], chunk_size=2), "more than one chunk"


def test_mismatch_falls_back_and_disables_key(client, make_worker, causal_model_dir, inseq_calls, monkeypatch, caplog):
    real_single_output = batching._single_output

    def perturbed(output, offset, count):
        single = real_single_output(output, offset, count)
        single.sequence_attributions[0].target_attributions += 1.0
        return single

    monkeypatch.setattr(batching, "_single_output", perturbed)
    worker = make_worker()
    batched_ids = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH[:2]], "perturbed")
    with caplog.at_level(logging.WARNING, logger="pipeline.batching"):
        worker.poll_once()

    assert_succeeded(client, batched_ids)
    warnings = [record for record in caplog.records if "differ from the unbatched run" in record.getMessage()]
    assert len(warnings) == 1, f"expected one warning about the mismatch, got {[record.getMessage() for record in caplog.records]}"
    assert list(worker.batcher.verdicts.values()) == [False], "the key must be marked unbatchable"

    alone_ids = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH[:2]], "reference")
    make_worker(max_batch_jobs=1).poll_once()
    for batched_id, alone_id in zip(batched_ids, alone_ids, strict=True):
        assert_same_tables(client, batched_id, alone_id)

    inseq_calls.calls.clear()
    later = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH], "after-mismatch")
    worker.poll_once()
    assert_succeeded(client, later)
    assert inseq_calls.batched() == [], f"a key that failed its check must not be batched again, got {inseq_calls.batched()}"


def test_failed_batch_runs_each_job_alone(client, make_worker, causal_model_dir, inseq_calls):
    inseq_calls.fail_batches = True
    too_long = " ".join(["cat"] * 200)  # longer than the tiny GPT-2's 128 positions, so it fails alone too
    good_ids = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH], "good")
    bad_id = client.submit(decoder_spec(causal_model_dir, too_long), job_id="bad")
    make_worker().poll_once()

    assert inseq_calls.batched() == [SAME_LENGTH], "the batched call was attempted"
    assert_succeeded(client, good_ids)
    bad = client.status(bad_id)
    assert bad["state"] == "failed", f"the bad job ended {bad['state']}"
    assert bad["message"].startswith("Inseq failed running 'input_x_gradient'"), bad["message"]


def test_cancelled_job_in_batch(client, make_worker, causal_model_dir, inseq_calls):
    job_ids = submit_all(client, [decoder_spec(causal_model_dir, text) for text in SAME_LENGTH], "cancel")

    def cancel_second():
        client.cancel(job_ids[1])
        time.sleep(2.5)  # the heartbeat checks for cancellation every second with 3 s leases

    inseq_calls.during_batch = cancel_second
    make_worker(lease_seconds=3).poll_once()

    assert inseq_calls.batched() == [SAME_LENGTH], "the jobs were batched"
    assert client.status(job_ids[1])["state"] == "cancelled", client.status(job_ids[1])["message"]
    assert not client.store.exists(f"results/{job_ids[1]}/summary.json"), "a cancelled job must not commit"
    assert_succeeded(client, [job_ids[0], job_ids[2]])


def test_seq2seq_batch_equals_unbatched(client, make_worker, seq2seq_model_dir, inseq_calls):
    def spec(text):
        return decoder_spec(seq2seq_model_dir, text, attribute_target=True, generation_args=dict(SEQ2SEQ_GENERATION))

    batched_ids = submit_all(client, [spec(text) for text in SAME_LENGTH], "bart-batched")
    make_worker().poll_once()
    assert_succeeded(client, batched_ids)
    assert inseq_calls.batched() == [SAME_LENGTH], "encoder-decoder jobs of one input length are batched"

    alone_ids = submit_all(client, [spec(text) for text in SAME_LENGTH], "bart-alone")
    make_worker(max_batch_jobs=1).poll_once()
    assert_succeeded(client, alone_ids)
    for batched_id, alone_id in zip(batched_ids, alone_ids, strict=True):
        assert set(client.table(batched_id)["side"]) == {"source", "target"}, "encoder-decoder jobs store both sides"
        assert_same_tables(client, batched_id, alone_id)
        assert_same_inseq_output(client.inseq_output(batched_id), client.inseq_output(alone_id), f"{batched_id} against unbatched")


def test_multi_input_job_joins_batch(client, make_worker, causal_model_dir, inseq_calls):
    multi = decoder_spec(causal_model_dir, None)
    multi.pop("input_text")
    multi["input_texts"] = [SAME_LENGTH[1], SHORTER]
    batched_ids = [client.submit(decoder_spec(causal_model_dir, SAME_LENGTH[0]), job_id="one"), client.submit(multi, job_id="two")]
    make_worker().poll_once()

    assert_succeeded(client, batched_ids)
    assert inseq_calls.batched() == [SAME_LENGTH[:2]], f"inputs of one length share a call across jobs, got {inseq_calls.calls}"

    alone_id = client.submit(multi, job_id="two-alone")
    make_worker(max_batch_jobs=1).poll_once()
    assert_same_tables(client, "two", alone_id)
    assert_same_inseq_output(client.inseq_output("two"), client.inseq_output(alone_id), "multi-input job against unbatched")


def test_padded_target_left_out(causal_model_dir):
    """A job whose generated target is shorter than its batch's longest was padded, so it must run alone."""
    from types import SimpleNamespace

    class FakeModel:
        device = "cpu"

        def attribute(self, **kwargs):
            sequences = [SimpleNamespace(target=["t"] * length) for length in (8, 7, 8)]
            info = {"input_texts": kwargs["input_texts"], "generated_texts": ["a", "b", "c"], "exec_time": 3.0}
            return SimpleNamespace(sequence_attributions=sequences, info=info)

    spec = parse_spec(json.dumps(decoder_spec(causal_model_dir, "x")).encode(), SpecPolicy(allow_local_models=True))
    call = [(position, 0, text) for position, text in enumerate(SAME_LENGTH)]
    split = batching._attribute_call(FakeModel(), spec, call)

    assert sorted(split) == [(0, 0), (2, 0)], "only the inputs whose targets needed no padding keep a batched result"
    single = split[(2, 0)][0]
    assert single.info["input_texts"] == [SAME_LENGTH[2]], "info names the job's own input"
    assert single.info["generated_texts"] == ["c"], "info names the job's own generated text"
    assert single.info["exec_time"] == pytest.approx(1.0), "the call's time is split evenly"


def test_compare_outputs_scale_tolerance():
    import torch
    from types import SimpleNamespace

    def output(scores):
        sequence = SimpleNamespace(
            source=None, target=[SimpleNamespace(token="a", id=1)], attr_pos_start=1, attr_pos_end=2,
            source_attributions=None, target_attributions=torch.tensor(scores), step_scores={}, sequence_scores=None,
        )
        return SimpleNamespace(sequence_attributions=[sequence])

    reference = output([[1.0, float("nan")], [0.001, 0.5]])
    assert batching.compare_outputs(output([[1.0005, float("nan")], [0.0012, 0.5]]), reference) is None, "round-off below 1e-3 of the largest score is equal"
    assert batching.compare_outputs(output([[1.01, float("nan")], [0.001, 0.5]]), reference) is not None, "a difference of 1e-2 of the largest score is not"
    assert batching.compare_outputs(output([[1.0, 0.0], [0.001, 0.5]]), reference) is not None, "NaN cells must match"
