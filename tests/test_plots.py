"""Tests for pipeline.plots: figure structure, labels and values on hand-written tables."""

import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from pipeline.analysis import AnalysisInputError, JobSelectionError  # noqa: E402
from pipeline.errors import ComparisonError  # noqa: E402
from pipeline.plots import (  # noqa: E402
    format_token,
    plot_heatmap,
    plot_method_comparison,
    plot_step_scores,
)

# Step 3 ranks a [2, 3, 1] vs b [3, 1, 2]. Step 4 ranks a [2, 1, 4, 3] vs b [1, 2, 3, 4].
STEPS_A = [
    (3, " Paris", [("target", 0, "The", 0.25), ("target", 1, " capital", 0.5), ("target", 2, " is", -0.75)]),
    (4, "\n", [
        ("target", 0, "The", 0.125), ("target", 1, " capital", -0.25),
        ("target", 2, " is", 0.5), ("target", 3, " Paris", 0.375),
    ]),
]

STEPS_B = [
    (3, " Paris", [("target", 0, "The", 0.5), ("target", 1, " capital", 0.125), ("target", 2, " is", 0.25)]),
    (4, "\n", [
        ("target", 0, "The", 0.0), ("target", 1, " capital", 0.25),
        ("target", 2, " is", 0.5), ("target", 3, " Paris", 0.75),
    ]),
]

SEQ2SEQ_STEPS = [
    (1, "Hallo", [("source", 0, "Hello", 0.5), ("source", 1, "</s>", 0.25), ("target", 0, "<pad>", 0.125)]),
    (2, "</s>", [
        ("source", 0, "Hello", 0.125), ("source", 1, "</s>", 0.75),
        ("target", 0, "<pad>", 0.0), ("target", 1, "Hallo", 0.25),
    ]),
]


def make_attributions(job_id, steps, method="saliency"):
    """Build an attributions table in the tokviz schema, with token ids from the token text."""
    rows = []
    for target_idx, target_token, cells in steps:
        for side, input_idx, input_token, score in cells:
            rows.append({
                "job_id": job_id, "sequence_idx": 0, "target_idx": target_idx,
                "target_token": target_token, "target_token_id": sum(map(ord, target_token)),
                "side": side, "input_idx": input_idx, "input_token": input_token,
                "input_token_id": sum(map(ord, input_token)), "score": score,
                "model": "tiny-model", "method": method, "labels": "{}",
            })
    return pd.DataFrame(rows).astype({"score": "float32"})


def make_square(job_id, size):
    """Build a decoder-only job with `size` prompt tokens and `size` generated tokens."""
    tokens = [f" t{index}" for index in range(2 * size)]
    steps = []
    for target_idx in range(size, 2 * size):
        cells = [("target", index, tokens[index], float(index % 5) / 4) for index in range(target_idx)]
        steps.append((target_idx, tokens[target_idx], cells))
    return make_attributions(job_id, steps)


def make_step_scores():
    return pd.DataFrame({
        "job_id": ["a", "a", "a"],
        "sequence_idx": [0, 0, 0],
        "target_idx": [5, 3, 4],
        "target_token": ["!", " Paris", "\n"],
        "target_token_id": [1, 2, 3],
        "model": ["tiny-model"] * 3,
        "method": ["saliency"] * 3,
        "labels": ["{}"] * 3,
        "probability": np.array([0.75, 0.5, 0.25], dtype="float32"),
        "entropy": np.array([0.5, 1.5, 2.0], dtype="float32"),
    })


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def tick_texts(labels):
    return [label.get_text() for label in labels]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (" Paris", "\u2423Paris"),
        ("\n", "\u23ce"),
        ("\t x", "\u21e5\u2423x"),
        ("", "\u2205"),
        ("$5", r"\$5"),
        ("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopq\u2026"),
    ],
)
def test_format_token(token, expected):
    assert format_token(token) == expected


def test_heatmap_structure():
    figure = plot_heatmap(make_attributions("a", STEPS_A))
    heatmap, colour_bar = figure.axes

    assert len(figure.axes) == 2
    assert heatmap.get_xlabel() == "Generated tokens"
    assert heatmap.get_ylabel() == "Input tokens"
    assert tick_texts(heatmap.get_xticklabels()) == ["\u2423Paris", "\u23ce"]
    assert tick_texts(heatmap.get_yticklabels()) == ["The", "\u2423capital", "\u2423is", "\u2423Paris"]
    assert colour_bar.get_ylabel() == "Attribution score"
    assert heatmap.get_title() == "saliency \u00b7 tiny-model \u00b7 sequence 0"


