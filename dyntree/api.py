"""The Python entry point: `DynTree.from_pretrained(...)`, then `.generate(...)` or `.stream(...)`.

Both take one prompt, or a list of prompts decoded together as one batch (docs/batching.md): `generate`
then returns one `GenerationResult` per prompt, in order, and `stream` tags each `TextChunk` with the index
of its prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


from .config import TreeConfig
from .decoding import Decoder, GenerationStats, StepSizing
from .early import build_pruner, load_early_head
from .errors import DynTreeError
from .heads import MedusaHeads
from .interop import load_heads
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .proposers import Proposer, RootOnlyProposer, build_proposer
from .sampling import SamplingConfig
from .textstream import TextStream
from .trees.sizing import TreeProfile, TreeSizer, find_profile

RANDOM_HEADS = "random"
NO_HEADS = "none"


# Trained heads shipped for the default model, by the name `--heads` takes: hydra ones (the default, "auto":
# the fastest) and Medusa ones (what Medusa's static trees and the other projects' loaders were made for).
BUNDLED_HEADS = {"hydra": "smollm2-135m-instruct", "medusa": "smollm2-135m-instruct-medusa"}
DEFAULT_HEADS = "hydra"


def bundled_heads_dir(name: str = DEFAULT_HEADS) -> Path | None:
    """Trained heads shipped for the default model under `name` ("auto" = the default set), if this build
    has them."""
    name = DEFAULT_HEADS if name == "auto" else name
    if name not in BUNDLED_HEADS:
        raise DynTreeError(f"no bundled heads named {name!r} (choose from auto, {', '.join(BUNDLED_HEADS)})")
    path = Path(__file__).resolve().parent / "assets" / "heads" / BUNDLED_HEADS[name]
    return path if (path / "heads.json").is_file() else None


def is_bundled_name(heads) -> bool:
    """Whether the `heads` argument names bundled heads rather than a directory."""
    return isinstance(heads, str) and (heads == "auto" or heads in BUNDLED_HEADS)


@dataclass
class GenerationResult:
    """One prompt's output. `stats` covers the whole run: with a batch, every result of it shares one
    `GenerationStats` (per-sequence entries such as `stop_reasons[index]` are in prompt order)."""

    token_ids: list[int]
    text: str
    stats: GenerationStats
    index: int = 0  # the prompt's position in the batch (0 for a single prompt)


@dataclass
class TextChunk:
    """A streamed piece: the tokens one forward pass accepted and the text they add; `index` says which
    prompt of a batch they belong to (always 0 for a single prompt)."""

    token_ids: list[int]
    text: str
    index: int = 0


class DynTree:
    """A backbone with (optional) Medusa heads and a tree policy (`TreeConfig`)."""

    def __init__(self, model: LoadedModel, heads: MedusaHeads | None, heads_note: str = "",
                 tree: TreeConfig | str | None = None, latency=None, tree_profile: TreeProfile | None = None,
                 early_head: tuple | None = None, sizer: TreeSizer | None = None):
        """`tree`: a `TreeConfig` or the name `TreeConfig.parse` reads; without heads, plain decoding.
        `latency`: the step-latency model for a tree of size "auto" (`TreeSizer.step_latency`).
        `tree_profile`: the heads' acceptance by tree size (`from_pretrained` sizes default trees with it).
        `early_head`: a trained early head (layer, weight, bias) that pruning at that layer ranks with
        (`training.early_head`; `from_pretrained` finds it in the heads directory), else the logit lens.
        `sizer`: this machine's tree sizing for these heads (`trees.sizing.TreeSizer`), shared by the trees
        `with_tree` makes; a new one when None."""
        config = tree if isinstance(tree, TreeConfig) else TreeConfig.parse(tree)
        self.model = model
        self.heads = heads
        self.heads_note = heads_note
        self.tree_profile = tree_profile
        self.early_head = early_head
        self.sizer = sizer if sizer is not None else TreeSizer(model.backbone, heads, tree_profile)
        self.config = config if heads is not None else TreeConfig(kind="ar")
        if heads is not None:
            heads.prepare_for(model.backbone)
        self.machine_sized = False  # set by `_build` when the tree's size came from the heads' profile
        self.proposer = build_proposer(self.config, heads.num_heads if heads is not None else None, latency,
                                       conditional=heads is not None and heads.conditional)
        self._within: dict[int, Proposer] = {}  # `proposer_within`: this tree cut to n nodes
        # ProPD early pruning (None: off); its layer is checked against this model here.
        self.pruner = build_pruner(self.config.early_prune, model.backbone, heads, early_head=early_head)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = DEFAULT_MODEL, heads: str | os.PathLike | None = "auto",
                        tree: TreeConfig | str | None = None, device=None, dtype=None,
                        weights=None, **tree_fields) -> "DynTree":
        """Load a backbone and heads.

        heads: "auto" (the bundled trained heads for the default model, else none), "hydra" / "medusa" (a
        bundled set by name: hydra is auto's), a directory (ours, Medusa v0.1 or vLLM Medusa), "random"
        (untrained heads: shows losslessness, not speed) or None/"none".
        weights: "auto" (default: the GGUF file's own blocks where the native kernels measure faster on this
        machine, else bf16 where it multiplies faster, else fp32; measured once and cached), "gguf", "q4"
        (a float checkpoint quantized to 4-bit groups: lossy), "float32", "bfloat16" or a torch dtype; greedy
        output is token-exact with plain decoding on the same weights. `dtype` is its older name.
        tree, tree_fields: a `TreeConfig`, or what `TreeConfig.parse` takes (tree="static:8",
        tree_size="auto", topk=, lookup=, early_prune="8:4" (ProPD pruning after layer 8 to the early
        top-4), ...). Checked before the model loads. A dynamic tree left at its
        default size is sized for this machine when the heads ship a profile (`TreeSizer.sized`).
        """
        config = _tree_config(tree, tree_fields)
        loaded = load_model(model, device=device, dtype=dtype, weights=weights)
        heads_obj, note = resolve_heads(heads, loaded)
        profile = early = None
        if heads_obj is not None:
            heads_obj = heads_obj.to(loaded.backbone.device)
            profile = find_profile(heads_directory(heads, loaded))
            early = _early_head_in(heads_directory(heads, loaded), loaded)
        return cls._build(loaded, heads_obj, note, config, profile, early)

    @classmethod
    def _build(cls, model: LoadedModel, heads, heads_note: str, config: TreeConfig, profile,
               early_head=None, sizer: TreeSizer | None = None) -> "DynTree":
        sizer = sizer if sizer is not None else TreeSizer(model.backbone, heads, profile)
        sized = sizer.sized(config)
        dt = cls(model, heads, heads_note, sized, sizer.step_latency(sized), profile, early_head, sizer)
        dt.machine_sized = sized is not config  # the size came from the profile: batches may be sized too
        return dt

    def with_tree(self, tree: TreeConfig | str | None = None, **tree_fields) -> "DynTree":
        """The same model and heads with another tree (no reload). A tree of the current kind keeps the
        current settings that `tree_fields` do not change; another kind starts from its defaults."""
        if isinstance(tree, TreeConfig):
            config = _tree_config(tree, tree_fields)
        else:
            changes = dict(tree_fields) if tree is None else dict(tree_fields, tree=tree)
            config = self.config.replace(**changes) if self.heads is not None else TreeConfig.parse(
                tree, **tree_fields)
        return self._build(self.model, self.heads, self.heads_note, config, self.tree_profile, self.early_head,
                           self.sizer)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def nodes_for_batch(self, batch_size: int) -> int | None:
        """Nodes per sequence for `batch_size` sequences decoded together on this machine, down to 1 (plain
        decoding); None when the heads have no profile of this tree (`TreeSizer.nodes_for_batch`)."""
        return self.sizer.nodes_for_batch(self.config, batch_size)

    def proposer_for_batch(self, batch_size: int) -> Proposer:
        """The proposer for `batch_size` sequences decoded together. A tree sized for this machine from the
        heads' profile is sized again per batch size (`nodes_for_batch`): wide batches make every node cost,
        so trees shrink, down to plain decoding (one node), at batch 1 too where plain decoding measures
        faster than every profiled tree. A size the user set is kept."""
        if not self.machine_sized:
            return self.proposer
        return self.proposer_within(self.nodes_for_batch(batch_size))

    def prepare_batch(self, batch_size: int) -> None:
        """Measure now what sizing steps of `batch_size` sequences will read (a benchmark, before timing),
        and build every cut of this tree those steps may choose."""
        if not self.machine_sized or self.nodes_for_batch(batch_size) is None:
            return
        for size in self.sizer.profile.tokens_per_pass:
            self.proposer_within(size).prepare(batch_size)
        self.proposer_within(1).prepare(batch_size)

    def proposer_within(self, nodes: int | None) -> Proposer:
        """This tree's proposer cut to at most `nodes` nodes per sequence (None: as it is; 1: plain decoding).
        Fixed-size dynamic and static trees are cut (each size built once); an auto-sized tree sizes itself."""
        proposer = self.proposer
        if nodes is None or nodes >= proposer.max_nodes:
            return proposer
        if nodes not in self._within:
            if nodes <= 1:
                self._within[nodes] = RootOnlyProposer()
            elif self.config.kind not in ("dynamic", "static") or self.config.auto:
                return proposer
            else:
                self._within[nodes] = build_proposer(self.config.replace(size=nodes), self.heads.num_heads,
                                                     conditional=self.heads.conditional)
        return self._within[nodes]

    def decoder(self, proposer: Proposer | None = None, sampling: SamplingConfig | None = None) -> Decoder:
        """A decoder of this tree (or of `proposer`). A tree sized for this machine is sized again at every
        step for the batch being decoded (`proposer_for_batch`), and each step's outcome corrects that sizing."""
        sizing = None
        if proposer is None and self.machine_sized:
            sizing = StepSizing(self.proposer_for_batch, self.observe_step)
        return Decoder(self.model.backbone, self.heads, proposer or self.proposer, sampling=sampling,
                       pruner=self.pruner, sizing=sizing)

    def observe_step(self, batch_size: int, nodes: int, seconds: float, tokens_per_row: float) -> None:
        """What a step of this tree did (`TreeSizer.observe`): later sizing is corrected by it."""
        self.sizer.observe(self.config, batch_size, nodes, seconds, tokens_per_row)

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
    def encode_batch(self, prompts, chat: bool | None = None) -> tuple[list[list[int]], bool]:
        """Token ids of one prompt or of a list of prompts, and whether it was a list (`is_prompt_list`)."""
        if is_prompt_list(prompts):
            if not prompts:
                raise DynTreeError("no prompt given (an empty list)")
            return [self.encode(p, chat) for p in prompts], True
        return [self.encode(prompts, chat)], False

    def generate(self, prompt, max_new_tokens: int = 128, chat: bool | None = None, stop_at_eos: bool = True,
                 proposer: Proposer | None = None, sampling: SamplingConfig | None = None):
        """Decode one prompt (-> a `GenerationResult`), or a list of prompts together as one batch (-> a list
        of them, in order; each sequence stops on its own). `sampling`: None/temperature 0 = greedy (exactly
        plain greedy's output, sequence by sequence); else lossless tree speculative sampling (the model's own
        distribution) or typical acceptance, one seeded generator for the whole batch."""
        ids, many = self.encode_batch(prompt, chat)
        run = self.decoder(proposer, sampling).run(ids, max_new_tokens, stop_at_eos).consume()
        run.stats.heads_note = self.heads_note
        results = [GenerationResult(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), run.stats, b)
                   for b, tokens in enumerate(run.tokens)]
        return results if many else results[0]

    def stream(self, prompt, max_new_tokens: int = 128, chat: bool | None = None, stop_at_eos: bool = True,
               proposer: Proposer | None = None, stats_out: list | None = None,
               sampling: SamplingConfig | None = None) -> Iterator[TextChunk]:
        """Yield text as each forward pass accepts tokens; `stats_out` receives the run's stats at the end.
        With a list of prompts (one batch) every chunk carries its prompt's `index`; within a pass, chunks
        come in prompt order."""
        ids, _ = self.encode_batch(prompt, chat)
        run = self.decoder(proposer, sampling).run(ids, max_new_tokens, stop_at_eos)
        texts = [TextStream(self.tokenizer) for _ in ids]
        done = [False] * len(ids)
        for event in run:
            for b, text in enumerate(texts):
                if done[b]:
                    continue  # a finished sequence adds nothing more
                done[b] = event.finished[b]
                delta = text.push(event.new_tokens[b], finished=event.finished[b])
                if delta is not None and (delta.text or delta.token_ids):
                    yield TextChunk(delta.token_ids, delta.text, b)
        for b, text in enumerate(texts):
            delta = text.push([], finished=True)  # a run cut short (context limit) may still hold text back
            if delta is not None and (delta.text or delta.token_ids):
                yield TextChunk(delta.token_ids, delta.text, b)
        run.stats.heads_note = self.heads_note
        if stats_out is not None:
            stats_out.append(run.stats)


