"""Analyse tokviz attribution and step score tables (schema version 1) with pandas.

Every function is pure: it reads DataFrames in the tokviz table schema and returns new
DataFrames or result objects, so it works the same on tables read from Parquet, on
concatenations of several jobs, and on hand-written frames in tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import ComparisonError, TokvizError

SIDES = ("source", "target")

STEP_SCORE_META_COLUMNS = (
    "job_id",
    "sequence_idx",
    "target_idx",
    "target_token",
    "target_token_id",
    "model",
    "method",
    "labels",
)

MATRIX_COLUMNS = (
    "job_id",
    "sequence_idx",
    "target_idx",
    "target_token",
    "side",
    "input_idx",
    "input_token",
    "score",
)

COMPARE_COLUMNS = MATRIX_COLUMNS + ("target_token_id", "input_token_id")

CELL_KEY = ["sequence_idx", "target_idx", "side", "input_idx"]

MISMATCH_ADVICE = (
    "compare only jobs with the same inputs and generated text "
    "(force them with generated_texts)"
)


class AnalysisInputError(TokvizError, ValueError):
    """An input table or argument does not fit the tokviz schema or the request."""


class JobSelectionError(AnalysisInputError):
    """A frame contains several jobs, or lacks the requested one, where one job is needed."""


@dataclass(frozen=True)
class MethodComparison:
    """Agreement between attribution jobs that scored the same inputs and generated tokens.

    Attributes:
        labels: job labels in input order (dict keys, or job ids for a list of frames).
        k: size of the top-k input sets compared.
        absolute: whether ranks and top-k sets used |score| instead of the stored score.
        per_token: one row per job pair and generated token with columns job_a, job_b,
            sequence_idx, target_idx, target_token, inputs (cells scored by both jobs),
            spearman and top_k_overlap.
        pairs: one row per job pair with columns job_a, job_b, tokens, cells,
            pooled_spearman (over all cells of all tokens at once), mean_spearman (mean of
            the per-token values that are not NaN) and mean_top_k_overlap.
    """

    labels: tuple[str, ...]
    k: int
    absolute: bool
    per_token: pd.DataFrame
    pairs: pd.DataFrame

    def pair(self, job_a: str, job_b: str) -> pd.Series:
        """Return the summary row of one job pair, in either order."""
        forward = (self.pairs["job_a"] == job_a) & (self.pairs["job_b"] == job_b)
        backward = (self.pairs["job_a"] == job_b) & (self.pairs["job_b"] == job_a)
        rows = self.pairs[forward | backward]

        if rows.empty:
            raise AnalysisInputError(
                f"no job pair ({job_a!r}, {job_b!r}) in this comparison; "
                f"use two of the labels {list(self.labels)}"
            )
        return rows.iloc[0]


def attribution_matrix(
    attributions: pd.DataFrame,
    sequence_idx: int = 0,
    side: str | None = None,
    job_id: str | None = None,
) -> pd.DataFrame:
    """Pivot one sequence of one job into an input-token by generated-token score matrix.

    Rows are indexed by (side, input_idx, input_token), source rows first, then target
    rows, each in position order. Columns are indexed by (target_idx, target_token) in
    position order. Cells that the table does not store, such as future positions of a
    decoder-only model, are NaN. `side` keeps only "source" or "target" rows, and
    `job_id` picks one job out of a concatenated table.
    """
    require_columns(attributions, MATRIX_COLUMNS, "attributions")
    _check_side(side)
    frame = select_job(attributions, job_id, table="attributions")
    frame = _select_sequence(frame, sequence_idx)

    if side is not None:
        frame = frame[frame["side"] == side]
        if frame.empty:
            raise AnalysisInputError(
                f"sequence {sequence_idx} has no {side!r} rows; "
                f"pass side=None or one of {sorted(attributions['side'].unique())}"
            )

    _reject_duplicate_cells(frame)
    matrix = frame.pivot(
        index=["side", "input_idx", "input_token"],
        columns=["target_idx", "target_token"],
        values="score",
    )
    return _sort_matrix(matrix)


def top_tokens(
    attributions: pd.DataFrame,
    k: int = 3,
    by: str = "step",
    absolute: bool = False,
    aggregate: str = "sum",
) -> pd.DataFrame:
    """Rank the k input tokens with the largest scores, per generated token or per sequence.

    Ranking uses the score as stored, so with signed methods the most positive inputs
    come first; `absolute=True` ranks by |score| instead. Ties go to the earlier input
    (source before target, then lower input_idx). Rows with a NaN score are skipped.

    With by="step" the result has one row per (generated token, rank) and the columns
    job_id, sequence_idx, target_idx, target_token, rank, side, input_idx, input_token,
    score, where score is the stored signed score.

    With by="sequence" each input token's scores are combined over all generated steps
    of its sequence with `aggregate` ("sum" by default, or "mean" over the steps that
    stored the token). The result has the columns job_id, sequence_idx, rank, side,
    input_idx, input_token, score, steps. Here score is the aggregate that was ranked,
    of |score| when `absolute=True`, and steps counts the steps that were combined.
    Decoder-only prompt tokens appear in every step and later tokens in fewer, so "sum"
    favours early tokens and "mean" does not.
    """
    require_columns(attributions, MATRIX_COLUMNS, "attributions")
    _check_top_k_arguments(k, by, aggregate)
    frame = attributions.dropna(subset=["score"])

    if by == "step":
        return _top_tokens_per_step(frame, k, absolute)
    return _top_tokens_per_sequence(frame, k, absolute, aggregate)


def compare_methods(
    frames: Mapping[str, pd.DataFrame] | Iterable[pd.DataFrame] | pd.DataFrame,
    k: int = 3,
    absolute: bool = False,
) -> MethodComparison:
    """Measure how far several attribution jobs agree on the same inputs and generated text.

    `frames` is a dict from label to one job's attributions, or a list of frames (or one
    concatenated frame) that is split by job_id, which then serves as the label. All jobs
    must have attributed the same input tokens and generated the same tokens, checked by
    sequence_idx, target_idx, target_token_id, side, input_idx and input_token_id.
    Otherwise ComparisonError names the first job and position that differ.

    For each pair of jobs and each generated token, the Spearman rank correlation (ranks
    with averaged ties, then Pearson) runs over the input cells that both jobs scored.
    A token with fewer than 2 such cells, or whose scores are all equal in one job, gets
    NaN, because a rank correlation is undefined there. The top-k overlap is the share of
    one job's k highest-ranked inputs that are also among the other's, using
    min(k, inputs) when a token has fewer than k inputs. `absolute=True` ranks |score|.
    """
    _check_k(k)
    jobs = _split_jobs(frames)
    _check_comparable(jobs)

    cells = _cell_table(jobs, absolute)
    per_token_parts = []
    summary_rows = []
    for job_a, job_b in itertools.combinations(jobs, 2):
        per_token = _compare_pair_per_token(cells, job_a, job_b, k)
        per_token_parts.append(per_token)
        summary_rows.append(_summarise_pair(cells, per_token, job_a, job_b))

    return MethodComparison(
        labels=tuple(jobs),
        k=k,
        absolute=absolute,
        per_token=pd.concat(per_token_parts, ignore_index=True),
        pairs=pd.DataFrame(summary_rows),
    )


def step_score_frame(step_scores: pd.DataFrame) -> pd.DataFrame:
    """Reshape the wide step score table into one row per generated token and step score.

    Every column outside the fixed step score columns (job_id, sequence_idx, target_idx,
    target_token, target_token_id, model, method, labels) counts as a step score. The
    result has the columns job_id, sequence_idx, target_idx, target_token, score_name,
    value, sorted by job, sequence, step score in table order, then target_idx.
    """
    require_columns(
        step_scores, ("job_id", "sequence_idx", "target_idx", "target_token"), "step_scores"
    )
    score_names = [name for name in step_scores.columns if name not in STEP_SCORE_META_COLUMNS]
    id_columns = ["job_id", "sequence_idx", "target_idx", "target_token"]

    long = step_scores.melt(
        id_vars=id_columns,
        value_vars=score_names,
        var_name="score_name",
        value_name="value",
    )

    score_order = {name: position for position, name in enumerate(score_names)}
    long["_score_order"] = long["score_name"].map(score_order)
    long = long.sort_values(["job_id", "sequence_idx", "_score_order", "target_idx"], kind="stable")
    return long.drop(columns="_score_order").reset_index(drop=True)


def select_job(frame: pd.DataFrame, job_id: str | None = None, table: str = "attributions") -> pd.DataFrame:
    """Return the rows of one job, because per-job views must not mix jobs silently.

    Without `job_id` the frame must contain exactly one job. `table` names the frame in
    error messages.
    """
    require_columns(frame, ("job_id",), table)
    job_ids = sorted(frame["job_id"].unique())

    if job_id is not None:
        if job_id not in job_ids:
            raise JobSelectionError(
                f"job_id {job_id!r} not found in the {table} frame, which contains {job_ids}; "
                "pass one of those"
            )
        return frame[frame["job_id"] == job_id]

    if not job_ids:
        raise JobSelectionError(f"the {table} frame is empty; pass a frame with rows of one job")
    if len(job_ids) > 1:
        raise JobSelectionError(
            f"the {table} frame contains {len(job_ids)} jobs {job_ids}; pass job_id= to choose one"
        )
    return frame


def spearman(x: Iterable[float], y: Iterable[float]) -> float:
    """Return the Spearman rank correlation of two equally long sequences.

    Pairs with a NaN on either side are dropped first. Ties get their average rank.
    The result is NaN for fewer than 2 pairs or when either side is constant.
    """
    x_values = np.asarray(x, dtype=np.float64)
    y_values = np.asarray(y, dtype=np.float64)
    if x_values.shape != y_values.shape:
        raise AnalysisInputError(
            f"spearman needs equally long inputs, got {x_values.shape} and {y_values.shape}"
        )

    valid = ~(np.isnan(x_values) | np.isnan(y_values))
    if valid.sum() < 2:
        return math.nan

    x_ranks = pd.Series(x_values[valid]).rank(method="average").to_numpy()
    y_ranks = pd.Series(y_values[valid]).rank(method="average").to_numpy()
    return _pearson(x_ranks, y_ranks)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x_centred = x - x.mean()
    y_centred = y - y.mean()
    denominator = math.sqrt(float((x_centred**2).sum() * (y_centred**2).sum()))

    if denominator == 0.0:
        return math.nan
    return float((x_centred * y_centred).sum() / denominator)


def require_columns(frame: pd.DataFrame, columns: Iterable[str], table: str) -> None:
    """Raise AnalysisInputError unless `frame` is a DataFrame with all `columns`."""
    if not isinstance(frame, pd.DataFrame):
        raise AnalysisInputError(
            f"expected the {table} table as a pandas DataFrame, got {type(frame).__name__}"
        )

    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise AnalysisInputError(
            f"the {table} frame is missing columns {missing}; "
            f"pass the tokviz {table} table (schema version 1)"
        )


def _check_side(side: str | None) -> None:
    if side is not None and side not in SIDES:
        raise AnalysisInputError(f"side must be None, 'source' or 'target', got {side!r}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AnalysisInputError(f"k must be a positive integer, got {k!r}")


def _check_top_k_arguments(k: int, by: str, aggregate: str) -> None:
    _check_k(k)
    if by not in ("step", "sequence"):
        raise AnalysisInputError(f"by must be 'step' or 'sequence', got {by!r}")
    if aggregate not in ("sum", "mean"):
        raise AnalysisInputError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")


def _select_sequence(frame: pd.DataFrame, sequence_idx: int) -> pd.DataFrame:
    selected = frame[frame["sequence_idx"] == sequence_idx]
    if selected.empty:
        available = sorted(int(value) for value in frame["sequence_idx"].unique())
        raise AnalysisInputError(
            f"sequence_idx {sequence_idx} has no attribution rows; pass one of {available}"
        )
    return selected


def _reject_duplicate_cells(frame: pd.DataFrame) -> None:
    duplicated = frame.duplicated(subset=CELL_KEY, keep=False)
    if not duplicated.any():
        return

    first = frame[duplicated].iloc[0]
    raise AnalysisInputError(
        f"the attributions frame has {int(duplicated.sum())} rows for the same cells, first at "
        f"sequence {first['sequence_idx']} target position {first['target_idx']} "
        f"{first['side']} input position {first['input_idx']}; pass each job's rows once"
    )


def _side_rank(side: str) -> int:
    if side in SIDES:
        return SIDES.index(side)
    return len(SIDES)


def _sort_matrix(matrix: pd.DataFrame) -> pd.DataFrame:
    row_order = sorted(matrix.index, key=lambda row: (_side_rank(row[0]), row[1]))
    column_order = sorted(matrix.columns, key=lambda column: column[0])
    return matrix.loc[row_order, column_order]


def _ranking_key(scores: pd.Series, absolute: bool) -> pd.Series:
    if absolute:
        return scores.abs()
    return scores


def _top_tokens_per_step(frame: pd.DataFrame, k: int, absolute: bool) -> pd.DataFrame:
    group_key = ["job_id", "sequence_idx", "target_idx"]
    ordered = frame.assign(
        _key=_ranking_key(frame["score"], absolute),
        _side_rank=frame["side"].map(_side_rank),
    )
    ordered = ordered.sort_values(
        group_key + ["_key", "_side_rank", "input_idx"],
        ascending=[True, True, True, False, True, True],
    )

    top = ordered.groupby(group_key, sort=False).head(k).copy()
    top["rank"] = top.groupby(group_key, sort=False).cumcount() + 1

    columns = [
        "job_id", "sequence_idx", "target_idx", "target_token", "rank",
        "side", "input_idx", "input_token", "score",
    ]
    return top[columns].reset_index(drop=True)


def _top_tokens_per_sequence(
    frame: pd.DataFrame, k: int, absolute: bool, aggregate: str
) -> pd.DataFrame:
    input_key = ["job_id", "sequence_idx", "side", "input_idx"]
    keyed = frame.assign(_key=_ranking_key(frame["score"], absolute))

    combined = keyed.groupby(input_key, sort=False).agg(
        input_token=("input_token", "first"),
        score=("_key", aggregate),
        steps=("_key", "size"),
    )
    combined = combined.reset_index()
    combined["_side_rank"] = combined["side"].map(_side_rank)

    group_key = ["job_id", "sequence_idx"]
    combined = combined.sort_values(
        group_key + ["score", "_side_rank", "input_idx"],
        ascending=[True, True, False, True, True],
    )
    top = combined.groupby(group_key, sort=False).head(k).copy()
    top["rank"] = top.groupby(group_key, sort=False).cumcount() + 1

    columns = ["job_id", "sequence_idx", "rank", "side", "input_idx", "input_token", "score", "steps"]
    return top[columns].reset_index(drop=True)


def _split_jobs(
    frames: Mapping[str, pd.DataFrame] | Iterable[pd.DataFrame] | pd.DataFrame,
) -> dict[str, pd.DataFrame]:
    """Return one attributions frame per job label, in input order."""
    if isinstance(frames, Mapping):
        jobs = {}
        for label, frame in frames.items():
            require_columns(frame, COMPARE_COLUMNS, f"attributions of {label!r}")
            jobs[str(label)] = _single_job(label, frame)
    else:
        jobs = _split_by_job_id(frames)

    for frame in jobs.values():
        _reject_duplicate_cells(frame)

    if len(jobs) < 2:
        raise AnalysisInputError(
            f"compare_methods needs at least 2 jobs, got {len(jobs)} {list(jobs)}; "
            "pass the attributions of two or more jobs"
        )
    return jobs


def _single_job(label: str, frame: pd.DataFrame) -> pd.DataFrame:
    job_ids = sorted(frame["job_id"].unique())
    if len(job_ids) != 1:
        raise JobSelectionError(
            f"the attributions of {label!r} contain {len(job_ids)} jobs {job_ids}; "
            "pass one job's rows per label"
        )
    return frame


def _split_by_job_id(frames: Iterable[pd.DataFrame] | pd.DataFrame) -> dict[str, pd.DataFrame]:
    if isinstance(frames, pd.DataFrame):
        frames = [frames]

    jobs: dict[str, pd.DataFrame] = {}
    for frame in frames:
        require_columns(frame, COMPARE_COLUMNS, "attributions")
        for job_id, rows in frame.groupby("job_id", sort=False):
            if job_id in jobs:
                raise AnalysisInputError(
                    f"job {job_id!r} appears in more than one frame; pass each job once"
                )
            jobs[str(job_id)] = rows
    return jobs


def _check_comparable(jobs: dict[str, pd.DataFrame]) -> None:
    """Raise ComparisonError at the first job that differs from the first job."""
    labels = list(jobs)
    reference_label = labels[0]
    reference = jobs[reference_label]

    for label in labels[1:]:
        for check in (_sequence_difference, _generated_difference, _input_difference, _cell_difference):
            difference = check(reference_label, reference, label, jobs[label])
            if difference is not None:
                raise ComparisonError(f"{difference}; {MISMATCH_ADVICE}")


def _sequence_difference(
    reference_label: str, reference: pd.DataFrame, label: str, frame: pd.DataFrame
) -> str | None:
    reference_sequences = set(reference["sequence_idx"].unique())
    sequences = set(frame["sequence_idx"].unique())

    missing = sorted(reference_sequences - sequences)
    if missing:
        return f"job {label!r} has no sequence {missing[0]}, which job {reference_label!r} has"

    extra = sorted(sequences - reference_sequences)
    if extra:
        return f"job {label!r} has sequence {extra[0]}, which job {reference_label!r} lacks"
    return None


def _first_token_difference(
    reference: pd.DataFrame, other: pd.DataFrame, key: list[str], id_column: str, text_column: str
) -> pd.Series | None:
    """Return the first key row where the token ids differ or one job lacks the key, or None."""
    reference_tokens = reference.drop_duplicates(subset=key)[key + [id_column, text_column]]
    other_tokens = other.drop_duplicates(subset=key)[key + [id_column, text_column]]

    joined = reference_tokens.merge(other_tokens, on=key, how="outer", suffixes=("_ref", "_other"))
    reference_ids = joined[f"{id_column}_ref"]
    other_ids = joined[f"{id_column}_other"]
    differs = reference_ids.isna() | other_ids.isna() | (reference_ids != other_ids)

    if not differs.any():
        return None
    if "side" in key:
        joined = joined.assign(_side_rank=joined["side"].map(_side_rank))
        key = [column if column != "side" else "_side_rank" for column in key]
    return joined[differs].sort_values(key).iloc[0]


def _generated_difference(
    reference_label: str, reference: pd.DataFrame, label: str, frame: pd.DataFrame
) -> str | None:
    row = _first_token_difference(
        reference, frame, ["sequence_idx", "target_idx"], "target_token_id", "target_token"
    )
    if row is None:
        return None

    where = f"at sequence {row['sequence_idx']} position {row['target_idx']}"
    if pd.isna(row["target_token_id_other"]):
        return (
            f"job {label!r} generated nothing {where} where job {reference_label!r} "
            f"generated {row['target_token_ref']!r}"
        )
    if pd.isna(row["target_token_id_ref"]):
        return (
            f"job {label!r} generated {row['target_token_other']!r} {where} where job "
            f"{reference_label!r} generated nothing"
        )
    return (
        f"job {label!r} generated {row['target_token_other']!r} {where} where job "
        f"{reference_label!r} generated {row['target_token_ref']!r}"
    )


def _input_difference(
    reference_label: str, reference: pd.DataFrame, label: str, frame: pd.DataFrame
) -> str | None:
    row = _first_token_difference(
        reference, frame, ["sequence_idx", "side", "input_idx"], "input_token_id", "input_token"
    )
    if row is None:
        return None

    where = f"at sequence {row['sequence_idx']} {row['side']} position {row['input_idx']}"
    if pd.isna(row["input_token_id_other"]):
        return (
            f"job {label!r} attributed no input token {where} where job {reference_label!r} "
            f"attributed {row['input_token_ref']!r}"
        )
    if pd.isna(row["input_token_id_ref"]):
        return (
            f"job {label!r} attributed {row['input_token_other']!r} {where} where job "
            f"{reference_label!r} attributed no input token"
        )
    return (
        f"job {label!r} has input token {row['input_token_other']!r} {where} where job "
        f"{reference_label!r} has {row['input_token_ref']!r}"
    )


def _cell_difference(
    reference_label: str, reference: pd.DataFrame, label: str, frame: pd.DataFrame
) -> str | None:
    joined = reference[CELL_KEY].drop_duplicates().merge(
        frame[CELL_KEY].drop_duplicates(), on=CELL_KEY, how="outer", indicator=True
    )
    differs = joined[joined["_merge"] != "both"]
    if differs.empty:
        return None

    row = differs.sort_values(CELL_KEY).iloc[0]
    holder, lacker = (reference_label, label) if row["_merge"] == "left_only" else (label, reference_label)
    return (
        f"job {lacker!r} stores no score for target position {row['target_idx']} and "
        f"{row['side']} input position {row['input_idx']} at sequence {row['sequence_idx']}, "
        f"which job {holder!r} stores"
    )


def _cell_table(jobs: dict[str, pd.DataFrame], absolute: bool) -> pd.DataFrame:
    """Join all jobs into one row per cell with one float64 score column per job label."""
    columns = []
    for label, frame in jobs.items():
        scores = frame.set_index(CELL_KEY)["score"].astype(np.float64)
        columns.append(_ranking_key(scores, absolute).rename(label))
    cells = pd.concat(columns, axis=1, join="inner")

    reference = next(iter(jobs.values()))
    tokens = reference.drop_duplicates(subset=["sequence_idx", "target_idx"])
    tokens = tokens[["sequence_idx", "target_idx", "target_token"]]
    cells = cells.reset_index().merge(tokens, on=["sequence_idx", "target_idx"], how="left")
    cells["_side_rank"] = cells["side"].map(_side_rank)
    return cells.sort_values(["sequence_idx", "target_idx", "_side_rank", "input_idx"]).reset_index(drop=True)


def _top_k_overlap(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Return the share of x's top-k positions among y's, with ties to earlier positions."""
    size = min(k, len(x))
    if size == 0:
        return math.nan

    top_x = set(np.argsort(-x, kind="stable")[:size].tolist())
    top_y = set(np.argsort(-y, kind="stable")[:size].tolist())
    return len(top_x & top_y) / size


