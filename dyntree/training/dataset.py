"""The self-distillation dataset: shards of token ids (and, optionally, the backbone's hidden states).

Layout of a dataset directory:
- `manifest.json`: format, the model/tokenizer fingerprint it was generated with, generation settings;
- `shard-00000.safetensors`, ...: each holds S sequences:
  `tokens` int32 [sum of lengths] (prompt + response, concatenated), `offsets` int64 [S+1],
  `prompt_lens` int32 [S], and optionally `hidden` fp16 [sum of response lengths, H] with `hidden_offsets`:
  row j of a sequence's block is the normed last hidden state at position prompt_len - 1 + j, i.e. the state
  from which the backbone predicted response token j. The shard's metadata lists the prompt keys.

A shard is written to a temporary file and renamed, so a killed run never leaves half a shard; a resumed run
skips every prompt whose key is already in a finished shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DynTreeError

MANIFEST = "manifest.json"
FORMAT = "dyntree-distill"
VERSION = 1
SHARD_GLOB = "shard-*.safetensors"


def model_fingerprint(loaded) -> dict:
    """What a dataset depends on: the tokenizer (ids) and, for stored hidden states, the backbone's weights."""
    tok = loaded.tokenizer
    cfg = loaded.config
    probe_ids = sorted({0, 1, 2, 3, 100, 1000, cfg.vocab_size // 2, cfg.vocab_size - 1})
    pieces = [str(tok.convert_ids_to_tokens(i)) for i in probe_ids if i < len(tok)]
    tok_hash = hashlib.sha1("\n".join([str(len(tok))] + pieces).encode("utf-8")).hexdigest()[:16]
    bb = loaded.backbone
    # Hashed at bf16 precision, so a model loaded in fp32 or bf16 has the same fingerprint (its states are
    # the model's own either way; `distill --dtype` records which).
    weights = torch.cat([bb.norm.flatten(), bb.embed_tokens[:4].flatten()]).to(torch.bfloat16).float()
    weight_hash = hashlib.sha1(weights.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"model": loaded.name, "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "tokenizer_hash": tok_hash, "weights_hash": weight_hash}


@dataclass
class Sequence:
    """One distilled example."""

    key: str
    source: str
    prompt_ids: list[int]
    response_ids: list[int]
    hidden: torch.Tensor | None = None  # [len(response_ids), H] fp16


@dataclass
class ShardData:
    tokens: torch.Tensor
    offsets: torch.Tensor
    prompt_lens: torch.Tensor
    keys: list[str]
    sources: list[str]
    hidden: torch.Tensor | None = None
    hidden_offsets: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.keys)

    def response_tokens(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1] - self.prompt_lens.long()).sum())