def test_heatmap_values_and_nan():
    figure = plot_heatmap(make_attributions("a", STEPS_A))
    data = figure.axes[0].images[0].get_array()

    assert data.shape == (4, 2)
    assert data.mask.tolist() == [[False, False], [False, False], [False, False], [True, False]]
    assert data[:, 1].tolist() == [0.125, -0.25, 0.5, 0.375]


def test_heatmap_signed_scale_centred():
    image = plot_heatmap(make_attributions("a", STEPS_A)).axes[0].images[0]

    assert image.norm.vmin == -0.75
    assert image.norm.vmax == 0.75


def test_heatmap_positive_scale_from_zero():
    image = plot_heatmap(make_attributions("b", STEPS_B)).axes[0].images[0]

    assert image.norm.vmin == 0.0
    assert image.norm.vmax == 0.75


def test_heatmap_annotations_small_grid():
    heatmap = plot_heatmap(make_attributions("a", STEPS_A)).axes[0]

    # The 7 stored cells get two decimals, because the largest |score| is 0.75.
    assert sorted(text.get_text() for text in heatmap.texts) == sorted(
        ["0.25", "0.50", "-0.75", "0.12", "-0.25", "0.50", "0.38"]
    )


def test_heatmap_no_annotations_large_grid():
    heatmap = plot_heatmap(make_square("big", 21)).axes[0]

    assert len(heatmap.texts) == 0
    assert len(heatmap.get_xticklabels()) == 21
    assert len(heatmap.get_yticklabels()) == 41


def test_heatmap_size_grows_with_tokens():
    small = plot_heatmap(make_square("small", 10)).get_size_inches()
    large = plot_heatmap(make_square("large", 40)).get_size_inches()

    assert large[0] > small[0]
    assert large[1] > small[1]


def test_heatmap_source_target_separator():
    figure = plot_heatmap(make_attributions("t5", SEQ2SEQ_STEPS))
    heatmap = figure.axes[0]

    assert len(figure.axes) == 2
    assert tick_texts(heatmap.get_yticklabels()) == ["Hello", "</s>", "<pad>", "Hallo"]
    assert len(heatmap.lines) == 1
    assert list(heatmap.lines[0].get_ydata()) == [1.5, 1.5]
    assert tick_texts(heatmap.child_axes[0].get_yticklabels()) == ["source", "target"]


def test_heatmap_decoder_has_no_separator():
    heatmap = plot_heatmap(make_attributions("a", STEPS_A)).axes[0]

    assert len(heatmap.lines) == 0
    assert len(heatmap.child_axes) == 0


def test_heatmap_title_and_png(tmp_path):
    path = tmp_path / "heatmap.png"

    figure = plot_heatmap(make_attributions("a", STEPS_A), title="Saliency", path=path)

    assert figure.axes[0].get_title() == "Saliency"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_png_dpi(tmp_path):
    path = tmp_path / "heatmap.png"
    figure = plot_heatmap(make_attributions("a", STEPS_A), path=path)

    width = int.from_bytes(path.read_bytes()[16:20], "big")

    assert width == round(figure.get_size_inches()[0] * 200)


def test_heatmap_several_jobs():
    both = pd.concat([make_attributions("a", STEPS_A), make_attributions("b", STEPS_B)])

    with pytest.raises(JobSelectionError, match="pass job_id= to choose one"):
        plot_heatmap(both)


def test_heatmap_job_id():
    both = pd.concat([make_attributions("a", STEPS_A), make_attributions("b", STEPS_B)])

    data = plot_heatmap(both, job_id="b").axes[0].images[0].get_array()

    assert data[:, 1].tolist() == [0.0, 0.25, 0.5, 0.75]


def test_step_scores_structure():
    figure = plot_step_scores(make_step_scores())
    axes = figure.axes[0]

    assert len(figure.axes) == 1
    assert [line.get_label() for line in axes.get_lines()] == ["probability", "entropy"]
    assert tick_texts(axes.get_xticklabels()) == ["\u2423Paris", "\u23ce", "!"]
    assert axes.get_xlabel() == "Generated tokens"
    assert axes.get_ylabel() == "Value"