def _compare_pair_per_token(cells: pd.DataFrame, job_a: str, job_b: str, k: int) -> pd.DataFrame:
    rows = []
    for (sequence_idx, target_idx), token_cells in cells.groupby(["sequence_idx", "target_idx"], sort=True):
        valid = token_cells[[job_a, job_b]].dropna()
        scores_a = valid[job_a].to_numpy()
        scores_b = valid[job_b].to_numpy()
        rows.append(
            {
                "job_a": job_a,
                "job_b": job_b,
                "sequence_idx": sequence_idx,
                "target_idx": target_idx,
                "target_token": token_cells["target_token"].iloc[0],
                "inputs": len(valid),
                "spearman": spearman(scores_a, scores_b),
                "top_k_overlap": _top_k_overlap(scores_a, scores_b, k),
            }
        )
    return pd.DataFrame(rows)


def _summarise_pair(cells: pd.DataFrame, per_token: pd.DataFrame, job_a: str, job_b: str) -> dict:
    valid = cells[[job_a, job_b]].dropna()
    return {
        "job_a": job_a,
        "job_b": job_b,
        "tokens": len(per_token),
        "cells": len(valid),
        "pooled_spearman": spearman(valid[job_a], valid[job_b]),
        "mean_spearman": float(per_token["spearman"].mean(skipna=True)),
        "mean_top_k_overlap": float(per_token["top_k_overlap"].mean(skipna=True)),
    }
