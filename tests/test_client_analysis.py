"""The client's shortcuts to the analysis helpers, and its progress bar."""

import pandas as pd
import pytest

from pipeline.analysis import attribution_matrix, compare_methods, step_score_frame, top_tokens
from pipeline.errors import ComparisonError


@pytest.fixture
def two_methods(client, make_worker, causal_model_dir):
    """The same text attributed with two methods, with a step score."""
    common = {"model": str(causal_model_dir), "input_texts": ["The capital of France is", "A cat sat on"], "step_scores": ["probability"], "generation_args": {"max_new_tokens": 3}}
    job_ids = [client.submit(common, method=method) for method in ("saliency", "input_x_gradient")]
    make_worker().poll_once()
    return job_ids


def test_shortcuts_match_analysis_helpers(client, two_methods):
    job_id = two_methods[0]
    attributions = client.table(job_id, "attributions")

    pd.testing.assert_frame_equal(client.attribution_matrix(job_id, sequence_idx=1), attribution_matrix(attributions, 1))
    pd.testing.assert_frame_equal(client.top_tokens(job_id, k=2, by="sequence"), top_tokens(attributions, k=2, by="sequence"))
    pd.testing.assert_frame_equal(client.step_scores(job_id), step_score_frame(client.table(job_id, "step_scores")))


def test_compare_shortcut_matches_helper(client, two_methods):
    expected = compare_methods({job_id: client.table(job_id, "attributions") for job_id in two_methods})

    comparison = client.compare(two_methods)

    pd.testing.assert_frame_equal(comparison.pairs, expected.pairs)
    pd.testing.assert_frame_equal(comparison.per_token, expected.per_token)


def test_compare_rejects_other_inputs(client, make_worker, causal_model_dir, two_methods):
    other = client.submit(model=str(causal_model_dir), input_text="Hello world", method="saliency", generation_args={"max_new_tokens": 3})
    make_worker().poll_once()

    with pytest.raises(ComparisonError):
        client.compare([two_methods[0], other])


def test_wait_progress_bar(client, two_methods, capsys):
    record = client.wait(two_methods[0], progress=True)

    assert record["state"] == "succeeded"
    drawn = capsys.readouterr().out
    assert "2/2" in drawn, f"the progress bar did not show the inputs done: {drawn!r}"
    assert "succeeded" in drawn, f"the progress bar did not show the inputs done: {drawn!r}"
