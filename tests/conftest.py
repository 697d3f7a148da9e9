"""Shared fixtures: a moto S3 server process, tiny models, workers.

The moto server runs as a separate process on 127.0.0.1 and is reached over HTTP, as a
user's worker reaches S3. Tiny models are built from configs with a tokenizer trained
here, saved to disk and loaded through the same code path as any local model.
"""

import itertools
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("TOKVIZ_ENDPOINT_URL", None)

import pytest

from pipeline.layout import BucketLayout
from pipeline.local_s3 import LocalS3
from pipeline.store import ObjectStore, make_client

_bucket_numbers = itertools.count()

TRAINING_TEXTS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "A cat sat on the mat and looked at the dog.",
    "Café naïve résumé, 東京 and 北京, emoji 😀 🚀 too!",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
]


@pytest.fixture(scope="session")
def moto_server():
    with LocalS3() as server:
        yield server


@pytest.fixture
def bucket(moto_server, request) -> str:
    """A fresh, empty bucket for each test, so tests never see each other's jobs."""
    name = f"test-{next(_bucket_numbers)}-{os.getpid()}"
    moto_server.create_bucket(name)
    return name


@pytest.fixture
def store(moto_server, bucket) -> ObjectStore:
    return ObjectStore(make_client(moto_server.endpoint_url), bucket)


@pytest.fixture
def layout() -> BucketLayout:
    return BucketLayout("")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few sentences, saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TRAINING_TEXTS * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")

    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def causal_model_dir(tokenizer_dir, tmp_path_factory):
    """A 2-layer GPT-2 with random weights, saved next to the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()

    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def seq2seq_model_dir(tokenizer_dir, tmp_path_factory):
    """A 1-layer BART encoder-decoder with random weights, saved next to the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
    )
    model = BartForConditionalGeneration(config).eval()

    path = tmp_path_factory.mktemp("tiny-bart")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One warm model cache for the whole session, as a long-running worker has."""
    from pipeline.models import ModelCache

    return ModelCache(cache_dir=tmp_path_factory.mktemp("model-cache"), max_models=4)


@pytest.fixture
def make_worker(store, layout, model_cache):
    """Build workers on the test bucket that may load the tiny local models."""
    from pipeline.worker import Worker, WorkerConfig

    def build(**settings) -> Worker:
        config = WorkerConfig(allow_local_models=True, lease_seconds=settings.pop("lease_seconds", 30), **settings)
        return Worker(store, layout, config, model_cache)

    return build


@pytest.fixture
def client(moto_server, bucket):
    from pipeline.client import Client

    return Client(bucket, endpoint_url=moto_server.endpoint_url)
