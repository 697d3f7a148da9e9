"""The real bundled SmolLM2-135M-Instruct, end to end, loaded once for the module."""

import numpy as np
import pytest

from tests.test_correctness import assert_same_scores, table_scores

pytestmark = pytest.mark.slow

TEXT = "The capital of France is"
UNICODE_TEXT = "Café naïve, 東京 and 😀"


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory):
    from pipeline.models import ModelCache

    return ModelCache(cache_dir=tmp_path_factory.mktemp("bundled-cache"))


@pytest.fixture
def bundled_worker(store, layout, bundled_cache):
    from pipeline.worker import Worker, WorkerConfig

    return Worker(store, layout, WorkerConfig(), bundled_cache)


def test_bundled_job_matches_inseq(client, bundled_worker):
    import inseq
    import transformers

    from pipeline.models import bundled_gguf_path

    job_id = client.submit(input_text=TEXT, method="input_x_gradient", step_scores=["probability"], generation_args={"max_new_tokens": 4})
    bundled_worker.poll_once()
    assert client.status(job_id)["state"] == "succeeded", client.status(job_id)["message"]

    path = bundled_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    output = inseq.load_model(model, "input_x_gradient", tokenizer=tokenizer).attribute(
        [TEXT], generation_args={"max_new_tokens": 4}, show_progress=False
    ).aggregate()
    sequence = output.sequence_attributions[0]
    matrix = sequence.target_attributions.float().numpy()
    direct = {
        (0, "target", sequence.attr_pos_start + int(step), int(row)): float(matrix[row, step])
        for row, step in zip(*np.nonzero(~np.isnan(matrix)), strict=True)
    }

    assert_same_scores(table_scores(client.table(job_id)), direct)
    generated = client.table(job_id, "sequences")["generated_text"].iloc[0]
    assert "Paris" in generated, f"SmolLM2 should continue with Paris, got {generated!r}"


def test_bundled_tokens_are_readable(client, bundled_worker):
    job_id = client.submit(input_text=UNICODE_TEXT, method="saliency", generation_args={"max_new_tokens": 2})
    bundled_worker.poll_once()

    tokens = client.table(job_id)["input_token"].unique().tolist()
    joined = "".join(tokens)
    for expected in ("é", "ï", "東", "京", "😀", " and"):
        assert expected in joined, f"{expected!r} missing from tokens {tokens}"
    for raw_marker in ("Ġ", "Ã", "æ", "ðŁ"):
        assert raw_marker not in joined, f"byte-level marker {raw_marker!r} leaked into tokens {tokens}"


def test_converted_weights_cache_reused(bundled_cache, bundled_worker, client):
    from pipeline.models import ModelCache

    client.submit(input_text=TEXT, method="saliency", generation_args={"max_new_tokens": 1})
    bundled_worker.poll_once()

    second_start = ModelCache(cache_dir=bundled_cache.cache_dir).get("smollm2-135m-instruct", "cpu")

    assert second_start.from_converted_cache, "a second cold start must load the converted weights"