def is_prompt_list(prompt) -> bool:
    """Whether `prompt` is several prompts: a list of texts, of token-id lists or of chat-message lists (one
    prompt is a text, a list of token ids or a list of chat messages)."""
    if not isinstance(prompt, (list, tuple)):
        return False
    if not prompt:
        return True
    return all(isinstance(p, str) or (isinstance(p, (list, tuple)) and not isinstance(p, str)) for p in prompt)


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
    if is_bundled_name(heads):  # "medusa", "hydra": a named bundled set, which must exist
        if loaded.name != DEFAULT_MODEL:
            raise DynTreeError(f"the bundled {heads} heads are for the default model; pass a heads directory "
                               f"for {loaded.name}")
        bundled = bundled_heads_dir(heads)
        if bundled is None:
            raise DynTreeError(f"this build has no bundled {heads} heads")
        return load_heads(bundled, loaded.config), f"bundled heads ({bundled.name})"
    return load_heads(heads, loaded.config), f"heads from {heads}"


def heads_directory(heads, loaded: LoadedModel) -> Path | None:
    """The directory the `heads` argument loads from (None for random or no heads)."""
    if is_bundled_name(heads):
        return bundled_heads_dir(heads) if loaded.name == DEFAULT_MODEL else None
    if heads in (None, NO_HEADS, RANDOM_HEADS):
        return None
    return Path(heads).expanduser()


def _early_head_in(directory: Path | None, loaded: LoadedModel):
    """The trained early head saved beside the heads (`dyntree train --early-layer`), if any."""
    if directory is None:
        return None
    return load_early_head(directory, loaded.config)


def _tree_config(tree, tree_fields: dict) -> TreeConfig:
    if isinstance(tree, TreeConfig):
        return tree.replace(**tree_fields) if tree_fields else tree
    return TreeConfig.parse(tree, **tree_fields)
