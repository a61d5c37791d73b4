"""The config and tokenizer read without transformers give what transformers gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dyntree.model import ModelConfig
from dyntree.tokenizer import LightTokenizer, load_tokenizer, read_hf_config

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Écris un haïku sur l'été 🌞\n\n  with  spaces "}],
    [{"role": "user", "content": "<|im_start|>user tokens inside <|im_end|> text"}],
]
TEXTS = ["plain text", "  leading spaces and\ttabs\n", "<|im_start|>assistant\nhi<|im_end|>", "数字 123 émoji 🌞", ""]


def same_config(a: ModelConfig, b: ModelConfig) -> bool:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            if not torch.equal(value, other):
                return False
        elif value != other:
            return False
    return True


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_model):
    from transformers import AutoTokenizer

    light = default_model.tokenizer
    assert isinstance(light, LightTokenizer), "the default model should not need transformers to tokenize"
    full = AutoTokenizer.from_pretrained(default_model.model_dir)
    for chat in CHATS:
        for generation_prompt in (True, False):
            expected = full.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
            expected = expected if isinstance(expected, list) else expected["input_ids"]
            assert light.apply_chat_template(chat, add_generation_prompt=generation_prompt) == list(expected)
            assert light.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False) == \
                full.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
    for text in TEXTS:
        for special in (True, False):
            ids = light(text, add_special_tokens=special)["input_ids"]
            assert ids == full(text, add_special_tokens=special)["input_ids"]
    ids = light.apply_chat_template(CHATS[2], add_generation_prompt=True)
    for skip in (True, False):
        assert light.decode(ids, skip_special_tokens=skip) == full.decode(ids, skip_special_tokens=skip)
    assert light.decode(torch.tensor(ids)) == full.decode(ids)
    assert light(TEXTS[:2])["input_ids"] == full(TEXTS[:2])["input_ids"]  # a batch goes to transformers
    assert light.eos_token_id == full.eos_token_id
    assert len(light) == len(full)  # handed to transformers' tokenizer


@pytest.mark.slow
def test_default_model_config_matches_transformers(default_model):
    from transformers import AutoConfig

    plain = read_hf_config(default_model.model_dir)
    assert not hasattr(plain, "to_dict"), "the default config should be read as plain JSON"
    assert same_config(ModelConfig.from_hf(plain), ModelConfig.from_hf(AutoConfig.from_pretrained(default_model.model_dir)))


def test_tiny_model_dir_config_and_tokenizer(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert same_config(ModelConfig.from_hf(read_hf_config(tiny_model_dir)),
                       ModelConfig.from_hf(AutoConfig.from_pretrained(tiny_model_dir)))
    tok, full = load_tokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ("w3 w4 w5", "w7  w9 unknown"):
        assert tok(text)["input_ids"] == full(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == \
            full.decode(full(text)["input_ids"], skip_special_tokens=True)


def test_rope_scaling_goes_to_transformers(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data.pop("rope_parameters", None)
    data["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    data["rope_theta"] = 10000.0
    path.write_text(json.dumps(data))
    config = read_hf_config(tmp_path / "m")
    assert hasattr(config, "to_dict")  # transformers' config: it computes the scaled frequencies
    scaled = ModelConfig.from_hf(config)
    plain = ModelConfig.from_hf(read_hf_config(tiny_model_dir))
    assert torch.allclose(scaled.inv_freq, plain.inv_freq / 2)


def test_unknown_tokenizer_class_goes_to_transformers(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["add_bos_token"] = True  # transformers changes the post-processor for this: not plain tokenizer.json
    path.write_text(json.dumps(data))
    assert LightTokenizer.open(tmp_path / "m") is None
    assert not isinstance(load_tokenizer(tmp_path / "m"), LightTokenizer)


def test_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    from dyntree.errors import DynTreeError

    with pytest.raises(DynTreeError, match="cannot read"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(DynTreeError, match="not a JSON object"):
        read_hf_config(tmp_path)
