"""Draw tokviz attribution and step score tables as matplotlib figures for papers and reports.

matplotlib is imported inside the functions, so importing this module stays cheap. Every
function returns the `matplotlib.figure.Figure` it drew and, given `path`, also writes a
PNG at 200 dpi. The figures are created through pyplot, so close them with
`matplotlib.pyplot.close(fig)` when drawing many in a loop.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.analysis import (
    AnalysisInputError,
    STEP_SCORE_META_COLUMNS,
    attribution_matrix,
    compare_methods,
    require_columns,
    select_job,
)

DPI = 200
SCORE_LABEL = "Attribution score"
ROW_AXIS_LABEL = "Input tokens"
COLUMN_AXIS_LABEL = "Generated tokens"
MISSING_CELL_COLOUR = "#e3e3e3"
MAX_ANNOTATED_CELLS = 20
MAX_LABEL_CHARS = 18
COLOUR_BAR_INCHES = 0.16

VISIBLE_WHITESPACE = {
    " ": "\u2423",
    "\n": "\u23ce",
    "\r": "\u240d",
    "\t": "\u21e5",
}


@dataclass(frozen=True)
class HeatmapLayout:
    """Sizes in inches and points that keep one heatmap readable at its token counts."""

    cell_inches: float
    font_size: float
    annotation_size: float
    row_label_inches: float
    column_label_inches: float
    annotate: bool


def format_token(token: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Make a token readable as a tick label, because bare whitespace tokens are invisible.

    Spaces become "␣", newlines "⏎", carriage returns "␍" and tabs "⇥". An empty token
    becomes "∅", a "$" is escaped so matplotlib does not read it as mathtext, and a token
    longer than `max_chars` is cut with "…".
    """
    if token == "":
        return "\u2205"

    text = "".join(VISIBLE_WHITESPACE.get(character, character) for character in token)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "\u2026"
    return text.replace("$", r"\$")


def plot_heatmap(
    attributions: pd.DataFrame,
    sequence_idx: int = 0,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    job_id: str | None = None,
):
    """Draw one sequence of one job as an input-token by generated-token heatmap.

    Scores with both signs use a diverging map centred on 0, and scores of one sign a
    sequential map from 0. Cells the table does not store (future positions) are grey.
    For encoder-decoder jobs a line separates source rows from target rows, with the
    side names on the right. Grids of up to 20 by 20 cells show their values.
    The default title names the method, the model and the sequence.
    """
    plt = _pyplot()
    frame = select_job(attributions, job_id, table="attributions")
    matrix = attribution_matrix(frame, sequence_idx)
    layout = _heatmap_layout(matrix)

    width, height = _panel_size(matrix, layout, show_row_labels=True)
    figure = plt.figure(figsize=(width, height), layout="constrained")
    axes = figure.add_subplot()
    _draw_heatmap(figure, axes, matrix, layout, show_row_labels=True)

    if title is None:
        title = _default_title(frame, sequence_idx)
    axes.set_title(title, fontsize=layout.font_size + 2)

    _save(figure, path)
    return figure


def plot_step_scores(
    step_scores: pd.DataFrame,
    sequence_idx: int = 0,
    names: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    job_id: str | None = None,
):
    """Draw one line per step score over the generated tokens of one sequence.

    `names` picks step score columns, by default all of them in table order. The x tick
    labels are the generated tokens, and the values share one y axis.
    """
    plt = _pyplot()
    require_columns(step_scores, ("job_id", "sequence_idx", "target_idx", "target_token"), "step_scores")
    frame = select_job(step_scores, job_id, table="step_scores")
    frame = _select_step_sequence(frame, sequence_idx)
    names = _step_score_names(frame, names)

    tokens = [format_token(token) for token in frame["target_token"]]
    font_size = 9 if len(tokens) <= 20 else 7.5
    width = max(5.0, 0.3 * len(tokens) + 2.5)
    figure = plt.figure(figsize=(width, 3.6), layout="constrained")
    axes = figure.add_subplot()

    positions = np.arange(len(tokens))
    for name in names:
        axes.plot(positions, frame[name].to_numpy(dtype=float), marker="o", markersize=3.5, label=name)

    axes.set_xticks(positions, tokens, rotation=_tick_rotation(len(tokens)), fontsize=font_size)
    _align_rotated_ticks(axes, len(tokens))
    axes.set_xlabel(COLUMN_AXIS_LABEL, fontsize=font_size + 1)
    axes.set_ylabel("Value", fontsize=font_size + 1)
    axes.tick_params(axis="y", labelsize=font_size)
    axes.grid(axis="y", linewidth=0.5, alpha=0.5)
    axes.legend(fontsize=font_size, frameon=False)
    axes.set_title(f"Step scores, sequence {sequence_idx}", fontsize=font_size + 2)

    _save(figure, path)
    return figure


