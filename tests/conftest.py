"""Shared fixtures: tiny random Llama-family models (fast) and the default model (slow, cached once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dyntree.model import ModelConfig, Transformer

TINY_VOCAB = 128


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (they are scripts, not a package); registered in
    sys.modules because dataclasses look their module up there."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_hf_config(model_type: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return cls(**base)


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides)).eval()
    if model_type == "qwen2" or overrides.get("attention_bias") or overrides.get("mlp_bias"):
        with torch.no_grad():  # make the biases matter
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    return model


def backbone_from_hf(hf_model) -> Transformer:
    return Transformer(ModelConfig.from_hf(hf_model.config), hf_model.state_dict())


@pytest.fixture(scope="session")
def tiny_hf():
    return tiny_hf_model()


@pytest.fixture(scope="session")
def tiny_backbone(tiny_hf):
    return backbone_from_hf(tiny_hf)


def write_tiny_model_dir(path: Path, hf_model) -> Path:
    """A complete Hugging Face directory (weights, config, word-level tokenizer) for CLI/API tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf_model.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, hf_model.config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_hf):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_hf)


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct (converted from GGUF on first use, then cached)."""
    from dyntree.loading import load_model

    return load_model("default")


def tiny_model_with_heads():
    """A 2-layer Llama (vocab 64) with 4 random heads: for tree tests that need real forwards."""
    from dyntree.heads import MedusaHeads
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=None, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    backbone = Transformer(ModelConfig.from_hf(cfg), hf.state_dict())
    heads = MedusaHeads.random(backbone.config, num_heads=4, scale=0.02)
    return backbone, heads
