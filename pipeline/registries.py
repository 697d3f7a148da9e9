"""Inseq's own registries of methods, step scores and aggregators.

The spec is validated against what the installed Inseq offers, never against a copied
list, so a new Inseq release brings its new methods without a code change here.
Importing Inseq takes seconds, so each lookup imports it on first use and caches.
"""

from functools import cache


@cache
def attribution_methods() -> tuple[str, ...]:
    """Return the identifiers of Inseq's feature attribution methods."""
    import inseq

    return tuple(sorted(inseq.list_feature_attribution_methods()))


@cache
def step_functions() -> tuple[str, ...]:
    """Return the identifiers of Inseq's step functions (usable as step scores)."""
    import inseq

    return tuple(sorted(inseq.list_step_functions()))


@cache
def aggregators() -> tuple[str, ...]:
    """Return Inseq's aggregator and aggregation function identifiers."""
    import inseq

    names = set(inseq.list_aggregators()) | set(inseq.list_aggregation_functions())
    return tuple(sorted(names))
