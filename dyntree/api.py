"""The Python entry point: `DynTree.from_pretrained(...)`, then `.generate(...)` or `.stream(...)`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .decoding import Decoder, GenerationStats
from .errors import DynTreeError
from .heads import MedusaHeads, load_heads
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .proposal import Proposer, RootOnlyProposer, StaticTreeProposer
from .sampling import SamplingConfig
from .trees import StaticTree, load_tree_spec

DEFAULT_TREE = "mc_sim_7b_63"  # what tree="static" means
DEFAULT_POLICY = "dynamic"  # the tree used when none is named: the fastest on CPU (docs/dynamic-trees.md)
DEFAULT_TOPK = 10
RANDOM_HEADS = "random"
NO_HEADS = "none"


def bundled_heads_dir() -> Path | None:
    """Trained heads shipped for the default model, if this build has them."""
    path = Path(__file__).resolve().parent / "assets" / "heads" / "smollm2-135m-instruct"
    return path if (path / "heads.json").is_file() else None


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: GenerationStats


@dataclass
class TextChunk:
    """A streamed piece: the tokens one forward pass accepted and the text they add."""

    token_ids: list[int]
    text: str


def build_proposer(tree, heads: MedusaHeads | None, topk: int | None = None, **options) -> Proposer:
    """`tree`: "ar" (no tree), "static" (Medusa's 63-node tree; "static:N" its first N nodes), "dynamic"
    (built every step; `options`: tree_size, temperature, score, calibration, learn, lookup), a built-in name,
    a JSON file or a path list.

    `topk` (guesses per head) defaults to 10 for static trees and to the measured best for dynamic ones.
    """
    if tree in (None, "ar") or heads is None:
        return RootOnlyProposer()
    if tree == "static":
        tree = DEFAULT_TREE
    elif isinstance(tree, str) and tree.startswith("static:"):  # "static:8": Medusa's tree, first 8 nodes
        tree = DEFAULT_TREE + tree[len("static"):]
    if tree == "dynamic":
        from .trees.dynamic import DEFAULT_TOPK as DYNAMIC_TOPK  # noqa: PLC0415 - optional stage
        from .trees.dynamic import DynamicTreeProposer  # noqa: PLC0415

        return DynamicTreeProposer(num_heads=heads.num_heads, topk=topk or DYNAMIC_TOPK, **options)
    if options:
        raise DynTreeError(f"{', '.join(sorted(options))} only apply to the dynamic tree (--tree dynamic)")
    topk = topk or DEFAULT_TOPK
    name, paths = load_tree_spec(tree)
    return StaticTreeProposer(StaticTree.build(paths, topk, heads.num_heads, name))


AUTO_MAX_TREE_SIZE = 32


def auto_size_options(backbone, heads: MedusaHeads | None, topk: int | None, options: dict) -> dict:
    """Turn `tree_size="auto"` / `"auto:N"` into a maximum size plus a latency model for this machine.

    Without a `latency` option the step latency is measured here (a few seconds); the score defaults to
    calibrated acceptance rates ("binned", learned online), since expected tokens are read from the scores.
    """
    size = options.get("tree_size")
    if not (isinstance(size, str) and (size == "auto" or size.startswith("auto:"))):
        if isinstance(size, str):
            raise DynTreeError(f"tree size must be an integer, 'auto' or 'auto:N', got {size!r}")
        if options.get("latency") is not None:
            raise DynTreeError("a latency model only applies to --tree-size auto")
        return options
    try:
        limit = AUTO_MAX_TREE_SIZE if size == "auto" else int(size.split(":", 1)[1])
    except ValueError:
        raise DynTreeError(f"tree size must be an integer, 'auto' or 'auto:N', got {size!r}") from None
    if limit < 2:
        raise DynTreeError(f"{size}: the largest tree must have at least 2 nodes")
    from .trees.dynamic import DEFAULT_TOPK as DYNAMIC_TOPK  # noqa: PLC0415 - optional stage
    from .trees.latency import DEFAULT_SIZES, measure_latency  # noqa: PLC0415

    out = dict(options, tree_size=limit)
    out.setdefault("score", "binned")
    if out.get("latency") is None and heads is not None:
        sizes = [s for s in DEFAULT_SIZES if s < limit] + [limit]
        out["latency"] = measure_latency(backbone, heads, sizes, topk=topk or DYNAMIC_TOPK)
    return out


class DynTree:
    """A backbone with (optional) Medusa heads and a tree policy."""

    def __init__(self, model: LoadedModel, heads: MedusaHeads | None, heads_note: str = "", tree=DEFAULT_POLICY,
                 topk: int | None = None, **tree_options):
        self.model = model
        self.heads = heads
        self.heads_note = heads_note
        self.tree = tree if heads is not None else "ar"
        self.topk = topk
        self.tree_options = tree_options
        if self.tree == "dynamic":
            tree_options = auto_size_options(model.backbone, heads, topk, tree_options)
        self.proposer = build_proposer(self.tree, heads, topk, **tree_options)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = DEFAULT_MODEL, heads: str | os.PathLike | None = "auto",
                        tree=DEFAULT_POLICY, topk: int | None = None, device=None, dtype=torch.float32,
                        **tree_options) -> "DynTree":
        """Load a backbone and heads.

        heads: "auto" (the bundled trained heads for the default model, else none), a directory (ours or
        Medusa v0.1), "random" (untrained heads: shows losslessness, not speed) or None/"none".
        """
        loaded = load_model(model, device=device, dtype=dtype)
        heads_obj, note = resolve_heads(heads, loaded)
        if heads_obj is not None:
            heads_obj = heads_obj.to(loaded.backbone.device)
        return cls(loaded, heads_obj, note, tree, topk, **tree_options)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def with_tree(self, tree, topk: int | None = None, **tree_options) -> "DynTree":
        """The same model and heads with another tree policy (no reload)."""
        if topk is None and tree == self.tree:
            topk = self.topk
        return DynTree(self.model, self.heads, self.heads_note, tree, topk, **tree_options)

    def decoder(self, proposer: Proposer | None = None, sampling: SamplingConfig | None = None) -> Decoder:
        return Decoder(self.model.backbone, self.heads, proposer or self.proposer, sampling=sampling)

    # -- prompts ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: ids pass through; text gets the chat template when the model has one."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            tok = self.tokenizer
            messages = prompt if isinstance(prompt, list) else None
            if messages is None and (not isinstance(prompt, str) or not prompt.strip()):
                raise DynTreeError("empty prompt")
            use_chat = (chat if chat is not None else True) and getattr(tok, "chat_template", None)
            if messages is not None and not use_chat:
                raise DynTreeError("chat messages given but the model has no chat template")
            if use_chat:
                messages = messages or [{"role": "user", "content": prompt}]
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                    ids = ids["input_ids"]
            else:
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise DynTreeError("empty prompt")
        return list(ids)

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, chat: bool | None = None, stop_at_eos: bool = True,
                 proposer: Proposer | None = None, sampling: SamplingConfig | None = None) -> GenerationResult:
        """Decode one prompt. `sampling`: None/temperature 0 = greedy (exactly plain greedy's output); else
        lossless tree speculative sampling (the model's own distribution) or typical acceptance."""
        ids = self.encode(prompt, chat)
        run = self.decoder(proposer, sampling).run([ids], max_new_tokens, stop_at_eos).consume()
        run.stats.heads_note = self.heads_note
        tokens = run.tokens[0]
        return GenerationResult(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), run.stats)

    def stream(self, prompt, max_new_tokens: int = 128, chat: bool | None = None, stop_at_eos: bool = True,
               proposer: Proposer | None = None, stats_out: list | None = None,
               sampling: SamplingConfig | None = None) -> Iterator[TextChunk]:
        """Yield text as each forward pass accepts tokens; `stats_out` receives the run's stats at the end."""
        ids = self.encode(prompt, chat)
        run = self.decoder(proposer, sampling).run([ids], max_new_tokens, stop_at_eos)
        tokens: list[int] = []
        shown = ""
        for event in run:
            new = event.new_tokens[0]
            tokens.extend(new)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            # Hold back an incomplete UTF-8 sequence until the next token completes it.
            if text.endswith("\ufffd"):
                continue
            yield TextChunk(new, text[len(shown):])
            shown = text
        run.stats.heads_note = self.heads_note
        if stats_out is not None:
            stats_out.append(run.stats)


def resolve_heads(heads, loaded: LoadedModel) -> tuple[MedusaHeads | None, str]:
    """Turn the `heads` argument into heads (or None) and a note saying what they are."""
    if heads is None or heads == NO_HEADS:
        return None, "no heads: plain autoregressive decoding"
    if heads == RANDOM_HEADS:
        return (MedusaHeads.random(loaded.config, num_heads=4), "RANDOM untrained heads: output is exact, "
                "but they rarely guess right, so this shows losslessness, not speed")
    if heads == "auto":
        bundled = bundled_heads_dir() if loaded.name == DEFAULT_MODEL else None
        if bundled is None:
            return None, "no trained heads for this model: plain autoregressive decoding (pass --heads)"
        return load_heads(bundled, loaded.config), f"bundled heads ({bundled.name})"
    return load_heads(heads, loaded.config), f"heads from {heads}"
