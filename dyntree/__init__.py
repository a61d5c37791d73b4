"""dyntree: lossless multi-head (Medusa) decoding with static and dynamic tree attention."""

from .api import DynTree, GenerationResult, TextChunk
from .config import TreeConfig
from .decoding import Decoder, GenerationStats
from .errors import DynTreeError
from .heads import MedusaHeads
from .interop import load_heads
from .loading import load_model

__all__ = ["DynTree", "GenerationResult", "TextChunk", "TreeConfig", "Decoder", "GenerationStats", "DynTreeError",
           "MedusaHeads", "load_heads", "load_model"]
__version__ = "0.1.0"
