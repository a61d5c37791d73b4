"""Candidate trees: buffers (shared), static trees (Medusa's choices) and dynamic trees (built per step)."""

from .buffers import TreeBuffers, buffers_from_parents
from .static import BUILTIN_TREES, StaticTree, chain_tree, load_tree_spec, validate_paths

__all__ = ["TreeBuffers", "buffers_from_parents", "StaticTree", "BUILTIN_TREES", "chain_tree", "load_tree_spec",
           "validate_paths"]