@dataclass
class DistillDataset:
    directory: Path
    manifest: dict = field(default_factory=dict)

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path) -> "DistillDataset":
        directory = Path(directory).expanduser()
        path = directory / MANIFEST
        if not path.is_file():
            raise DynTreeError(f"{directory} is not a distilled dataset (no {MANIFEST}); run `dyntree distill`")
        try:
            manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise DynTreeError(f"corrupt {path}: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise DynTreeError(f"{path} is not a dyntree distillation manifest")
        return cls(directory, manifest)

    @classmethod
    def create_or_resume(cls, directory: str | Path, fingerprint: dict, settings: dict) -> "DistillDataset":
        """Open an existing dataset made by the same model (else a clear error) or start a new one."""
        directory = Path(directory).expanduser()
        if (directory / MANIFEST).is_file():
            ds = cls.open(directory)
            ds.check_fingerprint(fingerprint, need_hidden=False)
            if ds.manifest.get("store_hidden") != settings.get("store_hidden"):
                raise DynTreeError(f"{directory} was started with store_hidden={ds.manifest.get('store_hidden')}; "
                                   "resume with the same setting or use a new directory")
            return ds
        if directory.exists() and any(not p.name.startswith("self_prompts") for p in directory.iterdir()):
            raise DynTreeError(f"{directory} exists, is not empty and holds no {MANIFEST}: choose a new directory")
        directory.mkdir(parents=True, exist_ok=True)
        ds = cls(directory, {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, **settings})
        _atomic_write_text(directory / MANIFEST, json.dumps(ds.manifest, indent=2) + "\n")
        return ds

    def check_fingerprint(self, fingerprint: dict, need_hidden: bool) -> None:
        """Token ids are only meaningful for the same tokenizer; stored states only for the same weights."""
        mine = self.manifest.get("fingerprint", {})
        for name in ("vocab_size", "tokenizer_hash"):
            if mine.get(name) != fingerprint.get(name):
                raise DynTreeError(
                    f"dataset {self.directory} was made with another tokenizer ({name}: {mine.get(name)} vs "
                    f"{fingerprint.get(name)} for model {fingerprint.get('model')!r})")
        if need_hidden and (mine.get("weights_hash") != fingerprint.get("weights_hash")
                            or mine.get("hidden_size") != fingerprint.get("hidden_size")):
            raise DynTreeError(f"dataset {self.directory} holds hidden states of another model "
                               f"({mine.get('model')!r}); use --no-stored-hidden to recompute them")

    # -- shards ----------------------------------------------------------------------------------------
    def shard_paths(self) -> list[Path]:
        return sorted(self.directory.glob(SHARD_GLOB))

    def read_shard(self, path: Path, with_hidden: bool = True) -> ShardData:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                get = f.get_tensor
                data = ShardData(get("tokens"), get("offsets"), get("prompt_lens"), json.loads(meta["keys"]),
                                 json.loads(meta.get("sources", "[]")))
                if with_hidden and "hidden" in names:
                    data.hidden, data.hidden_offsets = get("hidden"), get("hidden_offsets")
        except Exception as exc:
            raise DynTreeError(f"corrupt shard {path}: {exc}".splitlines()[0]) from exc
        return data

    def done_keys(self) -> set[str]:
        from safetensors import safe_open

        keys: set[str] = set()
        for path in self.shard_paths():
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys.update(json.loads((f.metadata() or {})["keys"]))
            except Exception as exc:
                raise DynTreeError(f"corrupt shard {path}: {exc}".splitlines()[0]) from exc
        return keys

    def write_shard(self, sequences: list[Sequence], prefix: str = "") -> Path:
        """Write finished sequences as the next shard, atomically; ENOSPC becomes a clear error."""
        from safetensors.torch import save_file

        if not sequences:
            raise ValueError("empty shard")
        # `prefix` keeps parallel workers writing into one dataset from picking the same name.
        existing = sorted(self.directory.glob(f"shard-{prefix}[0-9]*.safetensors"))
        index = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        path = self.directory / f"shard-{prefix}{index:05d}.safetensors"
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
        offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths).cumsum(0)
        tensors = {
            "tokens": torch.tensor([t for s in sequences for t in s.prompt_ids + s.response_ids], dtype=torch.int32),
            "offsets": offsets,
            "prompt_lens": torch.tensor([len(s.prompt_ids) for s in sequences], dtype=torch.int32),
        }
        if all(s.hidden is not None for s in sequences):
            for s in sequences:
                if s.hidden.shape[0] != len(s.response_ids):
                    raise ValueError("hidden rows must match response tokens")
            tensors["hidden"] = torch.cat([s.hidden for s in sequences]).to(torch.float16).contiguous()
            hoff = torch.zeros(len(sequences) + 1, dtype=torch.long)
            hoff[1:] = torch.tensor([len(s.response_ids) for s in sequences]).cumsum(0)
            tensors["hidden_offsets"] = hoff
        meta = {"keys": json.dumps([s.key for s in sequences]), "sources": json.dumps([s.source for s in sequences])}
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
        if shutil.disk_usage(self.directory).free < needed:
            raise DynTreeError(f"out of disk space in {self.directory}: a shard needs {needed >> 20} MB; the "
                               "finished shards are kept, free space and run the same command to resume")
        tmp = path.with_suffix(".tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise DynTreeError(f"out of disk space writing {path}; the finished shards are kept, free space "
                                   "and run the same command to resume") from exc
            raise DynTreeError(f"cannot write {path}: {exc}") from exc
        return path

    def stats(self) -> dict:
        seqs = resp = prompt = 0
        for path in self.shard_paths():
            d = self.read_shard(path, with_hidden=False)
            seqs += d.num_sequences
            prompt += int(d.prompt_lens.long().sum())
            resp += d.response_tokens()
        return {"shards": len(self.shard_paths()), "sequences": seqs, "prompt_tokens": prompt,
                "response_tokens": resp}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_validation(key: str, fraction: float) -> bool:
    """A fixed, content-based split: the same sequence is always on the same side."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def most_frequent(ids: torch.Tensor, vocab_size: int, count: int) -> torch.Tensor:
    """The `count` most frequent of token `ids` (sorted): the vocabulary a drafter's subset projection covers."""
    hist = torch.bincount(ids, minlength=vocab_size)
    return hist.topk(min(count, vocab_size)).indices.sort().values


def recompute_hidden(backbone, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The states a distillation run would have stored, from the token ids (for datasets without them)."""
    cache = backbone.new_cache(1, tokens.numel() + 1)
    hidden = backbone.forward(tokens.long()[None].to(backbone.device), cache)[0]
    return hidden[prompt_len - 1 : tokens.numel() - 1].to(torch.float16).cpu()


def dataset_sequences(datasets, backbone=None, min_response: int = 2, progress: bool = False):
    """Every sequence of the datasets' shards with at least `min_response` response tokens, as (key, response
    ids, states `[R, H]`): the states the shards store, or recomputed by `backbone` (what both trainers read)."""
    from tqdm.auto import tqdm

    shards = [(d, path) for d in datasets for path in d.shard_paths()]
    for source, path in tqdm(shards, desc="loading shards", disable=not progress):
        shard = source.read_shard(path, with_hidden=backbone is None)
        if backbone is None and shard.hidden is None:
            raise DynTreeError(f"{path} holds no hidden states: train with --no-stored-hidden to recompute them")
        for i, key in enumerate(shard.keys):
            start, end = int(shard.offsets[i]), int(shard.offsets[i + 1])
            plen = int(shard.prompt_lens[i])
            tokens = shard.tokens[start:end]
            response = tokens[plen:]
            if response.numel() < min_response:
                continue
            if backbone is None:
                hidden = shard.hidden[int(shard.hidden_offsets[i]) : int(shard.hidden_offsets[i + 1])]
            else:
                hidden = recompute_hidden(backbone, tokens, plen)
            yield key, response, hidden
