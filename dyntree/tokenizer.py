"""A model's config and tokenizer read without transformers where its files allow it.

Why: importing transformers and building its `AutoConfig` and `AutoTokenizer` cost about 2 s on a 2-core
CPU, more than loading the model itself, and a user who types one question feels it before the first token.
Most checkpoints need nothing of transformers to tokenize: `tokenizer.json` is the `tokenizers` library's own
file, and the chat template is Jinja. So:

- `read_hf_config` gives the plain `config.json` when it holds every field `ModelConfig.from_hf` reads and no
  RoPE scaling (which transformers computes); otherwise transformers' `AutoConfig`.
- `LightTokenizer` encodes, decodes and renders the chat template as transformers' fast tokenizer does
  (sandboxed Jinja with trim_blocks/lstrip_blocks, the same helpers), and hands every other attribute to the
  transformers tokenizer, loaded on first such use. `load_tokenizer` takes it only for tokenizer classes that
  are exactly `tokenizer.json`, and transformers' tokenizer otherwise.

tests/test_tokenizer.py checks ids, text and configs against transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from .errors import DynTreeError

# Tokenizer classes that are tokenizer.json and nothing more (transformers 5 writes "TokenizersBackend").
PLAIN_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "rms_norm_eps", "max_position_embeddings")


def read_hf_config(model_dir: Path):
    """The checkpoint's config as attributes: the JSON itself where it is complete, else `AutoConfig`."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DynTreeError(f"cannot read {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise DynTreeError(f"cannot read {path}: not a JSON object")
    rope = data.get("rope_parameters") or {}
    plain_rope = (not data.get("rope_scaling") and isinstance(rope, dict)
                  and rope.get("rope_type", rope.get("type", "default")) == "default")
    if plain_rope and all(key in data for key in CONFIG_FIELDS):
        return SimpleNamespace(**data)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise DynTreeError(f"cannot read {path}: {exc}".splitlines()[0]) from exc


def load_tokenizer(model_dir: Path):
    """`LightTokenizer` where the files allow it, else transformers' `AutoTokenizer`."""
    light = LightTokenizer.open(model_dir)
    return light if light is not None else _transformers_tokenizer(model_dir)


def _transformers_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise DynTreeError(f"cannot load the tokenizer in {model_dir}: {exc}".splitlines()[0]) from exc


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class LightTokenizer:
    """tokenizer.json plus the chat template; anything else goes to the transformers tokenizer."""

    SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, model_dir: Path, backend, template_source: str | None, special: dict[str, str | None]):
        self.model_dir = Path(model_dir)
        self.backend = backend
        self.chat_template = template_source
        self.special = special
        self._template = None if template_source is None else _compile(template_source)
        self._full = None

    @classmethod
    def open(cls, model_dir: Path) -> "LightTokenizer | None":
        """The light tokenizer, or None where the files ask for more than tokenizer.json and Jinja."""
        model_dir = Path(model_dir)
        try:
            config = json.loads((model_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        if (config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES or config.get("clean_up_tokenization_spaces")
                or "add_bos_token" in config or "add_eos_token" in config or not (model_dir / "tokenizer.json").is_file()):
            return None
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if template is not None and not isinstance(template, str):
            return None  # several named templates: transformers chooses among them
        try:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            return cls(model_dir, backend, template, {name: _token_text(config.get(name)) for name in cls.SPECIAL})
        except Exception:  # anything unusual (template syntax, file format): transformers' own loader decides
            return None

    # -- what decoding needs -------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        token = self.special.get("eos_token")
        return None if token is None else self.backend.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs) -> dict:
        if kwargs or not isinstance(text, str):  # batches and options: transformers' own call
            return self.full(text, add_special_tokens=add_special_tokens, **kwargs)
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs:
            return self.full.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # tensors and arrays too
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs):
        """As transformers does it: render, then encode without adding special tokens (the template has them)."""
        if kwargs or self._template is None:
            return self.full.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=tokenize, **kwargs)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special.items() if v is not None})
        return self.backend.encode(text, add_special_tokens=False).ids if tokenize else text

    # -- everything else -----------------------------------------------------------------------------------
    @property
    def full(self):
        """transformers' tokenizer for these files, loaded on first use."""
        if self._full is None:
            self._full = _transformers_tokenizer(self.model_dir)
        return self._full

    def __len__(self) -> int:
        return len(self.full)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("backend", "special", "model_dir", "chat_template"):
            raise AttributeError(name)
        return getattr(self.full, name)


def _compile(source: str):
    """The template compiled the way transformers renders chat templates."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise DynTreeError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
