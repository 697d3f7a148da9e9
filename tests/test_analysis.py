"""Tests for pipeline.analysis on hand-written tables with expected values worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import (
    AnalysisInputError,
    JobSelectionError,
    MethodComparison,
    attribution_matrix,
    compare_methods,
    spearman,
    step_score_frame,
    top_tokens,
)
from pipeline.errors import ComparisonError, TokvizError

VOCABULARY = {
    "The": 10, " capital": 11, " is": 12, " Paris": 13, ".": 14, " Rome": 15, " city": 16,
    "Hello": 20, " world": 21, "</s>": 22, "<pad>": 23, "Hallo": 24, " Welt": 25,
}

# Scores are multiples of 1/8 so that float32 sums are exact and ties are real ties.
DECODER_STEPS_A = [
    (3, " Paris", [("target", 0, "The", 0.25), ("target", 1, " capital", 0.5), ("target", 2, " is", -0.75)]),
    (4, ".", [
        ("target", 0, "The", 0.125), ("target", 1, " capital", -0.25),
        ("target", 2, " is", 0.5), ("target", 3, " Paris", 0.375),
    ]),
]

DECODER_STEPS_B = [
    (3, " Paris", [("target", 0, "The", 0.5), ("target", 1, " capital", 0.125), ("target", 2, " is", 0.25)]),
    (4, ".", [
        ("target", 0, "The", 0.0), ("target", 1, " capital", 0.25),
        ("target", 2, " is", 0.5), ("target", 3, " Paris", 0.75),
    ]),
]

ENCODER_DECODER_STEPS = [
    (1, "Hallo", [
        ("source", 0, "Hello", 0.5), ("source", 1, " world", 0.25), ("source", 2, "</s>", 0.125),
        ("target", 0, "<pad>", 0.0625),
    ]),
    (2, " Welt", [
        ("source", 0, "Hello", 0.125), ("source", 1, " world", 0.75), ("source", 2, "</s>", 0.0),
        ("target", 0, "<pad>", 0.0), ("target", 1, "Hallo", 0.25),
    ]),
]


def make_attributions(job_id, steps, sequence_idx=0, method="saliency"):
    """Build an attributions table in the tokviz schema from (target_idx, token, cells) steps."""
    rows = []
    for target_idx, target_token, cells in steps:
        for side, input_idx, input_token, score in cells:
            rows.append({
                "job_id": job_id,
                "sequence_idx": sequence_idx,
                "target_idx": target_idx,
                "target_token": target_token,
                "target_token_id": VOCABULARY[target_token],
                "side": side,
                "input_idx": input_idx,
                "input_token": input_token,
                "input_token_id": VOCABULARY[input_token],
                "score": score,
                "model": "tiny-model",
                "method": method,
                "labels": "{}",
            })

    frame = pd.DataFrame(rows)
    return frame.astype({
        "sequence_idx": "int32", "target_idx": "int32", "input_idx": "int32",
        "target_token_id": "int64", "input_token_id": "int64", "score": "float32",
    })


def ranks_pearson(x_ranks, y_ranks):
    """Return the Pearson correlation of two rank lists with numpy only."""
    return float(np.corrcoef(np.array(x_ranks, dtype=float), np.array(y_ranks, dtype=float))[0, 1])


def test_matrix_decoder_shape_and_values():
    matrix = attribution_matrix(make_attributions("a", DECODER_STEPS_A))

    assert list(matrix.index) == [
        ("target", 0, "The"), ("target", 1, " capital"), ("target", 2, " is"), ("target", 3, " Paris"),
    ]
    assert list(matrix.columns) == [(3, " Paris"), (4, ".")]
    assert list(matrix.index.names) == ["side", "input_idx", "input_token"]
    assert list(matrix.columns.names) == ["target_idx", "target_token"]
    assert matrix.iloc[:, 0].tolist()[:3] == [0.25, 0.5, -0.75]
    assert matrix.iloc[:, 1].tolist() == [0.125, -0.25, 0.5, 0.375]


def test_matrix_future_cell_is_nan():
    matrix = attribution_matrix(make_attributions("a", DECODER_STEPS_A))

    assert math.isnan(matrix.loc[("target", 3, " Paris"), (3, " Paris")])
    assert int(matrix.isna().sum().sum()) == 1


def test_matrix_source_rows_first():
    frame = make_attributions("t5", ENCODER_DECODER_STEPS)
    matrix = attribution_matrix(frame.iloc[::-1])

    assert matrix.index.get_level_values("side").tolist() == ["source"] * 3 + ["target"] * 2
    assert matrix.index.get_level_values("input_idx").tolist() == [0, 1, 2, 0, 1]
    assert matrix.columns.get_level_values("target_idx").tolist() == [1, 2]
    assert math.isnan(matrix.loc[("target", 1, "Hallo"), (1, "Hallo")])


def test_matrix_side_filter():
    frame = make_attributions("t5", ENCODER_DECODER_STEPS)

    source = attribution_matrix(frame, side="source")
    target = attribution_matrix(frame, side="target")

    assert source.shape == (3, 2)
    assert source.iloc[1].tolist() == [0.25, 0.75]
    assert target.shape == (2, 2)
    assert target.iloc[0].tolist() == [0.0625, 0.0]


def test_matrix_rejects_bad_side():
    frame = make_attributions("t5", ENCODER_DECODER_STEPS)

    with pytest.raises(AnalysisInputError, match="side must be None, 'source' or 'target', got 'encoder'"):
        attribution_matrix(frame, side="encoder")


def test_matrix_rejects_missing_sequence():
    frame = make_attributions("a", DECODER_STEPS_A)

    with pytest.raises(AnalysisInputError, match=r"sequence_idx 5 has no attribution rows; pass one of \[0\]"):
        attribution_matrix(frame, sequence_idx=5)


def test_matrix_several_jobs_need_job_id():
    both = pd.concat([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    with pytest.raises(JobSelectionError, match=r"contains 2 jobs \['a', 'b'\]; pass job_id= to choose one"):
        attribution_matrix(both)


def test_matrix_job_selection_error_types():
    both = pd.concat([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    with pytest.raises(ValueError) as caught:
        attribution_matrix(both)

    assert isinstance(caught.value, TokvizError)


def test_matrix_job_id_selects_job():
    both = pd.concat([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    matrix = attribution_matrix(both, job_id="b")

    assert matrix.iloc[:, 1].tolist() == [0.0, 0.25, 0.5, 0.75]


def test_matrix_unknown_job_id():
    frame = make_attributions("a", DECODER_STEPS_A)

    with pytest.raises(JobSelectionError, match=r"job_id 'zz' not found in the attributions frame, which contains \['a'\]"):
        attribution_matrix(frame, job_id="zz")


def test_matrix_missing_column():
    frame = make_attributions("a", DECODER_STEPS_A).drop(columns="score")

    with pytest.raises(AnalysisInputError, match=r"missing columns \['score'\]"):
        attribution_matrix(frame)


def test_matrix_duplicate_cells():
    frame = make_attributions("a", DECODER_STEPS_A)
    doubled = pd.concat([frame, frame.iloc[[0]]])

    with pytest.raises(AnalysisInputError, match="2 rows for the same cells, first at sequence 0 target position 3"):
        attribution_matrix(doubled)


def test_top_step_signed():
    top = top_tokens(make_attributions("a", DECODER_STEPS_A), k=2)

    assert list(top.columns) == [
        "job_id", "sequence_idx", "target_idx", "target_token", "rank",
        "side", "input_idx", "input_token", "score",
    ]
    assert top["target_idx"].tolist() == [3, 3, 4, 4]
    assert top["rank"].tolist() == [1, 2, 1, 2]
    assert top["input_token"].tolist() == [" capital", "The", " is", " Paris"]
    assert top["score"].tolist() == [0.5, 0.25, 0.5, 0.375]


def test_top_step_absolute_keeps_sign():
    top = top_tokens(make_attributions("a", DECODER_STEPS_A), k=2, absolute=True)

    assert top["input_token"].tolist() == [" is", " capital", " is", " Paris"]
    assert top["score"].tolist() == [-0.75, 0.5, 0.5, 0.375]


def test_top_step_k_larger_than_inputs():
    top = top_tokens(make_attributions("a", DECODER_STEPS_A), k=10)

    assert (top["target_idx"] == 3).sum() == 3
    assert (top["target_idx"] == 4).sum() == 4
    assert top[top["target_idx"] == 4]["rank"].tolist() == [1, 2, 3, 4]


def test_top_step_skips_nan_scores():
    frame = make_attributions("a", DECODER_STEPS_A)
    frame.loc[(frame["target_idx"] == 3) & (frame["input_idx"] == 1), "score"] = np.nan

    top = top_tokens(frame, k=1)

    assert top["input_token"].tolist() == ["The", " is"]


def test_top_sequence_sum_ties_to_earlier():
    top = top_tokens(make_attributions("a", DECODER_STEPS_A), k=2, by="sequence")

    # Sums: The 0.25+0.125, capital 0.5-0.25, is -0.75+0.5, Paris 0.375, so The ties Paris.
    assert list(top.columns) == ["job_id", "sequence_idx", "rank", "side", "input_idx", "input_token", "score", "steps"]
    assert top["input_token"].tolist() == ["The", " Paris"]
    assert top["score"].tolist() == [0.375, 0.375]
    assert top["steps"].tolist() == [2, 1]
    assert top["rank"].tolist() == [1, 2]


def test_top_sequence_mean():
    top = top_tokens(make_attributions("a", DECODER_STEPS_A), k=2, by="sequence", aggregate="mean")

    assert top["input_token"].tolist() == [" Paris", "The"]
    assert top["score"].tolist() == [0.375, 0.1875]


def test_top_sequence_absolute_sum():
    top = top_tokens(make_attributions("a", DECODER_STEPS_A), k=2, by="sequence", absolute=True)

    # |score| sums: The 0.375, capital 0.75, is 1.25, Paris 0.375.
    assert top["input_token"].tolist() == [" is", " capital"]
    assert top["score"].tolist() == [1.25, 0.75]


def test_top_sequence_per_job():
    both = pd.concat([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    top = top_tokens(both, k=1, by="sequence")

    # Job b sums: The 0.5, capital 0.375, is 0.75, Paris 0.75, so is wins the tie.
    assert top["job_id"].tolist() == ["a", "b"]
    assert top["input_token"].tolist() == ["The", " is"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"k": 0}, "k must be a positive integer, got 0"),
        ({"by": "token"}, "by must be 'step' or 'sequence', got 'token'"),
        ({"aggregate": "max"}, "aggregate must be 'sum' or 'mean', got 'max'"),
    ],
)
def test_top_rejects_arguments(arguments, message):
    frame = make_attributions("a", DECODER_STEPS_A)

    with pytest.raises(AnalysisInputError, match=message):
        top_tokens(frame, **arguments)


def test_spearman_known_ranks():
    # Ranks [2, 3, 1] against [3, 1, 2]: 1 - 6 * (1 + 4 + 1) / (3 * 8) = -0.5.
    assert spearman([0.25, 0.5, -0.75], [0.5, 0.125, 0.25]) == pytest.approx(-0.5)


def test_spearman_ties_average():
    # Average ranks of [1, 1, 2, 3] are [1.5, 1.5, 3, 4], and of [40, 10, 20, 30] are [4, 1, 2, 3].
    expected = ranks_pearson([1.5, 1.5, 3, 4], [4, 1, 2, 3])

    assert spearman([1, 1, 2, 3], [40, 10, 20, 30]) == pytest.approx(expected)


def test_spearman_nan_cases():
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, np.nan], [1.0, 2.0]))
    assert spearman([1.0, np.nan, 2.0, 3.0], [1.0, 5.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_compare_per_token_values():
    comparison = compare_methods({
        "a": make_attributions("job-a", DECODER_STEPS_A),
        "b": make_attributions("job-b", DECODER_STEPS_B, method="integrated_gradients"),
    }, k=2)
    per_token = comparison.per_token

    assert isinstance(comparison, MethodComparison)
    assert comparison.labels == ("a", "b")
    assert per_token["target_idx"].tolist() == [3, 4]
    assert per_token["target_token"].tolist() == [" Paris", "."]
    assert per_token["inputs"].tolist() == [3, 4]
    # Step 3 ranks [2, 3, 1] vs [3, 1, 2]. Step 4 ranks [2, 1, 4, 3] vs [1, 2, 3, 4].
    assert per_token["spearman"].iloc[0] == pytest.approx(1 - 6 * 6 / (3 * 8))
    assert per_token["spearman"].iloc[1] == pytest.approx(1 - 6 * 4 / (4 * 15))
    # Top 2 of step 3: {capital, The} vs {The, is}. Top 2 of step 4: {is, Paris} vs {Paris, is}.
    assert per_token["top_k_overlap"].tolist() == [0.5, 1.0]


def test_compare_pair_summary():
    comparison = compare_methods({
        "a": make_attributions("job-a", DECODER_STEPS_A),
        "b": make_attributions("job-b", DECODER_STEPS_B),
    }, k=2)
    pair = comparison.pair("b", "a")

    # Pooled average ranks of the 7 cells in (step, input) order.
    ranks_a = [4, 6.5, 1, 3, 2, 6.5, 5]
    ranks_b = [5.5, 2, 3.5, 1, 3.5, 5.5, 7]
    assert pair["pooled_spearman"] == pytest.approx(ranks_pearson(ranks_a, ranks_b))
    assert pair["mean_spearman"] == pytest.approx((-0.5 + 0.6) / 2)
    assert pair["mean_top_k_overlap"] == pytest.approx(0.75)
    assert pair["tokens"] == 2
    assert pair["cells"] == 7


def test_compare_list_uses_job_ids():
    frames = [
        make_attributions("a", DECODER_STEPS_A),
        make_attributions("b", DECODER_STEPS_B),
        make_attributions("c", DECODER_STEPS_A),
    ]

    comparison = compare_methods(frames, k=1)

    assert comparison.labels == ("a", "b", "c")
    assert comparison.pairs[["job_a", "job_b"]].values.tolist() == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert comparison.pair("a", "c")["pooled_spearman"] == pytest.approx(1.0)
    assert comparison.pair("a", "c")["mean_top_k_overlap"] == pytest.approx(1.0)
    assert len(comparison.per_token) == 6


def test_compare_concatenated_frame():
    both = pd.concat([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    comparison = compare_methods(both)

    assert comparison.labels == ("a", "b")


def test_compare_absolute_ranks():
    comparison = compare_methods([
        make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B),
    ], k=1, absolute=True)
    per_token = comparison.per_token

    # Step 3 |a| = [0.25, 0.5, 0.75] ranks [1, 2, 3] vs b ranks [3, 1, 2].
    assert per_token["spearman"].iloc[0] == pytest.approx(ranks_pearson([1, 2, 3], [3, 1, 2]))
    assert per_token["top_k_overlap"].tolist() == [0.0, 0.0]
    assert comparison.absolute


def test_compare_single_input_is_nan():
    steps = [(1, "Hallo", [("target", 0, "<pad>", 0.5)])] + DECODER_STEPS_A
    steps_b = [(1, "Hallo", [("target", 0, "<pad>", 0.25)])] + DECODER_STEPS_B

    comparison = compare_methods([make_attributions("a", steps), make_attributions("b", steps_b)], k=2)
    first = comparison.per_token.iloc[0]

    assert first["inputs"] == 1
    assert math.isnan(first["spearman"])
    assert first["top_k_overlap"] == 1.0
    assert comparison.pairs["mean_spearman"].iloc[0] == pytest.approx((-0.5 + 0.6) / 2)


def test_compare_nan_score_dropped():
    frame_b = make_attributions("b", DECODER_STEPS_B)
    frame_b.loc[(frame_b["target_idx"] == 4) & (frame_b["input_idx"] == 0), "score"] = np.nan

    comparison = compare_methods([make_attributions("a", DECODER_STEPS_A), frame_b], k=2)
    second = comparison.per_token.iloc[1]

    # Step 4 without input 0: a [-0.25, 0.5, 0.375] ranks [1, 3, 2] vs b ranks [1, 2, 3].
    assert second["inputs"] == 3
    assert second["spearman"] == pytest.approx(ranks_pearson([1, 3, 2], [1, 2, 3]))
    assert comparison.pairs["cells"].iloc[0] == 6


def test_compare_different_generated_token():
    steps_b = [DECODER_STEPS_B[0], (4, " Rome", DECODER_STEPS_B[1][2])]
    expected = (
        "job 'b' generated ' Rome' at sequence 0 position 4 where job 'a' generated '.'; "
        "compare only jobs with the same inputs and generated text (force them with generated_texts)"
    )

    with pytest.raises(ComparisonError) as caught:
        compare_methods([make_attributions("a", DECODER_STEPS_A), make_attributions("b", steps_b)])

    assert str(caught.value) == expected


def test_compare_missing_generated_token():
    with pytest.raises(ComparisonError) as caught:
        compare_methods([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B[:1])])

    assert str(caught.value).startswith("job 'b' generated nothing at sequence 0 position 4 where job 'a' generated '.';")


def test_compare_different_input_token():
    frame_b = make_attributions("b", DECODER_STEPS_B)
    frame_b.loc[frame_b["input_idx"] == 1, ["input_token", "input_token_id"]] = [" city", VOCABULARY[" city"]]

    with pytest.raises(ComparisonError) as caught:
        compare_methods({"a": make_attributions("a", DECODER_STEPS_A), "b": frame_b})

    assert str(caught.value).startswith(
        "job 'b' has input token ' city' at sequence 0 target position 1 where job 'a' has ' capital';"
    )


def test_compare_missing_side():
    source_only = make_attributions("s", ENCODER_DECODER_STEPS)
    source_only = source_only[source_only["side"] == "source"]

    with pytest.raises(ComparisonError) as caught:
        compare_methods([make_attributions("t", ENCODER_DECODER_STEPS), source_only])

    assert str(caught.value).startswith(
        "job 's' attributed no input token at sequence 0 target position 0 where job 't' attributed '<pad>';"
    )


def test_compare_missing_sequence():
    frame_b = pd.concat([
        make_attributions("b", DECODER_STEPS_B), make_attributions("b", DECODER_STEPS_B, sequence_idx=1),
    ])

    with pytest.raises(ComparisonError, match="job 'b' has sequence 1, which job 'a' lacks"):
        compare_methods([make_attributions("a", DECODER_STEPS_A), frame_b])


def test_compare_missing_cell():
    frame_b = make_attributions("b", DECODER_STEPS_B)
    frame_b = frame_b.drop(frame_b[(frame_b["target_idx"] == 4) & (frame_b["input_idx"] == 0)].index)

    with pytest.raises(ComparisonError, match="job 'b' stores no score for target position 4 and target input position 0"):
        compare_methods([make_attributions("a", DECODER_STEPS_A), frame_b])


def test_compare_needs_two_jobs():
    with pytest.raises(AnalysisInputError, match=r"needs at least 2 jobs, got 1 \['a'\]"):
        compare_methods([make_attributions("a", DECODER_STEPS_A)])


def test_compare_dict_frame_with_two_jobs():
    both = pd.concat([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    with pytest.raises(JobSelectionError, match="the attributions of 'x' contain 2 jobs"):
        compare_methods({"x": both, "y": make_attributions("c", DECODER_STEPS_A)})


def test_compare_unknown_pair():
    comparison = compare_methods([make_attributions("a", DECODER_STEPS_A), make_attributions("b", DECODER_STEPS_B)])

    with pytest.raises(AnalysisInputError, match=r"no job pair \('a', 'z'\)"):
        comparison.pair("a", "z")


def make_step_scores():
    return pd.DataFrame({
        "job_id": ["a", "a"],
        "sequence_idx": pd.array([0, 0], dtype="int32"),
        "target_idx": pd.array([3, 4], dtype="int32"),
        "target_token": [" Paris", "."],
        "target_token_id": pd.array([13, 14], dtype="int64"),
        "model": ["tiny-model"] * 2,
        "method": ["saliency"] * 2,
        "labels": ["{}"] * 2,
        "probability": pd.array([0.5, 0.25], dtype="float32"),
        "entropy": pd.array([1.5, 2.0], dtype="float32"),
    })


def test_step_score_frame_long_form():
    long = step_score_frame(make_step_scores())

    assert list(long.columns) == ["job_id", "sequence_idx", "target_idx", "target_token", "score_name", "value"]
    assert long["score_name"].tolist() == ["probability", "probability", "entropy", "entropy"]
    assert long["target_idx"].tolist() == [3, 4, 3, 4]
    assert long["target_token"].tolist() == [" Paris", ".", " Paris", "."]
    assert long["value"].tolist() == [0.5, 0.25, 1.5, 2.0]


def test_step_score_frame_no_scores():
    wide = make_step_scores().drop(columns=["probability", "entropy"])

    long = step_score_frame(wide)

    assert long.empty
    assert list(long.columns) == ["job_id", "sequence_idx", "target_idx", "target_token", "score_name", "value"]
