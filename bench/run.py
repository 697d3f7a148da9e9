"""Benchmarks measured side by side in one run; prints ratios with medians over repeats.

Run with `make bench` (or `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.run`). Results and
the command go in docs/benchmarks.md. Speed targets live here, never in the tests.
Parts: cold (model load in a fresh process), overhead (one job against the bare Inseq
call), throughput (many jobs against loading per job and a bare loop), cost (S3
requests), scale (a large job against a small one, in fresh processes) and, with
`--profile DIR`, profile (pyinstrument reports).
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARTS = ("cold", "overhead", "throughput", "batching", "cost", "profile", "scale")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", type=_parts, default=None, help=f"Comma-separated parts to run, from {','.join(PARTS)} (default: every part, with profile only when --profile is given).")
    parser.add_argument("--repeats", type=int, default=5, help="Repeats of the overhead measurement (median reported).")
    parser.add_argument("--cold-repeats", type=int, default=2, help="Repeats of the cold-start pair.")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="Generated tokens per text in the overhead, throughput, cost and profile parts.")
    parser.add_argument("--jobs", type=int, default=30, help="One-text jobs per throughput round and in the throughput profile.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of the throughput and batching parts; each runs every side once, and medians are reported.")
    parser.add_argument("--gguf-jobs", type=int, default=3, help="Jobs run with a fresh GGUF load each in the throughput part (0 skips them; each takes about 20 s).")
    parser.add_argument("--batch-jobs", type=int, default=30, help="Same-length one-text jobs in the batching part (not the worker's --batch-jobs group size, which stays at its default of 8).")
    parser.add_argument("--scale-sizes", type=_sizes, default=[100, 1000], help="Comma-separated input counts of the scale jobs (default: 100,1000).")
    parser.add_argument("--scale-max-new-tokens", type=int, default=3, help="Generated tokens per input in the scale jobs.")
    parser.add_argument("--chunk-size", type=int, default=50, help="Inputs per chunk in the scale jobs.")
    parser.add_argument("--cost-jobs", type=int, default=3, help="One-text jobs whose S3 requests are counted.")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="Seconds of idle worker polling whose requests are counted.")
    parser.add_argument("--torch-threads", type=int, default=None, help="Set OMP_NUM_THREADS for this process and its children (default: torch's own choice, one per core).")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR", help="Write pyinstrument text and HTML profiles to DIR (runs the profile part).")
    args = parser.parse_args(argv)

    if args.only is None:
        args.only = [part for part in PARTS if part != "profile" or args.profile is not None]
    if "profile" in args.only and args.profile is None:
        parser.error("the profile part needs --profile DIR for its reports")
    return args


def _parts(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(unknown) or value!r}; use any of {','.join(PARTS)}")
    return names


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(size) for size in value.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid sizes {value!r}; give comma-separated input counts such as 100,1000") from exc
    if not sizes or min(sizes) < 1 or max(sizes) > 1000:
        raise argparse.ArgumentTypeError(f"invalid sizes {value!r}; each must be between 1 and 1000, the most inputs one spec may list")
    return sizes


def run_part(name: str, args: argparse.Namespace) -> list[str]:
    """Run one part and return its report lines."""
    if name == "cold":
        from bench import cold_start

        return cold_start.describe(cold_start.cold_start(args.cold_repeats))
    if name == "overhead":
        from bench import overhead

        return overhead.describe(overhead.overhead(args.repeats, args.max_new_tokens))
    if name == "throughput":
        from bench import throughput

        return throughput.describe(throughput.throughput(args.jobs, args.rounds, args.max_new_tokens, args.gguf_jobs))
    if name == "batching":
        from bench import batching

        return batching.describe(batching.batched_throughput(args.batch_jobs, args.rounds))
    if name == "cost":
        from bench import s3_cost

        return s3_cost.describe(s3_cost.s3_cost(args.cost_jobs, args.idle_seconds, args.max_new_tokens))
    if name == "profile":
        from bench import profiling

        return profiling.describe(profiling.profile(args.profile, args.jobs, args.max_new_tokens))

    from bench import scale

    return scale.describe(scale.scale(args.scale_sizes, args.scale_max_new_tokens, args.chunk_size))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.torch_threads is not None:
        # torch reads this when it is first imported, which happens inside the parts.
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    print(f"parts: {','.join(args.only)}; torch threads: {args.torch_threads or 'default'}")

    for name in PARTS:
        if name not in args.only:
            continue
        started = time.perf_counter()
        for line in run_part(name, args):
            print(line)
        print(f"  ({name} took {time.perf_counter() - started:.0f} s)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