def plot_method_comparison(
    frames: Mapping[str, pd.DataFrame],
    sequence_idx: int = 0,
    path: str | os.PathLike | None = None,
    correlate: bool = True,
):
    """Draw the heatmaps of several attribution jobs side by side, one panel per label.

    Each panel gets its own colour bar, because methods score on different scales, so a
    shared scale would flatten all but the largest. Titles are the dict labels.
    `figure.axes` lists the heatmaps first, in dict order, then their colour bars. With
    `correlate=True` the suptitle adds the Spearman rank correlation pooled over all
    cells of the sequence from `analysis.compare_methods`, which raises ComparisonError
    when the jobs differ in inputs or generated tokens. Pass `correlate=False` to draw
    such jobs without a correlation.
    """
    plt = _pyplot()
    frames = _one_job_per_label(frames)
    matrices = {label: attribution_matrix(frame, sequence_idx) for label, frame in frames.items()}
    shared_rows = _rows_match(matrices)

    layouts = {label: _heatmap_layout(matrix) for label, matrix in matrices.items()}
    layout = min(layouts.values(), key=lambda candidate: candidate.cell_inches)
    sizes = [
        _panel_size(matrix, layout, show_row_labels=(index == 0 or not shared_rows))
        for index, matrix in enumerate(matrices.values())
    ]
    width = sum(size[0] for size in sizes)
    height = max(size[1] for size in sizes) + 0.4

    figure = plt.figure(figsize=(width, height), layout="constrained")
    panels = figure.subplots(1, len(matrices), width_ratios=[size[0] for size in sizes], squeeze=False)[0]
    for index, (axes, (label, matrix)) in enumerate(zip(panels, matrices.items())):
        _draw_heatmap(figure, axes, matrix, layout, show_row_labels=(index == 0 or not shared_rows))
        axes.set_title(label, fontsize=layout.font_size + 2)

    suptitle = f"Sequence {sequence_idx}"
    if correlate and len(frames) > 1:
        suptitle += " \u00b7 " + _correlation_text(frames, sequence_idx)
    figure.suptitle(suptitle, fontsize=layout.font_size + 3)

    _save(figure, path)
    return figure


def _pyplot():
    """Import pyplot, choosing the Agg backend first when no display can show windows."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND") and not _has_display():
        matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _save(figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        figure.savefig(Path(path), dpi=DPI)


def _heatmap_layout(matrix: pd.DataFrame) -> HeatmapLayout:
    """Pick cell and font sizes from the token counts, so 10 to 60 tokens stay readable."""
    rows, columns = matrix.shape
    largest = max(rows, columns)
    annotate = rows <= MAX_ANNOTATED_CELLS and columns <= MAX_ANNOTATED_CELLS

    if largest <= 12:
        cell_inches, font_size = 0.46, 9.0
    elif largest <= 30:
        cell_inches, font_size = 0.34, 8.0
    else:
        cell_inches, font_size = 0.24, 7.0

    row_labels = [format_token(token) for token in matrix.index.get_level_values("input_token")]
    column_labels = [format_token(token) for token in matrix.columns.get_level_values("target_token")]
    return HeatmapLayout(
        cell_inches=cell_inches,
        font_size=font_size,
        annotation_size=max(5.5, font_size - 2.0),
        row_label_inches=_text_inches(row_labels, font_size),
        column_label_inches=_text_inches(column_labels, font_size),
        annotate=annotate,
    )


def _text_inches(labels: Sequence[str], font_size: float) -> float:
    """Estimate the width of the longest label, at about 0.6 em per character."""
    longest = max((len(label) for label in labels), default=1)
    return longest * font_size * 0.6 / 72


def _panel_size(matrix: pd.DataFrame, layout: HeatmapLayout, show_row_labels: bool) -> tuple[float, float]:
    rows, columns = matrix.shape
    colour_bar_inches = 1.1
    side_label_inches = 0.3
    row_label_inches = layout.row_label_inches + 0.5 if show_row_labels else 0.1

    width = columns * layout.cell_inches + row_label_inches + colour_bar_inches + side_label_inches
    height = rows * layout.cell_inches + layout.column_label_inches + 1.0
    return max(width, 3.0), max(height, 2.5)


def _colour_scale(values: np.ndarray) -> tuple[str, float, float]:
    """Choose a colour map and limits that keep 0 at the neutral colour."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "Reds", 0.0, 1.0

    low, high = float(finite.min()), float(finite.max())
    if low < 0.0 < high:
        bound = max(-low, high)
        return "RdBu_r", -bound, bound
    if high <= 0.0:
        return "Blues_r", min(low, -1e-12), 0.0
    return "Reds", 0.0, max(high, 1e-12)


