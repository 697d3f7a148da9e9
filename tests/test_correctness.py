"""Parquet scores equal a direct Inseq call with the same model, method, inputs and aggregation."""

import numpy as np
import pytest

DECODER_TEXTS = ["The capital of France is", "A cat sat on"]
SEQ2SEQ_TEXTS = ["The capital of France is", "A cat sat on the mat"]
SEQ2SEQ_TARGETS = ["Paris is nice", "the dog looked"]
METHOD_ARGS = {"integrated_gradients": {"n_steps": 4}}


def direct_scores(model_dir, method: str, texts, generated_texts=None, attribute_target=False, **attribute_args) -> dict:
    """Run Inseq directly, one input per call, and flatten its aggregated scores."""
    import inseq
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    attribution_model = inseq.load_model(model, method, tokenizer=tokenizer)

    scores = {}
    for index, text in enumerate(texts):
        forced = [generated_texts[index]] if generated_texts else None
        output = attribution_model.attribute([text], forced, attribute_target=attribute_target, show_progress=False, **attribute_args).aggregate()
        sequence = output.sequence_attributions[0]
        for side, tensor in (("source", sequence.source_attributions), ("target", sequence.target_attributions)):
            if tensor is None:
                continue
            matrix = tensor.float().numpy()
            for input_idx, step in zip(*np.nonzero(~np.isnan(matrix)), strict=True):
                scores[(index, side, sequence.attr_pos_start + int(step), int(input_idx))] = float(matrix[input_idx, step])
    return scores


def table_scores(frame) -> dict:
    keys = zip(frame["sequence_idx"], frame["side"], frame["target_idx"], frame["input_idx"], strict=True)
    return {(int(seq), side, int(target), int(source)): float(score) for (seq, side, target, source), score in zip(keys, frame["score"], strict=True)}


def assert_same_scores(table: dict, direct: dict) -> None:
    assert set(table) == set(direct), f"cells differ: only in table {sorted(set(table) - set(direct))[:5]}, only in Inseq {sorted(set(direct) - set(table))[:5]}"
    worst = max(abs(table[key] - direct[key]) for key in direct)
    assert worst < 1e-5, f"largest score difference {worst:g}"


@pytest.mark.parametrize("method", ["input_x_gradient", "saliency", "integrated_gradients", "attention"])
def test_decoder_scores_match_inseq(client, make_worker, causal_model_dir, method):
    method_args = METHOD_ARGS.get(method, {})
    job_id = client.submit(input_texts=DECODER_TEXTS, model=str(causal_model_dir), method=method, method_args=method_args, generation_args={"max_new_tokens": 3})
    make_worker().poll_once()
    assert client.status(job_id)["state"] == "succeeded", client.status(job_id)["message"]

    direct = direct_scores(causal_model_dir, method, DECODER_TEXTS, generation_args={"max_new_tokens": 3}, **method_args)

    assert_same_scores(table_scores(client.table(job_id)), direct)


@pytest.mark.parametrize("method", ["input_x_gradient", "saliency", "integrated_gradients", "attention"])
def test_seq2seq_scores_match_inseq(client, make_worker, seq2seq_model_dir, method):
    method_args = METHOD_ARGS.get(method, {})
    job_id = client.submit(input_texts=SEQ2SEQ_TEXTS, generated_texts=SEQ2SEQ_TARGETS, model=str(seq2seq_model_dir), method=method, method_args=method_args, attribute_target=True)
    make_worker().poll_once()
    assert client.status(job_id)["state"] == "succeeded", client.status(job_id)["message"]

    table = client.table(job_id)
    direct = direct_scores(seq2seq_model_dir, method, SEQ2SEQ_TEXTS, SEQ2SEQ_TARGETS, attribute_target=True, **method_args)

    assert set(table["side"]) == {"source", "target"}, "encoder-decoder jobs store both sides"
    assert_same_scores(table_scores(table), direct)


def test_step_scores_match_inseq(client, make_worker, causal_model_dir):
    import inseq
    import transformers

    job_id = client.submit(input_text="The capital of France is", model=str(causal_model_dir), method="saliency", step_scores=["probability"], generation_args={"max_new_tokens": 3})
    make_worker().poll_once()

    model = transformers.AutoModelForCausalLM.from_pretrained(causal_model_dir, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_model_dir)
    direct = inseq.load_model(model, "saliency", tokenizer=tokenizer).attribute(
        ["The capital of France is"], step_scores=["probability"], generation_args={"max_new_tokens": 3}, show_progress=False
    ).aggregate()
    expected = direct.sequence_attributions[0].step_scores["probability"].float().numpy()

    stored = client.table(job_id, "step_scores")["probability"].to_numpy()
    np.testing.assert_allclose(stored, expected, atol=1e-6, err_msg="step scores differ from Inseq's")


def test_two_jobs_match_each_alone(client, make_worker, causal_model_dir, tmp_path):
    """Nothing leaks between jobs through Inseq's mutable default arguments."""
    from pipeline.models import ModelCache

    first = {"input_text": "The capital of France is", "model": str(causal_model_dir), "method": "saliency", "step_scores": ["probability", "entropy"], "generation_args": {"max_new_tokens": 4}}
    second = {"input_text": "A cat sat on", "model": str(causal_model_dir), "method": "saliency", "generation_args": {"max_new_tokens": 2}}

    together = make_worker()
    first_id, second_id = client.submit(first), client.submit(second)
    together.poll_once()
    together.poll_once()

    alone = make_worker()
    alone.models = ModelCache(cache_dir=tmp_path / "fresh")
    alone_id = client.submit(second)
    alone.poll_once()

    shared = client.table(second_id, "step_scores")
    fresh = client.table(alone_id, "step_scores")
    assert list(shared.columns) == list(fresh.columns), "the second job picked up step scores from the first"
    assert len(client.table(second_id)) == len(client.table(alone_id)), "the second job picked up generation settings from the first"
    assert_same_scores(table_scores(client.table(second_id)), table_scores(client.table(alone_id)))
    assert client.status(first_id)["state"] == "succeeded"
