"""Proposers: what builds each step's candidate tree, behind one contract (`Proposer`).

`build_proposer(config, num_heads)` turns a validated `TreeConfig` into the proposer it describes.
"""

from __future__ import annotations

from ..config import TreeConfig
from ..errors import DynTreeError
from ..trees import StaticTree, load_tree_spec
from .base import Proposal, Proposer, propose_step
from .dynamic import DynamicTreeProposer
from .static import RootOnlyProposer, StaticTreeProposer

__all__ = ["Proposal", "Proposer", "propose_step", "RootOnlyProposer", "StaticTreeProposer",
           "DynamicTreeProposer", "build_proposer"]


def build_proposer(config: TreeConfig, num_heads: int | None, latency=None, conditional: bool = False) -> Proposer:
    """The proposer `config` describes for `num_heads` heads (None: no heads, so plain decoding only).

    `latency`: the step-latency model a dynamic tree with `auto` size chooses by (else `config.latency`).
    `conditional`: the heads are path-conditional (hydra): trees, static ones too, are drafted depth by depth.
    """
    if config.kind == "ar":
        return RootOnlyProposer()
    if not num_heads:
        raise DynTreeError(f"the {config.kind} tree needs Medusa heads, and none are loaded")
    if config.kind == "dynamic":
        return DynamicTreeProposer(num_heads, config, latency=latency, conditional=conditional)
    name, paths = load_tree_spec(config.static_spec)
    tree = StaticTree.build(paths, config.resolved_topk, num_heads, name)
    if tree.depth > num_heads:
        raise DynTreeError(f"tree depth {tree.depth} exceeds the number of heads ({num_heads})")
    return StaticTreeProposer(tree, conditional=conditional)