def _draw_heatmap(figure, axes, matrix: pd.DataFrame, layout: HeatmapLayout, show_row_labels: bool):
    """Draw the matrix into axes with its colour bar, tick labels and side separator."""
    import matplotlib

    values = matrix.to_numpy(dtype=np.float64)
    colour_map_name, vmin, vmax = _colour_scale(values)
    colour_map = matplotlib.colormaps[colour_map_name].with_extremes(bad=MISSING_CELL_COLOUR)

    image = axes.imshow(
        np.ma.masked_invalid(values), cmap=colour_map, vmin=vmin, vmax=vmax,
        aspect="equal", interpolation="nearest",
    )
    _set_tick_labels(axes, matrix, layout, show_row_labels)
    _mark_sides(axes, matrix, layout)

    if layout.annotate:
        _annotate_cells(axes, values, image, layout)

    colour_bar = figure.colorbar(image, ax=axes, pad=0.02, aspect=_colour_bar_aspect(matrix, layout))
    colour_bar.set_label(SCORE_LABEL, fontsize=layout.font_size)
    colour_bar.ax.tick_params(labelsize=layout.font_size - 1)
    return image


def _colour_bar_aspect(matrix: pd.DataFrame, layout: HeatmapLayout) -> float:
    """Return the length to width ratio that makes the colour bar as tall as the heatmap."""
    rows, _ = matrix.shape
    return max(6.0, rows * layout.cell_inches / COLOUR_BAR_INCHES)


def _set_tick_labels(axes, matrix: pd.DataFrame, layout: HeatmapLayout, show_row_labels: bool) -> None:
    rows, columns = matrix.shape
    column_labels = [format_token(token) for token in matrix.columns.get_level_values("target_token")]
    axes.set_xticks(np.arange(columns), column_labels, rotation=_tick_rotation(columns), fontsize=layout.font_size)
    _align_rotated_ticks(axes, columns)
    axes.set_xlabel(COLUMN_AXIS_LABEL, fontsize=layout.font_size + 1)

    if show_row_labels:
        row_labels = [format_token(token) for token in matrix.index.get_level_values("input_token")]
        axes.set_yticks(np.arange(rows), row_labels, fontsize=layout.font_size)
        axes.set_ylabel(ROW_AXIS_LABEL, fontsize=layout.font_size + 1)
    else:
        axes.set_yticks(np.arange(rows), [""] * rows)

    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)


def _tick_rotation(count: int) -> float:
    return 45.0 if count <= 20 else 90.0


def _align_rotated_ticks(axes, count: int) -> None:
    """Anchor 45 degree labels at their right end, so each label ends under its column."""
    if _tick_rotation(count) == 45.0:
        for label in axes.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")


