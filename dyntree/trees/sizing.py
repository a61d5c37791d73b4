"""Tree sizes for this machine: the heads' acceptance by size times this machine's cost by size.

`TreeSizer` (one per `DynTree` and the trees made from it) is where every size is decided: the default size,
the latency an auto-sized tree chooses by, and nodes per sequence by batch size.

A bigger tree accepts more tokens per pass, but what a node costs depends on the machine (on a GPU almost
nothing, on a 2-core CPU a lot, and less in bf16 where the CPU accelerates it). So heads may ship a
`TreeProfile`: mean accepted tokens per pass of the default dynamic tree at each size, measured by offline
replay on prompts that are not the benchmark's (`benchmarks/tree_profile.py`). With this machine's measured
step latency (`trees.latency.machine_latency`), the default size is the one with the most tokens per second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DynTreeError
from .latency import DEFAULT_SIZES, BatchLatency, LatencyModel, machine_batch_latency, machine_latency

PROFILE_FILE = "tree_profile.json"
RECOMPUTE_STEPS = 4  # recorded steps between two workings-out of a batch size's best tree (a step asks each time)


@dataclass
class TreeProfile:
    """Mean accepted tokens per pass by tree size (root included) for one tree policy of one set of heads."""

    tokens_per_pass: dict[int, float]
    policy: dict  # the tree settings measured (`TreeConfig.settings()` without the size)
    note: dict = field(default_factory=dict)  # how and on what it was measured

    def __post_init__(self):
        if not self.tokens_per_pass or any(s < 1 or not t >= 1.0 for s, t in self.tokens_per_pass.items()):
            raise DynTreeError("a tree profile needs sizes >= 1 with at least 1 token per pass each")

    def matches(self, settings: dict) -> bool:
        """Whether `settings` (a TreeConfig's) describe the policy this profile measured, size aside."""
        return all(settings.get(key) == value for key, value in self.policy.items())

    def to_dict(self) -> dict:
        return {"format": "dyntree-tree-profile", "policy": self.policy,
                "tokens_per_pass": {str(s): t for s, t in sorted(self.tokens_per_pass.items())}, "note": self.note}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TreeProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "dyntree-tree-profile":
                raise ValueError("not a dyntree tree profile")
            return cls({int(s): float(t) for s, t in data["tokens_per_pass"].items()}, dict(data["policy"]),
                       data.get("note", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DynTreeError(f"cannot read tree profile {path}: {exc}".splitlines()[0]) from exc


def find_profile(heads_dir: str | os.PathLike | None) -> TreeProfile | None:
    """The profile shipped beside a heads directory, if any."""
    if heads_dir is None or not (Path(heads_dir) / PROFILE_FILE).is_file():
        return None
    return TreeProfile.load(Path(heads_dir) / PROFILE_FILE)


def best_fixed_size(profile: TreeProfile, latency: LatencyModel) -> int:
    """The profiled size with the most accepted tokens per second on this machine (the smaller on ties)."""
    return max(sorted(profile.tokens_per_pass), key=lambda s: profile.tokens_per_pass[s] / latency.cost(s))


def best_size_for_batch(profile: TreeProfile, plain_seconds: float, tree_seconds) -> int:
    """Nodes per sequence for a step of one batch size: 1 (plain decoding: one token per sequence in
    `plain_seconds`) or the profiled size with the most tokens per second, `tree_seconds(n)` being that batch
    size's measured cost of n nodes per sequence (ProPD's dynamic tree generation, across batch sizes)."""
    best, best_rate = 1, 1.0 / plain_seconds
    for size in sorted(profile.tokens_per_pass):
        rate = profile.tokens_per_pass[size] / tree_seconds(size)
        if rate > best_rate:
            best, best_rate = size, rate
    return best


def batch_sizer(choose, batches: list[int]):
    """`tree_size_for(batch size)` for the serving engine: `choose(b)` (nodes per sequence for b sequences,
    e.g. `DynTree.nodes_for_batch`, which the steps served keep correcting) for the largest of `batches` not
    above the batch size. Each of `batches` is asked once now, so that whatever it measures is measured
    before serving (`choices`: those first answers); later calls only read the corrected figures."""
    measured = sorted(set(int(b) for b in batches))
    choices = {b: choose(b) for b in measured}

    def tree_size_for(batch_size: int) -> int | None:
        below = [b for b in measured if b <= batch_size]
        return choose(below[-1] if below else measured[0])
    tree_size_for.choices = choices
    return tree_size_for


def _hashable(config):
    """`config` as a dict key, or None when a field of it cannot be one (a static tree given as a list)."""
    try:
        hash(config)
    except TypeError:
        return None
    return config


def _time_key(batch: int, tree: bool, nodes: int | None = None) -> tuple:
    """Where `StepRecord` keeps one kind of step's time: plain, any tree, or trees of `nodes` nodes."""
    return (batch, "plain") if not tree else (batch, "tree") if nodes is None else (batch, "tree", nodes)


class StepRecord:
    """How the steps actually decoded compare with what sizing predicted: the online correction.

    The step-latency model is timed on synthetic steps before decoding, and the heads' profile replays other
    prompts than the ones being decoded; both drift from what real steps do (measured: batch-2 tree steps
    1.65x the model, MT-Bench acceptance 20% under the profile's). So every real step is recorded, and two
    factors correct the prior:
    - time, per (batch size, tree or plain step): measured seconds / the latency model's seconds;
    - acceptance: tokens a row gained beyond the one every step gives / the profile's figure at the step's
      size (one factor for every size and batch size: it is a property of the text being decoded).
    Each is a ratio of exponentially decayed sums (recent steps count most: `horizon` steps for time,
    `gain_horizon` for acceptance, whose single steps vary far more: 0 to 4 tokens) with `prior`
    steps' worth of the model's own prediction added, and a step's time counts at most `clip` times (or at
    least 1/`clip` of) its prediction, so a few odd steps (a first step's one-off work) move it little.
    Trees switched off are not forgotten: after `explore` plain steps in a row, sizing runs the best tree for
    `burst` steps (`exploring`), so figures that improve can turn them back on; each such try doubles the
    wait before the next one at that batch size (up to `max_wait` steps), unless they are estimated within
    10% of paying: then every `explore` steps.
    """

    def __init__(self, horizon: int = 64, gain_horizon: int = 256, prior: float = 8.0, clip: float = 3.0,
                 explore: int = 16, burst: int = 4, max_wait: int = 256):
        self.decay = 1.0 - 1.0 / horizon
        self.gain_decay = 1.0 - 1.0 / gain_horizon
        self.max_wait = max_wait
        self.prior = prior
        self.clip = clip
        self.explore = explore
        self.burst = burst
        self.burst_left: dict[int, int] = {}  # batch -> tree steps still to run in the current try
        self.plain_run: dict[int, int] = {}  # batch -> plain steps since its last tree step
        self.explore_after: dict[int, int] = {}  # batch -> plain steps in a row before trying a tree again
        # `_time_key` -> [decayed sum of measured/predicted, decayed count]
        self.time: dict[tuple, list[float]] = {}
        self.gain = [0.0, 0.0, 0.0]  # [tokens gained beyond the root, the profile's prediction of them, weight]
        self.count = 0  # steps recorded

    def add(self, batch: int, tree: bool, seconds: float, predicted_seconds: float,
            gained: float | None = None, predicted_gain: float | None = None, nodes: int | None = None) -> None:
        """One real step: its seconds against the prediction, and (tree steps of `nodes` nodes) tokens gained
        per row beyond the root against the profile's."""
        self.count += 1
        if tree and self.burst_left.get(batch, 0) > 0:
            self.burst_left[batch] -= 1
        self.plain_run[batch] = 0 if tree else self.plain_run.get(batch, 0) + 1
        step = min(max(seconds / predicted_seconds, 1.0 / self.clip), self.clip)
        keys = [_time_key(batch, tree)] + ([_time_key(batch, True, nodes)] if tree and nodes else [])
        for key in keys:
            ratio, weight = self.time.get(key, (0.0, 0.0))
            self.time[key] = [ratio * self.decay + step, weight * self.decay + 1.0]
        if gained is not None and predicted_gain:
            d = self.gain_decay
            self.gain = [self.gain[0] * d + gained, self.gain[1] * d + predicted_gain, self.gain[2] * d + 1.0]

    def exploring(self, batch: int, margin: float = 0.0) -> bool:
        """Whether the next step of this batch size measures a tree although plain decoding estimates faster:
        during a try, or once enough plain steps ran in a row (which starts a try). `margin`: the best tree's
        estimated rate over plain decoding's; trees estimated within 10% of paying are tried every `explore`
        steps, the others ever less often (the wait doubles up to `max_wait`)."""
        if self.burst_left.get(batch, 0) > 0:
            return True
        wait = self.explore if margin >= 0.9 else self.explore_after.get(batch, self.explore)
        if self.plain_run.get(batch, 0) < wait:
            return False
        self.burst_left[batch] = self.burst
        if margin < 0.9:
            self.explore_after[batch] = min(2 * wait, self.max_wait)
        return True

    def time_factor(self, batch: int, tree: bool, nodes: int | None = None) -> float:
        """Measured over predicted step time at this batch size: of plain steps, of tree steps, or of trees of
        `nodes` nodes (drafting deeper trees costs more than the model's synthetic steps show), whose own
        figure starts from the tree steps' and moves away as steps of that size are seen."""
        ratio, weight = self.time.get(_time_key(batch, tree), (0.0, 0.0))
        pooled = (ratio + self.prior) / (weight + self.prior)
        if not tree or nodes is None:
            return pooled
        ratio, weight = self.time.get(_time_key(batch, True, nodes), (0.0, 0.0))
        return (ratio + self.prior * pooled) / (weight + self.prior)

    def gain_factor(self) -> float:
        gained, predicted, weight = self.gain
        if not weight:
            return 1.0
        prior = self.prior * predicted / weight  # `prior` steps gaining what the profile says
        return (gained + prior) / (predicted + prior)


class Measurements:
    """What one model with one set of heads measured on this machine, shared by every `DynTree` made from it
    (`with_tree`, a server's per-request trees): step latency by (sizes, top-k), and how real steps compared
    (`StepRecord`). `frozen`: nothing more is measured (`TreeSizer.freeze`); real steps are still recorded."""

    def __init__(self):
        self.frozen = False
        self.fixed: dict[tuple, LatencyModel] = {}  # batch 1, for the default size
        self.batch: dict[tuple, BatchLatency] = {}  # by batch size, for `auto` trees and per-batch sizing
        self.record = StepRecord()
        self.sized: dict = {}  # tree config -> the BatchLatency sizing it by batch size (None: not profiled)
        self.decisions: dict[tuple, tuple] = {}  # (config, batch) -> (record count, best, best tree, margin)


class TreeSizer:
    """How many nodes a tree gets on this machine, in one place: the default size (`sized`), the latency an
    `auto` tree chooses by every step (`step_latency`), and nodes per sequence by batch size
    (`nodes_for_batch`, ProPD's sizing across batch sizes, down to plain decoding where trees measure slower).

    Every step time is measured once per machine (a few seconds each, then read from the cache). A server
    measures what it will need before it starts (`prepare`) and then `freeze`s the sizer: from then on a batch
    size it did not measure reads the nearest measured one below, and nothing is timed while requests wait.
    """

    def __init__(self, backbone, heads, profile: TreeProfile | None = None, measured: Measurements | None = None):
        self.backbone, self.heads, self.profile = backbone, heads, profile
        self.measured = measured if measured is not None else Measurements()

    @property
    def frozen(self) -> bool:
        return self.measured.frozen

    def freeze(self) -> None:
        """Measure nothing more: what is known answers every later question."""
        self.measured.frozen = True
        for latency in self.measured.batch.values():
            latency.freeze()

    def profiled(self, config) -> bool:
        """Whether the heads' profile measured this tree's policy (a dynamic tree of a fixed size)."""
        return (self.heads is not None and self.profile is not None and config.kind == "dynamic"
                and not config.auto and self.profile.matches(config.settings()))

    def sized(self, config):
        """A dynamic tree left at its default size gets the profiled size with the most tokens per second on
        this machine (batch 1); any size the user set, and a policy the profile did not measure, stay."""
        if config.size is not None or not self.profiled(config):
            return config
        sizes = sorted(self.profile.tokens_per_pass)
        key = (tuple(sizes), config.resolved_topk)
        if key not in self.measured.fixed:
            if self.frozen:
                return config
            self.measured.fixed[key] = machine_latency(self.backbone, self.heads, sizes, config.resolved_topk)
        return config.replace(size=best_fixed_size(self.profile, self.measured.fixed[key]))

    def batch_latency(self, sizes, topk: int) -> BatchLatency | None:
        """This machine's step cost by batch size for trees of `sizes` and `topk` (each batch size measured when
        first asked, unless frozen; frozen, an unmeasured shape reads the measurements of another one)."""
        key = (tuple(sorted(set(sizes))), int(topk))
        if key not in self.measured.batch:
            if self.frozen:  # the heads' top-k and the sizes listed barely change a step's cost
                same = [latency for (s, _), latency in self.measured.batch.items() if s == key[0]]
                return (same or list(self.measured.batch.values()) or [None])[0]
            self.measured.batch[key] = machine_batch_latency(self.backbone, self.heads, key[0], key[1])
        return self.measured.batch[key]

    def step_latency(self, config) -> BatchLatency | None:
        """The latency a tree of size "auto" chooses by: the config's own, else this machine's (batch 1 now,
        each other batch size when a run first decodes that many sequences together)."""
        if not config.auto or config.latency is not None or self.heads is None:
            return None
        largest = config.resolved_size
        latency = self.batch_latency([s for s in DEFAULT_SIZES if s < largest] + [largest], config.resolved_topk)
        if latency is None:
            raise DynTreeError("tree size 'auto' needs this machine's step latency, and none was measured before "
                               "serving began (start the server with --tree-size auto)")
        latency.model(1)
        return latency

    def nodes_for_batch(self, config, batch_size: int) -> int | None:
        """Nodes per sequence for `batch_size` sequences decoded together: the profiled size (at most this
        tree's) with the most tokens per second under this machine's (batch, nodes) step cost, or 1 (plain
        decoding; `best_size_for_batch`), both corrected by the steps decoded so far (`StepRecord`). Asked
        every step (worked out again every `RECOMPUTE_STEPS` recorded steps); only a batch size never seen
        before measures anything. None when the heads have no profile of this tree's policy."""
        latency = self._sized_latency(config)
        if latency is None:
            return None
        record = self.measured.record
        bucket = latency.bucket(batch_size)  # frozen: the measured batch size that answers for this one
        key = (_hashable(config), batch_size)
        known = self.measured.decisions.get(key)
        if known is None or record.count - known[0] >= RECOMPUTE_STEPS:
            known = (record.count, *self._decide(config, latency, batch_size, bucket))
            if key[0] is not None:
                self.measured.decisions[key] = known
        _, best, best_tree, margin = known
        if best == 1 and record.exploring(bucket, margin):  # trees are off here: measure the best one again
            return best_tree
        return best

    def _sized_latency(self, config) -> BatchLatency | None:
        """The step costs that size `config`'s tree by batch size; None when the profile does not size it."""
        key = _hashable(config)
        if key is None or key not in self.measured.sized:
            # Measured at every profiled size (one cache entry with `sized`'s at batch 1).
            latency = self.batch_latency(sorted(self.profile.tokens_per_pass),
                                         config.resolved_topk) if self.profiled(config) else None
            if key is None:
                return latency
            self.measured.sized[key] = latency
        return self.measured.sized[key]

    def _decide(self, config, latency: BatchLatency, batch_size: int, bucket: int) -> tuple[int, int, float]:
        """The best size under the corrected figures, the best tree size, and the best tree's rate over plain
        decoding's (how close trees are to paying)."""
        record = self.measured.record
        plain = latency.plain_cost(batch_size)
        plain = (plain if plain is not None else latency.cost(batch_size, 1)) * record.time_factor(bucket, False)
        gain_factor = record.gain_factor()
        corrected = TreeProfile({s: 1.0 + (t - 1.0) * gain_factor for s, t in self.profile.tokens_per_pass.items()
                                 if s <= config.resolved_size}, self.profile.policy)
        tree_cost = lambda n: latency.cost(batch_size, n) * record.time_factor(bucket, True, n)  # noqa: E731
        best_tree = best_size_for_batch(corrected, float("inf"), tree_cost)
        margin = corrected.tokens_per_pass[best_tree] / tree_cost(best_tree) * plain
        return (best_tree if margin > 1.0 else 1), best_tree, margin

    def observe(self, config, batch_size: int, nodes: int, seconds: float, tokens_per_row: float) -> None:
        """A real step of `batch_size` rows with `nodes` nodes each (1: plain decoding) that took `seconds` and
        gave each decoding row `tokens_per_row` tokens on average, for the online correction. Steps of a
        policy the profile did not measure, or of a batch size not measured yet, are not compared."""
        latency = self._sized_latency(config)
        predicted = None if latency is None else latency.known_cost(batch_size, nodes)
        if predicted is None or not seconds > 0:
            return
        bucket = latency.bucket(batch_size)
        if nodes <= 1:
            self.measured.record.add(bucket, False, seconds, predicted)
            return
        profiled = self.profile.tokens_per_pass.get(nodes)
        gain = None if profiled is None else profiled - 1.0
        self.measured.record.add(bucket, True, seconds, predicted, tokens_per_row - 1.0, gain, nodes)

    def prepare(self, config, batches) -> dict[int, int] | None:
        """Measure now what decoding `config`'s tree at these batch sizes will need (a server, before it
        starts); the nodes chosen per batch size where the heads' profile sizes this tree, else None."""
        latency = self.step_latency(config)
        for batch in batches:
            if latency is not None:
                latency.model(int(batch))
        if not self.profiled(config):
            return None
        return {int(b): self.nodes_for_batch(config, int(b)) for b in batches}
