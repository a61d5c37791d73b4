"""One command per seed paper: its comparison run on the default model, written up as a report.

  python benchmarks/reproduce.py dynamic-tree [--full] [--out DIR]
  python benchmarks/reproduce.py propd [--full] [--out DIR]

dynamic-tree (arXiv 2502.05947, dynamic tree attention for multiple-heads decoding): Medusa's static tree
(its 63 nodes, and the best of its first-N trees) against the dynamic tree on MT-Bench first turns, once with
the bundled Medusa heads and once with the default (hydra) heads. Greedy rows: tokens per pass, tokens/s,
speedup over plain decoding (`ar`), exactness and BLEU against `ar`; sampling rows (T=0.7): the same, and the
first-tree-token KL against its floor (docs/sampling.md).

propd (arXiv 2402.13485, ProPD): early pruning by (layer, k), every pair measured on the very same trees
(`early_prune_sweep.py`: tokens lost and ms saved per pass), then tree sizing across batch sizes 1-16
(`dyntree bench --batch-size`): ProPD's per-batch sizing against Medusa's fixed tree and a fixed dynamic
tree, speedup over `ar` at every batch size.

Both run through the project's own benchmark machinery (`dyntree.bench`: interleaved methods, exactness
against `ar`, BLEU, KL) and write into --out: REPORT.md (the tables, beside the paper's claims with their
source, the CPU, the commit and the heads), PNG plots, and each underlying run's results.json. The default
size is meant to take well under 30 minutes on a 2-core CPU; --full runs every row on more prompts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dyntree.bench import BenchContext, BenchSettings, build_methods, collect_results, load_prompts, \
    parse_method_list, run_benchmark, write_outputs
from dyntree.bench.sweep import sweep_markdown, sweep_rows, write_sweep
from dyntree.errors import DynTreeError

HERE = Path(__file__).resolve().parent
TEMPERATURE = 0.7  # the sampling rows (as `dyntree quality`)

DYNAMIC_TREE_CLAIM = (
    "Dynamic tree attention (Zhang, *Acceleration Multiple Heads Decoding for LLM via Dynamic Tree Attention*, "
    "arXiv [2502.05947](https://arxiv.org/abs/2502.05947)) replaces MEDUSA's fixed tree with one built every step "
    "from the heads' marginals. Claim, as this project's issue 23 states it: a 1.8-2.3x speedup, with "
    "generation quality kept, measured by BLEU and KL divergence (Vicuna-7B, MT-Bench). The abstract itself "
    "states the gain without a figure: the method \"improves the decoding efficiency of multiple head decoding "
    "for LLMs while maintaining the generation quality\".")
PROPD_CLAIM = (
    "ProPD (Zhong et al., *ProPD: Dynamic Token Tree Pruning and Generation for LLM Parallel Decoding*, arXiv "
    "[2402.13485](https://arxiv.org/abs/2402.13485)) prunes the token tree after early layers and sizes it in "
    "real time for the batch. Claim (abstract): \"ProPD consistently outperforms existing decoding algorithms by "
    "1.1-3.2x\" across datasets, LLMs and batch sizes (Vicuna models on GPUs).")


# -- shared ---------------------------------------------------------------------------------------------------
def load_sweep_module():
    """benchmarks/early_prune_sweep.py (a script beside this one, not part of the package)."""
    spec = importlib.util.spec_from_file_location("early_prune_sweep", HERE / "early_prune_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heads_option(heads: str, run_heads: str) -> str:
    """The `:heads=` option a method needs to run on `heads` when the run's own heads are `run_heads`."""
    if heads == run_heads:
        return ""
    if any(c in heads for c in ":,="):
        raise DynTreeError(f"heads {heads!r}: a path with ':', ',' or '=' cannot go into a method spec")
    return f":heads={heads}"


