"""Cold start: a fresh process loading the bundled model, without and with the converted cache."""

import statistics
import subprocess
import sys
import tempfile

COLD_START_CODE = """
import time, sys
started = time.perf_counter()
from pipeline.models import ModelCache
from pathlib import Path
ModelCache(cache_dir=Path(sys.argv[1])).get("smollm2-135m-instruct", "cpu").attribution_model("input_x_gradient")
print(time.perf_counter() - started)
"""


def cold_start(repeats: int) -> dict:
    """Time a fresh process loading the bundled model without and with the converted cache."""
    without, with_cache = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            without.append(_timed_load(cache))
            with_cache.append(_timed_load(cache))
    return {"without_cache_s": statistics.median(without), "with_cache_s": statistics.median(with_cache)}


def _timed_load(cache: str) -> float:
    output = subprocess.run([sys.executable, "-c", COLD_START_CODE, cache], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def describe(result: dict) -> list[str]:
    speed_up = result["without_cache_s"] / result["with_cache_s"]
    return [
        f"cold start, bundled model: without cache {result['without_cache_s']:.2f} s, with cache {result['with_cache_s']:.2f} s, "
        f"speed-up {speed_up:.1f}x (target >= 4x)"
    ]
