"""Sampling controls: how logits become the distribution a token is drawn from, and a seeded generator.

Every method (plain, static tree, dynamic tree) samples through the same `processed_probs`, so "the model's
own sampling distribution" means one thing everywhere: softmax(logits / temperature), then top-k, then
top-p (nucleus) truncation, renormalised. Temperature 0 means greedy decoding (argmax), handled by
`verify_greedy`. Randomness comes only from a `torch.Generator` owned by the run, never from torch's global
RNG, so a seed reproduces a generation exactly (same model, batch, tree and device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DynTreeError

ACCEPTANCE_MODES = ("lossless", "typical")
DEFAULT_TYPICAL_EPS = 0.09
DEFAULT_TYPICAL_ALPHA = 0.3


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens.

    temperature: 0 = greedy (token-exact with plain greedy decoding); > 0 samples.
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1 = off).
    top_k: keep the k most likely tokens (0 = off).
    seed: seeds the run's generator; None draws a fresh seed.
    mode: how tree candidates are verified when sampling: "lossless" (tree speculative sampling: the output
        distribution is exactly the model's) or "typical" (Medusa's typical acceptance: faster, biased).
    eps, alpha: typical acceptance accepts a token x when p(x) > min(eps, alpha * exp(-entropy(p))).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    mode: str = "lossless"
    eps: float = DEFAULT_TYPICAL_EPS
    alpha: float = DEFAULT_TYPICAL_ALPHA

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise DynTreeError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise DynTreeError(f"top-p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise DynTreeError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.mode not in ACCEPTANCE_MODES:
            raise DynTreeError(f"acceptance must be one of {', '.join(ACCEPTANCE_MODES)}, got {self.mode!r}")
        if not (0 <= self.eps <= 1):
            raise DynTreeError(f"typical eps must be in [0, 1], got {self.eps!r}")
        if not self.alpha >= 0:
            raise DynTreeError(f"typical alpha must be >= 0, got {self.alpha!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise DynTreeError(f"seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def from_options(cls, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, mode: str | None = None, eps: float | None = None,
                     alpha: float | None = None) -> "SamplingConfig":
        """The one place a sampling config is built from user input (CLI flags, HTTP fields, bench options):
        None means the default; bad values raise DynTreeError."""
        return cls(temperature=0.0 if temperature is None else temperature,
                   top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k, seed=seed,
                   mode=mode or "lossless", eps=DEFAULT_TYPICAL_EPS if eps is None else eps,
                   alpha=DEFAULT_TYPICAL_ALPHA if alpha is None else alpha)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def label(self) -> str:
        """Short name for tables: greedy, lossless(T=0.7) or typical(T=0.7)."""
        if self.is_greedy:
            return "greedy"
        extras = [f"T={self.temperature:g}"]
        if self.top_p < 1:
            extras.append(f"top-p={self.top_p:g}")
        if self.top_k:
            extras.append(f"top-k={self.top_k}")
        return f"{self.mode}({', '.join(extras)})"

    def generator(self, device=None) -> torch.Generator:
        """A generator for one run: seeded from `seed`, or from fresh OS entropy (global RNG untouched)."""
        gen = torch.Generator(device=torch.device(device or "cpu"))
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


GREEDY = SamplingConfig()


class Sampler:
    """How a set of rows chooses tokens: sampling settings and the generator they draw from (None when greedy).

    Rows that share one sampler share its random stream and are verified together (the rows of one library
    run); each request of the server has its own, so that its draws do not depend on its neighbours."""

    def __init__(self, config: SamplingConfig | None = None, device=None):
        self.config = config
        self.generator = None if self.greedy else config.generator(device)

    @property
    def greedy(self) -> bool:
        return self.config is None or self.config.is_greedy

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token for each row of `[m, V]` logits (`choose_tokens`)."""
        return choose_tokens(logits, self.config, self.generator)


def processed_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """`[m, V]` logits -> `[m, V]` float32 sampling probabilities (temperature, top-k, top-p; rows sum to 1).

    Tokens removed by top-k/top-p get probability exactly 0, so no acceptance rule can ever emit them.
    With temperature 0 the result is the one-hot argmax distribution.
    """
    logits = logits.float()
    if config.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scaled = logits / config.temperature
    vocab = scaled.shape[-1]
    if 0 < config.top_k < vocab:
        kth = scaled.topk(config.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = before >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `[m, V]` probabilities (need not be normalised)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose_tokens(logits: torch.Tensor, config: SamplingConfig | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The next token for each row of `[m, V]` logits: argmax when greedy, else a sample."""
    if config is None or config.is_greedy:
        return logits.argmax(-1)
    return sample_from(processed_probs(logits, config), generator)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of `[m, V]` probabilities (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)