def bench(context: BenchContext, methods: list[str], prompts, settings: BenchSettings, out: Path, label: str,
          command: str, plots: bool) -> dict:
    """One interleaved benchmark run of `methods` (spec strings), written to `out` like `dyntree bench`."""
    specs = parse_method_list(",".join(methods))
    built = build_methods(specs, context)
    total = (len(prompts) * settings.repeats + settings.warmup) * len(built)
    done = 0

    def progress(message: str) -> None:
        nonlocal done
        done += 1
        print(f"[{label} {done}/{total}+] {message}", file=sys.stderr, flush=True)

    run = run_benchmark(built, prompts, context, settings, progress)
    results = collect_results(run, context, command, "mtbench" if prompts and prompts[0].category else "prompts")
    write_outputs(results, out, plots=plots)
    return results


def machine_lines(results: dict, heads: dict[str, str], started: float, command: str) -> list[str]:
    env = results["environment"]
    weights = results["settings"].get("weights")
    return [
        f"- CPU: {env.get('cpu') or 'unknown'} ({env.get('logical_cpus')} logical CPUs, "
        f"{env.get('torch_threads')} torch threads; load average at start "
        f"{', '.join(f'{x:.1f}' for x in env.get('load_average_start') or [])})",
        f"- commit: {env.get('git_commit') or 'unknown'}; torch {env.get('torch')}; weights {weights}",
        "- heads: " + "; ".join(f"{name}: {note}" for name, note in heads.items()),
        f"- ran {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {(time.time() - started) / 60:.1f} min",
        f"- command: `{command}`",
    ]


def _fmt(value, spec=".2f", none="n/a") -> str:
    return none if value is None else format(value, spec)


def _nodes(results: dict, method: str) -> int | None:
    """The largest tree a method verified (root included), from its raw runs."""
    sizes = [r["tree_nodes"] for r in results["runs"] if r["method"] == method and r.get("tree_nodes")]
    return max(sizes) if sizes else None


# -- dynamic tree attention -----------------------------------------------------------------------------------
def dynamic_tree_methods(sets: list[tuple[str, str]], run_heads: str, sizes: list[int], typical: bool) -> dict:
    """Per heads set (label, heads): the spec of every row; plus the shared `ar` rows."""
    plan = {"ar": "ar", "ar_sampling": f"ar:temperature={TEMPERATURE}", "sets": {}}
    for label, heads in sets:
        opt = heads_option(heads, run_heads)
        rows = {"static63": f"static{opt}",
                "static_sizes": {n: f"static:n={n}{opt}" for n in sizes},
                # the paper's dynamic tree: the heads' guesses only
                "dynamic_paper": f"dynamic:lookup=0:recycle=0{opt}",
                # dyntree's default dynamic tree: plus the lookup branch and recycled candidates
                "dynamic_default": f"dynamic{opt}",
                "static63_sampling": f"static:temperature={TEMPERATURE}{opt}",
                "dynamic_paper_sampling": f"dynamic:lookup=0:recycle=0:temperature={TEMPERATURE}{opt}"}
        if typical:  # MEDUSA's own (biased) acceptance: more tokens per pass, KL above the floor
            rows["dynamic_paper_typical"] = f"dynamic:lookup=0:recycle=0:temperature={TEMPERATURE}:accept=typical{opt}"
        plan["sets"][label] = rows
    return plan


def plan_specs(plan: dict) -> list[str]:
    specs = [plan["ar"]]
    for rows in plan["sets"].values():
        specs += [rows["static63"], *rows["static_sizes"].values(), rows["dynamic_paper"], rows["dynamic_default"]]
    specs.append(plan["ar_sampling"])
    for rows in plan["sets"].values():
        specs += [rows[k] for k in ("static63_sampling", "dynamic_paper_sampling", "dynamic_paper_typical")
                  if k in rows]
    return specs


def best_static(results: dict, rows: dict) -> str:
    """The static tree (63 nodes or one of the first-N trees) with the most tokens/s in this run."""
    candidates = [rows["static63"], *rows["static_sizes"].values()]
    return max(candidates, key=lambda spec: results["methods"][spec]["tokens_per_second"])


