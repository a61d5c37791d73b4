"""Tiny models, tokenizers and datasets for the training tests (kept apart from conftest.py on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small prompt files kept in the repository
VOCAB = 96
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_llama(seed: int = 0, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are far from ties
        model.lm_head.weight.mul_(20)
    return model


def write_model_dir(path: Path, seed: int = 0, vocab: int = VOCAB, word_prefix: str = "w") -> Path:
    """A Hugging Face directory with weights, config and a word-level tokenizer that has a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_llama(seed, vocab).save_pretrained(path)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    words = {t: i for i, t in enumerate(specials)}
    words.update({f"{word_prefix}{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = 4  # <|im_end|> ends a turn, as in SmolLM2
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_prompt_file(path: Path, count: int, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        n = int(torch.randint(2, 9, (1,), generator=gen))
        words = " ".join(f"w{int(t)}" for t in torch.randint(7, VOCAB, (n,), generator=gen))
        rows.append({"prompt": f"{words} w{7 + i % 50}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