def _mark_sides(axes, matrix: pd.DataFrame, layout: HeatmapLayout) -> None:
    """Separate source rows from target rows and name both sides on the right edge."""
    sides = list(matrix.index.get_level_values("side"))
    if len(set(sides)) < 2:
        return

    boundary = next(index for index, side in enumerate(sides) if side != sides[0])
    axes.axhline(boundary - 0.5, color="black", linewidth=1.4)

    centres = [(boundary - 1) / 2, (boundary + len(sides) - 1) / 2]
    side_axis = axes.secondary_yaxis("right")
    side_axis.set_yticks(centres, [sides[0], sides[-1]], rotation=90, va="center", fontsize=layout.font_size)
    side_axis.tick_params(length=0, pad=2)
    side_axis.spines["right"].set_visible(False)


def _annotate_cells(axes, values: np.ndarray, image, layout: HeatmapLayout) -> None:
    """Write each stored value into its cell, in white on dark cells and black on light ones."""
    decimals = _annotation_decimals(values)
    rows, columns = values.shape

    for row in range(rows):
        for column in range(columns):
            value = values[row, column]
            if not np.isfinite(value):
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            luminance = 0.299 * red + 0.587 * green + 0.114 * blue
            axes.text(
                column, row, _format_score(value, decimals),
                ha="center", va="center", fontsize=layout.annotation_size,
                color="white" if luminance < 0.5 else "black",
            )


def _format_score(value: float, decimals: int) -> str:
    """Format a cell value, writing values that round to zero without a minus sign."""
    text = f"{value:.{decimals}f}"
    if float(text) == 0.0:
        text = f"{0.0:.{decimals}f}"
    return text


def _annotation_decimals(values: np.ndarray) -> int:
    """Return decimals that give the largest |value| two significant digits, from 0 to 4."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0 or finite.max() == 0.0:
        return 2
    return int(min(4, max(0, 1 - math.floor(math.log10(finite.max())))))


def _default_title(frame: pd.DataFrame, sequence_idx: int) -> str:
    parts = []
    for column in ("method", "model"):
        if column in frame.columns and frame[column].nunique() == 1:
            parts.append(str(frame[column].iloc[0]))
    parts.append(f"sequence {sequence_idx}")
    return " \u00b7 ".join(parts)


def _select_step_sequence(frame: pd.DataFrame, sequence_idx: int) -> pd.DataFrame:
    selected = frame[frame["sequence_idx"] == sequence_idx]
    if selected.empty:
        available = sorted(int(value) for value in frame["sequence_idx"].unique())
        raise AnalysisInputError(f"sequence_idx {sequence_idx} has no step score rows; pass one of {available}")
    return selected.sort_values("target_idx")


def _step_score_names(frame: pd.DataFrame, names: Sequence[str] | None) -> list[str]:
    available = [name for name in frame.columns if name not in STEP_SCORE_META_COLUMNS]
    if names is None:
        names = available
    if isinstance(names, str):
        names = [names]

    unknown = [name for name in names if name not in available]
    if unknown:
        raise AnalysisInputError(f"step scores {unknown} not found in the step_scores frame; pass names from {available}")
    if not names:
        raise AnalysisInputError("the step_scores frame has no step score columns; run the job with step scores")
    return list(names)


def _one_job_per_label(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if not isinstance(frames, Mapping) or not frames:
        raise AnalysisInputError(
            "plot_method_comparison needs a non-empty dict from method label to attributions frame, "
            f"got {type(frames).__name__}"
        )
    return {str(label): select_job(frame, table=f"attributions of {label!r}") for label, frame in frames.items()}


def _rows_match(matrices: Mapping[str, pd.DataFrame]) -> bool:
    indexes = [matrix.index for matrix in matrices.values()]
    return all(index.equals(indexes[0]) for index in indexes[1:])


def _correlation_text(frames: Mapping[str, pd.DataFrame], sequence_idx: int) -> str:
    """Return the pooled Spearman correlation of each job pair for the suptitle."""
    sequence_frames = {label: frame[frame["sequence_idx"] == sequence_idx] for label, frame in frames.items()}
    comparison = compare_methods(sequence_frames)
    pairs = comparison.pairs

    if len(pairs) == 1:
        return f"Spearman \u03c1 = {pairs['pooled_spearman'].iloc[0]:.2f} (pooled over cells)"

    values = [
        f"{row.job_a}\u2013{row.job_b} {row.pooled_spearman:.2f}"
        for row in pairs.itertuples(index=False)
    ]
    return "Spearman \u03c1 (pooled over cells): " + ", ".join(values)
