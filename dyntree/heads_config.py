"""What every kind of heads stores beside its weights (`heads.json`): shape, type and the file names, in a
module of its own so that each head type's module (`heads`, `eagle`) builds on it without importing another."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DynTreeError

FORMAT_VERSION = 1
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads.json"
MEDUSA_FILE = "medusa_lm_head.pt"


@dataclass
class HeadsConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    shared_projection: bool = True
    model_type: str | None = None  # backbone fingerprint; None = unknown (Medusa files)
    vocab_subset: int | None = None  # size of `vocab_ids` when the projection covers only part of the vocabulary
    head_type: str = "medusa"  # "medusa": each head reads the hidden state only; "hydra": also the drafted path;
    # "eagle": a one-layer feature drafter over the whole context (`dyntree.eagle`)
    drafter: dict | None = None  # eagle heads: the drafter layer's shape (`eagle.LAYER_FIELDS`)

    def check_fits(self, backbone_config) -> None:
        fp = backbone_config.fingerprint()
        if self.hidden_size != fp["hidden_size"] or self.vocab_size != fp["vocab_size"]:
            raise DynTreeError(
                f"heads do not fit this model: heads expect hidden size {self.hidden_size} and vocabulary "
                f"{self.vocab_size}, the model has {fp['hidden_size']} and {fp['vocab_size']}"
            )
        if self.model_type is not None and self.model_type != fp["model_type"]:
            raise DynTreeError(
                f"heads do not fit this model: trained for a {self.model_type!r} backbone, this is {fp['model_type']!r}"
            )