def dynamic_tree_report(results: dict, plan: dict, heads_notes: dict, started: float, command: str,
                        settings: BenchSettings, prompt_count: int) -> tuple[str, dict]:
    methods = results["methods"]
    ar = methods[plan["ar"]]
    lines = ["# Reproduction: dynamic tree attention against Medusa's static tree", "", "## The paper's claim", "",
             DYNAMIC_TREE_CLAIM, "", "## This run", "",
             f"- {prompt_count} MT-Bench first turns (balanced over its categories), {settings.max_new_tokens} new "
             f"tokens each, greedy and sampling at T={TEMPERATURE}; every method interleaved per prompt "
             "(`dyntree bench` machinery: `bench/results.json`)",
             *machine_lines(results, heads_notes, started, command), "",
             f"Plain decoding (`ar`): {ar['tokens_per_second']:.1f} tok/s.", ""]
    header = ("| heads | tree | nodes (root included) | tokens/pass | tok/s | speedup vs ar | exact vs ar | "
              "BLEU vs ar |")
    summary = {"ar_tokens_per_second": ar["tokens_per_second"], "sets": {}}
    verdicts = []
    for label, rows in plan["sets"].items():
        best = best_static(results, rows)
        shown = [("static, Medusa's mc_sim_7b_63", rows["static63"]),
                 (f"static, best size ({_nodes(results, best)} nodes)", best),
                 ("dynamic, heads only (the paper's)", rows["dynamic_paper"]),
                 ("dynamic, dyntree default (+ lookup, recycling)", rows["dynamic_default"])]
        lines += [f"## Greedy, {label}", "", header, "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, spec in shown:
            m = methods[spec]
            exact = (f"{m['exact_matches']}/{m['exact_compared']}" if m.get("exact_compared") else "n/a")
            lines.append(f"| {label} | {name} | {_nodes(results, spec)} | {_fmt(m['mean_accepted_per_pass'])} | "
                         f"{m['tokens_per_second']:.1f} | {_fmt(m['speedup_vs_ar'])}x | {exact} | "
                         f"{_fmt(m.get('bleu_vs_ar'), '.1f')} |")
        static_speed = methods[best]["tokens_per_second"]
        dyn = {key: methods[rows[key]]["tokens_per_second"] for key in ("dynamic_paper", "dynamic_default")}
        margins = {key: speed / static_speed - 1 for key, speed in dyn.items()}
        verdicts.append(
            f"- {label}: the paper's dynamic tree (heads only) runs {_signed(margins['dynamic_paper'])} against the "
            f"best static tree ({_nodes(results, best)} nodes, {static_speed:.1f} tok/s), dyntree's default dynamic "
            f"tree {_signed(margins['dynamic_default'])}; against the 63-node tree: "
            f"{_signed(dyn['dynamic_paper'] / methods[rows['static63']]['tokens_per_second'] - 1)} and "
            f"{_signed(dyn['dynamic_default'] / methods[rows['static63']]['tokens_per_second'] - 1)}.")
        sizes = [(str(_nodes(results, rows["static63"])), rows["static63"])] + [
            (str(n), spec) for n, spec in rows["static_sizes"].items()]
        lines += ["", "Static tree sizes in this run (Medusa's tree whole, and cut to its first N nodes): " + ", ".join(
            f"{n} nodes {methods[spec]['tokens_per_second']:.1f} tok/s "
            f"({_fmt(methods[spec]['mean_accepted_per_pass'])}/pass)" for n, spec in sizes), ""]
        summary["sets"][label] = {"best_static": best, "margins": margins,
                                  "rows": {name: spec for name, spec in shown}}
    lines += ["## Sampling (T=%s)" % TEMPERATURE, "",
              "| heads | tree | acceptance | tokens/pass | tok/s | speedup vs ar | BLEU vs greedy ar | KL | KL floor |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    sampled = [("-", "plain sampling (ar)", plan["ar_sampling"])]
    for label, rows in plan["sets"].items():
        sampled += [(label, "static, mc_sim_7b_63", rows["static63_sampling"]),
                    (label, "dynamic, heads only", rows["dynamic_paper_sampling"])]
        if "dynamic_paper_typical" in rows:
            sampled.append((label, "dynamic, heads only", rows["dynamic_paper_typical"]))
    for label, name, spec in sampled:
        m = methods[spec]
        accept = (m["settings"].get("sampling") or {}).get("accept") or "-"
        lines.append(f"| {label} | {name} | {accept} | {_fmt(m['mean_accepted_per_pass'])} | "
                     f"{m['tokens_per_second']:.1f} | {_fmt(m['speedup_vs_ar'])}x | {_fmt(m.get('bleu_vs_ar'), '.1f')} | "
                     f"{_fmt(m.get('kl'), '.3f')} | {_fmt(m.get('kl_floor'), '.3f')} |")
    lines += ["", "KL: first-tree-token KL(p_hat || p) in nats after fixed contexts (docs/sampling.md); the floor is "
              "the same estimate for direct draws from the model, which a lossless method matches up to noise. BLEU "
              "of a sampling row is against greedy `ar`: compare it with plain sampling's, which drifts by design.",
              "", "## Verdict", "", *verdicts, "",
              "Speedups are tokens/s ratios on this CPU, where every tree node costs compute; the paper measured "
              "Vicuna-7B on a GPU. Plots: `tokens_per_second.png`, `tokens_per_pass.png`; every number: "
              "`bench/results.json`.", ""]
    return "\n".join(lines), summary


def _signed(ratio: float) -> str:
    return f"{100 * ratio:+.1f}% tokens/s"


def plot_dynamic_tree(results: dict, plan: dict, out: Path) -> list[str]:
    """Tokens/s and tokens per pass of each heads set's rows (greedy), the ar line across."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    methods = results["methods"]
    labels = ["static mc_sim_7b_63", "static best size", "dynamic (paper)", "dynamic (default)"]
    written = []
    for key, ylabel, file in (("tokens_per_second", "tokens / second", "tokens_per_second.png"),
                              ("mean_accepted_per_pass", "tokens per pass", "tokens_per_pass.png")):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        width = 0.8 / len(plan["sets"])
        for j, (label, rows) in enumerate(plan["sets"].items()):
            specs = [rows["static63"], best_static(results, rows), rows["dynamic_paper"], rows["dynamic_default"]]
            values = [methods[s][key] or 0.0 for s in specs]
            xs = [i + (j - (len(plan["sets"]) - 1) / 2) * width for i in range(len(specs))]
            bars = ax.bar(xs, values, width=width, label=label)
            for bar, spec, value in zip(bars, specs, values):
                ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}\n{_nodes(results, spec)}n",
                        ha="center", va="bottom", fontsize=7)
        ar_value = methods[plan["ar"]][key] or 1.0
        ax.axhline(ar_value, color="grey", linestyle="--", linewidth=1, label=f"ar ({ar_value:.2f})")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(ylabel)
        env = results["environment"]
        ax.set_title(f"Static vs dynamic trees, greedy, MT-Bench ({env.get('cpu')}, {env.get('torch_threads')} threads)",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        written.append(file)
    return written


def run_dynamic_tree(args, command: str) -> int:
    started = time.time()
    full = args.full
    per_category = args.per_category or (5 if full else 1)
    max_new = args.max_new_tokens or (256 if full else 128)
    sizes = [int(s) for s in (args.static_sizes or ("4,6,8,12,16,24,32,48" if full else "8,16,32")).split(",")]
    if any(not 2 <= n <= 63 for n in sizes):
        raise DynTreeError("--static-sizes: Medusa's tree has 63 candidates; choose first-N cuts from 2 to 63 nodes")
    prompts = load_prompts(args.prompts, args.limit, per_category)
    sets = [("Medusa heads", args.medusa_heads), ("default heads", args.default_heads)]
    plan = dynamic_tree_methods(sets, args.default_heads, sizes, typical=full or args.typical)
    settings = BenchSettings(max_new_tokens=max_new, seed=args.seed, warmup=1, repeats=1,
                             kl_samples=args.kl_samples, kl_contexts=min(4, len(prompts)))
    context = BenchContext(model=args.model, heads=args.default_heads, weights=args.weights, seed=args.seed)
    settings.weights = context.resolved_weights()
    out = Path(args.out or "reproduce/dynamic-tree")
    results = bench(context, plan_specs(plan), prompts, settings, out / "bench", "dynamic-tree", command,
                    plots=not args.no_plots)
    notes = {label: context.with_heads(heads).heads_note if heads != args.default_heads
             else context.dyntree().heads_note for label, heads in sets}
    report, summary = dynamic_tree_report(results, plan, notes, started, command, settings, len(prompts))
    plots = [] if args.no_plots else plot_dynamic_tree(results, plan, out)
    if plots:
        report += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    (out / "REPORT.md").write_text(report)
    (out / "summary.json").write_text(json.dumps({"command": command, **summary}, indent=1) + "\n")
    print(report)
    print(f"wrote {out}/REPORT.md", file=sys.stderr)
    return 0


# -- ProPD ----------------------------------------------------------------------------------------------------
def best_pair(rows: list[dict]) -> tuple[int, int] | None:
    """The (layer, k) with the highest predicted speedup over its unpruned tree, averaged over the trees."""
    by_pair: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r["predicted_speedup"] is not None:
            by_pair.setdefault((r["layer"], r["k"]), []).append(r["predicted_speedup"])
    if not by_pair:
        return None
    return max(by_pair, key=lambda pair: sum(by_pair[pair]) / len(by_pair[pair]))


def propd_report(grid: list[dict], runs: list[dict], plan: dict, pair, notes: dict, started: float,
                 command: str, sweep_command: str, grid_settings: dict) -> tuple[str, dict]:
    lines = ["# Reproduction: ProPD's early pruning and tree sizing", "", "## The paper's claim", "", PROPD_CLAIM, "",
             "## This run", "",
             f"- early pruning: {grid_settings['prompts']} MT-Bench first turns x {grid_settings['max_new_tokens']} "
             "new tokens, greedy, every (layer, k) measured on the same passes as the unpruned tree "
             "(`benchmarks/early_prune_sweep.py`)",
             f"- tree sizing: {runs[0]['prompts']['count']} MT-Bench first turns x "
             f"{runs[0]['settings']['max_new_tokens']} new tokens at batch sizes "
             f"{', '.join(str(r['settings']['batch_size']) for r in runs)} (`dyntree bench --batch-size`: "
             "`sweep/`)",
             *machine_lines(runs[0], notes, started, command), "",
             "## Early pruning by (layer, k)", "",
             "| tree | prune after layer : top-k | nodes/pass | pruned/pass | tokens/pass unpruned | tokens/pass "
             "pruned | tokens lost/pass | forward ms unpruned | ms saved/pass | predicted speedup | exact |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in grid:
        lines.append(f"| {r['tree']} | {r['layer']}:{r['k']} | {r['nodes_per_pass']:.1f} | {r['pruned_per_pass']:.2f} | "
                     f"{r['accepted_per_pass_unpruned']:.3f} | {r['accepted_per_pass']:.3f} | "
                     f"{r['lost_tokens_per_pass']:.3f} | {r['forward_ms_unpruned']:.1f} | {r['saved_ms_per_pass']:.2f} | "
                     f"{_fmt(r['predicted_speedup'], '.3f')}x | {r['exact_share']:.2f} |")
    lines += ["", "ms saved: the later layers' forward time on every node minus on the survivors, the early head "
              "included; predicted speedup: (tokens/pass pruned / unpruned) x (step ms unpruned / pruned); exact: "
              "share of passes whose survivors' states equal the unpruned pass's bit for bit.", ""]
    if pair is not None:
        lines += [f"Best pair by predicted speedup: {pair[0]}:{pair[1]}, measured for real below "
                  f"(`{plan['pruned']}`).", ""]
    rows = sweep_rows(runs)
    lines += ["## Tree sizing across batch sizes", "", sweep_markdown(runs, sweep_command), ""]
    propd, static, ar = plan["propd"], plan["static"], "ar"
    lines += ["| batch | ProPD sizing vs ar | vs Medusa static 63 | vs fixed dynamic tree | nodes per sequence |",
              "|---:|---:|---:|---:|---|"]
    summary = {"best_pair": list(pair) if pair else None, "speedup_vs_ar": {}, "speedup_vs_static": {}}
    for row in rows:
        m = row["methods"]
        b = row["batch_size"]
        vs_static = m[propd]["tokens_per_second"] / m[static]["tokens_per_second"]
        vs_fixed = m[propd]["tokens_per_second"] / m[plan["fixed"]]["tokens_per_second"]
        summary["speedup_vs_ar"][b] = m[propd]["speedup_vs_ar"]
        summary["speedup_vs_static"][b] = vs_static
        nodes = _nodes(next(r for r in runs if r["settings"]["batch_size"] == b), propd)
        lines.append(f"| {b} | {_fmt(m[propd]['speedup_vs_ar'])}x | {vs_static:.2f}x | {vs_fixed:.2f}x | "
                     f"{nodes if nodes is not None else 'n/a'} |")
    best_ar = max(summary["speedup_vs_ar"].items(), key=lambda kv: kv[1] or 0)
    best_static = max(summary["speedup_vs_static"].items(), key=lambda kv: kv[1])
    worst_static = min(summary["speedup_vs_static"].items(), key=lambda kv: kv[1])
    lines += ["", "## Verdict", "",
              f"- ProPD-style sizing (`{propd}`) against plain decoding: {_fmt(best_ar[1])}x at best (batch "
              f"{best_ar[0]}); against Medusa's static 63-node tree: {worst_static[1]:.2f}x-{best_static[1]:.2f}x "
              f"over batch sizes {', '.join(str(r['batch_size']) for r in rows)} (the paper: 1.1-3.2x over "
              "existing decoders).",
              "- Early pruning: " + (_pruning_verdict(grid, pair) if pair else "no pair measured."), "",
              "On this CPU a tree pass costs compute for every node, so wide trees and large batches push the best "
              "tree towards plain decoding; ProPD's gains were measured on GPUs, where a wide pass costs little "
              "more than a narrow one. Plots: `early_prune.png`, `sweep/batch_sweep.png`.", ""]
    return "\n".join(lines), summary


def _pruning_verdict(grid: list[dict], pair) -> str:
    rows = [r for r in grid if (r["layer"], r["k"]) == tuple(pair)]
    return "; ".join(f"{r['tree']} with {pair[0]}:{pair[1]} prunes {r['pruned_per_pass']:.1f} of "
                     f"{r['nodes_per_pass']:.1f} nodes a pass, loses {r['lost_tokens_per_pass']:.3f} tokens and saves "
                     f"{r['saved_ms_per_pass']:.2f} ms a pass (predicted {_fmt(r['predicted_speedup'], '.3f')}x)"
                     for r in rows)


def plot_prune(grid: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for tree in dict.fromkeys(r["tree"] for r in grid):
        rows = [r for r in grid if r["tree"] == tree]
        ax.scatter([r["lost_tokens_per_pass"] for r in rows], [r["saved_ms_per_pass"] for r in rows], label=tree)
        for r in rows:
            ax.annotate(f"{r['layer']}:{r['k']}", (r["lost_tokens_per_pass"], r["saved_ms_per_pass"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("tokens lost per pass (accepted unpruned - pruned)")
    ax.set_ylabel("ms saved per pass (later layers, early head included)")
    ax.set_title("Early pruning by (layer : top-k)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "early_prune.png", dpi=110)
    plt.close(fig)
    return ["early_prune.png"]


def run_propd(args, command: str) -> int:
    from dyntree.config import parse_early_prune

    started = time.time()
    full = args.full
    pairs_text = args.prune or ("4:4,4:8,8:4,8:8,8:16,15:8,15:16" if full else "4:8,8:8,15:8")
    pairs = [parse_early_prune(p) for p in pairs_text.split(",") if p.strip()]
    if not pairs or None in pairs:
        raise DynTreeError("--prune needs LAYER:K pairs, e.g. 4:8,8:8")
    batch_sizes = [int(b) for b in (args.batch_sizes or "1,2,4,8,16").split(",")]
    per_category = args.per_category or (4 if full else 2)
    prompts = load_prompts(args.prompts, args.limit, per_category)
    if max(batch_sizes) > len(prompts):
        raise DynTreeError(f"batch size {max(batch_sizes)} needs at least as many prompts; {len(prompts)} chosen "
                           "(raise --per-category)")
    grid_prompts = load_prompts(args.prompts, args.limit, args.prune_per_category or (3 if full else 1))
    max_new = args.max_new_tokens or (128 if full else 64)
    grid_new = args.prune_max_new_tokens or (128 if full else 96)
    context = BenchContext(model=args.model, heads=args.default_heads, weights=args.weights, seed=args.seed)
    weights = context.resolved_weights()
    out = Path(args.out or "reproduce/propd")
    out.mkdir(parents=True, exist_ok=True)
    dynamic_size = args.dynamic_size or 32
    trees = [("Medusa static 63, Medusa heads", args.medusa_heads, "static"),
             (f"dynamic {dynamic_size}, default heads", args.default_heads, "dynamic")]
    grid = prune_grid(context, trees, dynamic_size, pairs, grid_prompts, grid_new)
    (out / "early_prune.json").write_text(json.dumps({"pairs": pairs_text, "rows": grid}, indent=1) + "\n")
    pair = best_pair(grid)
    opt = heads_option(args.medusa_heads, args.default_heads)
    plan = {"static": f"static{opt}", "fixed": "dynamic:n=16:lookup=0:recycle=0", "propd": "propd"}
    specs = ["ar", plan["static"], plan["fixed"], plan["propd"]]
    if pair is not None:
        plan["pruned"] = f"propd:early_prune={pair[0]}:{pair[1]}"
        specs.append(plan["pruned"])
    settings = BenchSettings(max_new_tokens=max_new, seed=args.seed, warmup=1, repeats=1, kl_samples=0,
                             weights=weights)
    runs = []
    built = build_methods(parse_method_list(",".join(specs)), context)
    for batch in batch_sizes:
        settings.batch_size = batch
        run_command = f"{command}  # batch {batch}"
        print(f"[propd sizing] batch {batch}", file=sys.stderr, flush=True)
        bench_run = run_benchmark(built, prompts, context, settings,
                                  lambda m: print(f"[propd batch {batch}] {m}", file=sys.stderr, flush=True))
        results = collect_results(bench_run, context, run_command, args.prompts)
        write_outputs(results, out / "sweep" / f"batch{batch}", plots=False)
        runs.append(results)
    sweep_command = command
    write_sweep(runs, out / "sweep", sweep_command, plots=not args.no_plots)
    notes = {"Medusa heads": context.with_heads(args.medusa_heads).heads_note,
             "default heads": context.dyntree().heads_note}
    grid_settings = {"prompts": len(grid_prompts), "max_new_tokens": grid_new}
    report, summary = propd_report(grid, runs, plan, pair, notes, started, command, sweep_command, grid_settings)
    plots = [] if args.no_plots else plot_prune(grid, out)
    if plots:
        report += "\n" + "\n".join(f"![{p}]({p})" for p in plots + ["sweep/batch_sweep.png"]) + "\n"
    (out / "REPORT.md").write_text(report)
    (out / "summary.json").write_text(json.dumps({"command": command, **summary}, indent=1, default=str) + "\n")
    print(report)
    print(f"wrote {out}/REPORT.md", file=sys.stderr)
    return 0


def prune_grid(context: BenchContext, trees, dynamic_size: int, pairs, prompts, max_new: int) -> list[dict]:
    """Every (layer, k) pair measured on each tree's very same passes (`early_prune_sweep.replay`): Medusa's
    static tree, and a dynamic tree of `dynamic_size` nodes from the heads alone (no lookup branch or recycled
    candidates, so that the tree is the heads' own, as in ProPD)."""
    sweep = load_sweep_module()
    rows = []
    for label, heads, kind in trees:
        base = context.with_heads(heads)
        engine = base.with_tree("static") if kind == "static" else base.with_tree(
            "dynamic", tree_size=dynamic_size, lookup=0, recycle=0)
        rows += _grid_rows(sweep, engine, label, pairs, prompts, max_new)
    return rows


def _grid_rows(sweep, engine, label, pairs, prompts, max_new) -> list[dict]:
    backbone = engine.model.backbone
    pruners = [sweep.build_pruner(pair, backbone, engine.heads, early_head=engine.early_head) for pair in pairs]
    ids = [engine.encode(p.turns[0]) for p in prompts]
    tallies = {(p.layer, p.k): sweep.Tally() for p in pruners}
    with torch.inference_mode():
        sweep.replay(engine, ids[0], 16, pruners, None)  # warm-up
        for i, prompt in enumerate(ids):
            sweep.replay(engine, prompt, max_new, pruners, tallies)
            print(f"[propd prune] {label}: prompt {i + 1}/{len(ids)}", file=sys.stderr, flush=True)
    return [{"tree": label, "heads": engine.heads_note, "layer": layer, "k": k, **tally.row()}
            for (layer, k), tally in tallies.items()]


# -- command line ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paper", choices=("dynamic-tree", "propd"))
    ap.add_argument("--full", action="store_true", help="every row on more prompts (the complete tables)")
    ap.add_argument("--out", default=None, help="output folder (default: reproduce/<paper>)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--medusa-heads", default="medusa", help="Medusa heads (default: the bundled ones)")
    ap.add_argument("--default-heads", default="auto", help="the default heads (bundled hydra heads)")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--prompts", default="mtbench", help="'mtbench' (shipped) or a JSONL file")
    ap.add_argument("--per-category", type=int, default=None,
                    help="prompts per MT-Bench category (default 1, --full 5; propd: 2 and 4)")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N of those prompts (quick checks)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--full 256); propd 64 (128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-samples", type=int, default=400, help="dynamic-tree: draws per KL context")
    ap.add_argument("--static-sizes", default=None,
                    help="dynamic-tree: first-N cuts of Medusa's tree to find its best size (default 8,16,32; "
                         "--full 4,6,8,12,16,24,32,48)")
    ap.add_argument("--typical", action="store_true", help="dynamic-tree: also typical acceptance (--full does)")
    ap.add_argument("--prune", default=None, help="propd: LAYER:K pairs (default 4:8,8:8,15:8)")
    ap.add_argument("--prune-per-category", type=int, default=None, help="propd: pruning prompts per category")
    ap.add_argument("--prune-max-new-tokens", type=int, default=None)
    ap.add_argument("--dynamic-size", type=int, default=None, help="propd: the pruned dynamic tree's nodes (32)")
    ap.add_argument("--batch-sizes", default=None, help="propd: default 1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/reproduce.py", *argv])
    try:
        return run_dynamic_tree(args, command) if args.paper == "dynamic-tree" else run_propd(args, command)
    except DynTreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