def test_step_scores_sorted_values():
    axes = plot_step_scores(make_step_scores()).axes[0]
    probability, entropy = axes.get_lines()

    assert list(probability.get_ydata()) == [0.5, 0.25, 0.75]
    assert list(entropy.get_ydata()) == [1.5, 2.0, 0.5]


def test_step_scores_names_filter():
    axes = plot_step_scores(make_step_scores(), names=["entropy"]).axes[0]

    assert [line.get_label() for line in axes.get_lines()] == ["entropy"]


def test_step_scores_unknown_name():
    with pytest.raises(AnalysisInputError, match=r"step scores \['logit'\] not found in the step_scores frame"):
        plot_step_scores(make_step_scores(), names=["logit"])


def test_step_scores_png(tmp_path):
    path = tmp_path / "steps.png"

    plot_step_scores(make_step_scores(), path=path)

    assert path.read_bytes()[:4] == b"\x89PNG"


def test_comparison_structure():
    figure = plot_method_comparison({
        "Saliency": make_attributions("a", STEPS_A),
        "Integrated gradients": make_attributions("b", STEPS_B, method="integrated_gradients"),
    })
    left, right, left_bar, right_bar = figure.axes

    assert len(figure.axes) == 4
    assert left.get_title() == "Saliency"
    assert right.get_title() == "Integrated gradients"
    assert left_bar.get_ylabel() == "Attribution score"
    assert right_bar.get_ylabel() == "Attribution score"
    assert tick_texts(left.get_yticklabels()) == ["The", "\u2423capital", "\u2423is", "\u2423Paris"]
    assert tick_texts(right.get_yticklabels()) == ["", "", "", ""]
    assert tick_texts(right.get_xticklabels()) == ["\u2423Paris", "\u23ce"]


def test_comparison_own_colour_scales():
    figure = plot_method_comparison({"a": make_attributions("a", STEPS_A), "b": make_attributions("b", STEPS_B)})
    left_image = figure.axes[0].images[0]
    right_image = figure.axes[1].images[0]

    assert (left_image.norm.vmin, left_image.norm.vmax) == (-0.75, 0.75)
    assert (right_image.norm.vmin, right_image.norm.vmax) == (0.0, 0.75)


def test_comparison_suptitle_correlation():
    figure = plot_method_comparison({"a": make_attributions("a", STEPS_A), "b": make_attributions("b", STEPS_B)})
    ranks_a = [4, 6.5, 1, 3, 2, 6.5, 5]
    ranks_b = [5.5, 2, 3.5, 1, 3.5, 5.5, 7]
    expected = np.corrcoef(ranks_a, ranks_b)[0, 1]

    assert figure.get_suptitle() == f"Sequence 0 \u00b7 Spearman \u03c1 = {expected:.2f} (pooled over cells)"


def test_comparison_three_methods():
    figure = plot_method_comparison({
        "a": make_attributions("a", STEPS_A),
        "b": make_attributions("b", STEPS_B),
        "c": make_attributions("c", STEPS_A),
    })

    a_b = np.corrcoef([4, 6.5, 1, 3, 2, 6.5, 5], [5.5, 2, 3.5, 1, 3.5, 5.5, 7])[0, 1]
    expected = f"Sequence 0 \u00b7 Spearman \u03c1 (pooled over cells): a\u2013b {a_b:.2f}, a\u2013c 1.00, b\u2013c {a_b:.2f}"

    assert len(figure.axes) == 6
    assert figure.get_suptitle() == expected


def test_comparison_mismatch_raises():
    changed = [STEPS_B[0], (4, " Rome", STEPS_B[1][2])]

    with pytest.raises(ComparisonError, match="job 'b' generated ' Rome' at sequence 0 position 4"):
        plot_method_comparison({"a": make_attributions("a", STEPS_A), "b": make_attributions("b", changed)})


def test_comparison_without_correlation():
    changed = [STEPS_B[0], (4, " Rome", STEPS_B[1][2])]

    figure = plot_method_comparison(
        {"a": make_attributions("a", STEPS_A), "b": make_attributions("b", changed)}, correlate=False
    )

    assert figure.get_suptitle() == "Sequence 0"
    assert tick_texts(figure.axes[1].get_xticklabels()) == ["\u2423Paris", "\u2423Rome"]


def test_comparison_needs_dict():
    with pytest.raises(AnalysisInputError, match="needs a non-empty dict"):
        plot_method_comparison([make_attributions("a", STEPS_A)])
