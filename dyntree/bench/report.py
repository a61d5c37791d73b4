"""Reports of a benchmark: the terminal table, results.json, results.md and PNG plots, written together."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1
PHASE_LABELS = (("propose", "proposal"), ("forward", "forward"), ("verify", "verification"), ("cache", "cache"))

COLUMN_NOTES = {
    "tok/s": "new tokens / wall seconds over all prompts (timed by the harness around each call)",
    "per prompt": "median [25th-75th percentile] of each prompt's tokens/s",
    "vs hf / vs ar": "tokens/s divided by the baseline's tokens/s (same prompts, same run)",
    "acc/pass": "mean tokens added per decoding pass (1.00 = plain decoding); hf methods: counted forward calls",
    "passes": "decoding passes after the prefill (hf methods: counted forward calls)",
    "propose / forward / verify / cache": "ms per decoding pass: proposal (heads + tree), forward (backbone "
                                          "on the tree), verification (greedy check, or the sampling "
                                          "acceptance), cache (commit accepted keys/values); transformers does "
                                          "not split its time",
    "prefill": "mean ms of the prompt's forward pass (our methods only)",
    "peak MiB": "CPU: process peak RSS during the method's runs (models of all methods included), with the "
                "growth during a run in brackets; CUDA: max allocated",
    "exact": "prompts whose output equals ar's token for token (greedy methods only; n/a when sampling, and for "
             "a peer on other numerics such as llama-cpp's Q4_1, compared by BLEU only)",
    "BLEU": "sacrebleu corpus BLEU of the outputs against greedy ar's on the same prompts (100 = same text); "
            "for a sampling method compare with plain sampling (ar:temperature=T) at the same settings",
    "KL (floor)": "sampling methods: first-tree-token KL(p_hat || p) in nats between the token the method emits "
                  "after a fixed context and the model's own sampling distribution, mean over a few contexts; "
                  "in brackets the floor, the same estimate for as many direct draws from p (a lossless method "
                  "matches it up to noise); docs/sampling.md defines it. Greedy methods: n/a",
}


def _fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _num(value: float) -> str:
    """Three significant figures, enough to compare at a glance."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _kl(m: dict) -> str:
    if m.get("kl") is None:
        return "inf" if (m.get("kl_note") or "").startswith("infinite") else "n/a"
    return f"{m['kl']:.3f} ({_fmt(m.get('kl_floor'), '.3f')})"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def table_rows(results: dict) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Display strings per method for the two tables (speed, then where the time and memory go), shared by
    the terminal and the markdown report."""
    speed, cost = [], []
    for name, m in results["methods"].items():
        spread = m.get("tokens_per_second_per_prompt") or {}
        phases = m.get("phase_ms_per_pass") or {}
        mem = _mib(m.get("peak_memory_bytes"))
        if m.get("run_memory_bytes") is not None:
            mem += f" (+{_mib(m['run_memory_bytes'])})"
        exact = "n/a"
        if m.get("exact_match_rate") is not None:
            exact = f"{100 * m['exact_match_rate']:.0f}% ({m['exact_matches']}/{m['exact_compared']})"
        speed.append({
            "method": name,
            "tok/s": f"{m['tokens_per_second']:.1f}",
            "per prompt": (f"{_num(spread['median'])} [{_num(spread['p25'])}-{_num(spread['p75'])}]"
                           if spread else "n/a"),
            "vs hf": _fmt(m.get("speedup_vs_hf"), ".2f") + ("x" if m.get("speedup_vs_hf") is not None else ""),
            "vs ar": _fmt(m.get("speedup_vs_ar"), ".2f") + ("x" if m.get("speedup_vs_ar") is not None else ""),
            "acc/pass": _fmt(m.get("mean_accepted_per_pass")),
            "exact": exact,
            "BLEU": _fmt(m.get("bleu_vs_ar"), ".1f"),
            "KL (floor)": _kl(m),
        })
        cost.append({
            "method": name,
            "tokens": str(m["new_tokens"]),
            "passes": _fmt(m.get("decode_passes"), "d"),
            **{label: _fmt(phases.get(p) if phases else None, ".1f") for label, p in PHASE_LABELS},
            "prefill": _fmt(m.get("prefill_ms_mean"), ".1f"),
            "peak MiB": mem,
        })
    return speed, cost


def _threads(env: dict) -> str:
    n = env["torch_threads"]
    return f"{n} thread" + ("" if n == 1 else "s")


def table_titles(results: dict) -> tuple[str, str]:
    settings = results["settings"]
    env = results["environment"]
    return (f"Speed: {results['prompts']['count']} prompts x {settings['turns']} turn(s), "
            f"{settings['max_new_tokens']} new tokens, {env['device']}, {settings.get('weights', settings.get('dtype', 'float32'))}, "
            f"{_threads(env)}" + (f", batches of {settings['batch_size']}" if settings.get("batch_size", 1) > 1
                                  else ""),
            "Where the time goes: ms per decoding pass (prefill: ms per prompt), and memory")


def rich_tables(results: dict) -> list:
    from rich import box
    from rich.table import Table

    tables = []
    for title, rows in zip(table_titles(results), table_rows(results)):
        table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
        for col in rows[0]:
            table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row.values())
        tables.append(table)
    return tables


def notes(results: dict) -> list[str]:
    """Lines worth reading under the table: heads, exactness misses, noise."""
    lines = []
    if results.get("heads"):
        lines.append(f"heads: {results['heads']}")
    for name, m in results["methods"].items():
        for miss in m.get("mismatches", [])[:3]:
            text = ""
            if "ar_text" in miss:
                text = f": ar {miss['ar_text']!r} vs {miss['method_text']!r}"
            gap = f", logit gap {miss['logit_gap']:.3g}" if miss.get("logit_gap") is not None else ""
            lines.append(f"{name} differs from plain decoding on prompt {miss['prompt_id']} turn {miss['turn']} at "
                         f"token {miss['position']} ({miss['ar_token']} vs {miss['method_token']}{gap}){text}")
        if not m.get("repeats_agree", True):
            lines.append(f"{name}: repeats of the same prompt gave different tokens (non-deterministic)")
        prune = m.get("early_prune")
        if prune:
            measured = ""
            if prune.get("saved_ms_per_pass") is not None:
                lost = prune.get("lost_tokens_per_pass")
                measured = (f"; measured against the unpruned pass: {prune['saved_ms_per_pass']:.2f} ms saved"
                            + (f", {lost:.3f} tokens lost per pass" if lost is not None else "")
                            + " (measure mode: its tokens/s mean nothing)")
            lines.append(f"{name}: early pruning after layer {prune['layer']} to the {prune['head']} head's top-"
                         f"{prune['k']}: {prune['pruned_nodes_per_pass']:.2f} nodes pruned per pass "
                         f"({prune['pruned_share']:.0%}); {prune['miss_share']:.1%} of passes stopped at a pruned "
                         f"node{measured}")
    env = results["environment"]
    if env.get("load_average_start") and env.get("load_average_end"):
        lines.append(f"load average (1 min) at start {env['load_average_start'][0]:.2f}, "
                     f"at end {env['load_average_end'][0]:.2f} on {env['logical_cpus']} logical CPUs")
    return lines


def markdown(results: dict) -> str:
    tables = []
    for title, rows in zip(table_titles(results), table_rows(results)):
        tables += [f"{title}:", "", "| " + " | ".join(rows[0]) + " |",
                   "|" + "|".join(":---" if c == "method" else "---:" for c in rows[0]) + "|",
                   *("| " + " | ".join(r.values()) + " |" for r in rows), ""]
    env = results["environment"]
    settings = results["settings"]
    lines = [
        "# dyntree bench results", "",
        f"Command: `{results['command']}`", "",
        f"Model: {results['model']}; heads: {results.get('heads') or 'none'}", "",
        f"Prompts: {results['prompts']['source']} ({results['prompts']['count']} prompts, "
        f"{settings['turns']} turn(s)); max new tokens {settings['max_new_tokens']}; seed {settings['seed']}; "
        f"warm-up {settings['warmup']}; repeats {settings['repeats']}"
        + (f"; KL: {settings['kl_samples']} samples on up to {settings['kl_contexts']} contexts"
           if settings.get("kl_samples") else ""), "",
        f"Environment: {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['torch_threads']} torch threads, "
        f"device {env['device']}{', ' + env['gpu'] if env.get('gpu') else ''}; torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}; commit {env.get('git_commit')}; "
        f"{env['time_utc']}", "",
        *tables,
    ]
    cats = _category_table(results)
    if cats:
        lines += cats + [""]
    lines += ["Columns:", ""] + [f"- **{k}**: {v}" for k, v in COLUMN_NOTES.items()] + [""]
    extra = notes(results)
    if extra:
        lines += ["Notes:", ""] + [f"- {n}" for n in extra] + [""]
    return "\n".join(lines)


def _category_table(results: dict) -> list[str]:
    methods = results["methods"]
    cats = sorted({c for m in methods.values() for c in (m.get("by_category") or {})})
    base = "hf" if "hf" in methods else "ar" if "ar" in methods else None
    if not cats or base is None:
        return []
    lines = [f"Speedup over `{base}` by category:", "",
             "| method | " + " | ".join(cats) + " |", "|:---|" + "---:|" * len(cats)]
    for name, m in methods.items():
        by_cat = m.get("by_category") or {}
        cells = [_fmt((by_cat.get(c) or {}).get(f"speedup_vs_{base}")) for c in cats]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# -- plots ----------------------------------------------------------------------------------------------------
def plot_all(results: dict, out_dir: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for file_name, draw in (("tokens_per_second.png", _plot_throughput), ("accepted_lengths.png", _plot_accepted),
                            ("speedup_by_category.png", _plot_categories)):
        fig = draw(results, plt)
        if fig is None:
            continue
        fig.savefig(out_dir / file_name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(file_name)
    return written


def _subtitle(results: dict) -> str:
    env = results["environment"]
    model = Path(results["model"]).name if results["model"] != "default" else "default model"
    return (f"{model} - {results['prompts']['count']} prompts, {results['settings']['max_new_tokens']} "
            f"new tokens - {env['device']}, {_threads(env)}")


def _plot_throughput(results: dict, plt):
    runs = results["runs"]
    names = list(results["methods"])
    per_prompt = {n: [] for n in names}
    for r in runs:
        if r["repeat"] == 0 and r["wall_seconds"] > 0:
            per_prompt[r["method"]].append(r["new_tokens"] / r["wall_seconds"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4.2))
    totals = [results["methods"][n]["tokens_per_second"] for n in names]
    ax.bar(range(len(names)), totals, color="#9ecae1", label="all prompts (total tokens / total time)")
    ax.boxplot([per_prompt[n] or [0.0] for n in names], positions=range(len(names)), widths=0.35,
               showfliers=False, medianprops={"color": "#08519c"})
    top = max([*totals, *(v for vals in per_prompt.values() for v in vals)], default=1.0) or 1.0
    for i, n in enumerate(names):
        values = per_prompt[n]
        jitter = [i + 0.25 * ((k * 0.618) % 1 - 0.5) for k in range(len(values))]
        ax.scatter(jitter, values, s=10, color="#08306b", alpha=0.6, zorder=3)
        label = f"{totals[i]:.1f}"
        speedup = results["methods"][n].get("speedup_vs_hf")
        if speedup is not None and n != "hf":
            label += f"\n{speedup:.2f}x hf"
        ax.text(i, max([totals[i], *values]) + 0.02 * top, label, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.22)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 5 else 0)
    ax.set_ylabel("tokens / second")
    ax.set_title("Decoding speed per method\n" + _subtitle(results), fontsize=10)
    ax.legend(handles=[ax.patches[0], ax.collections[-1]],
              labels=["all prompts: total tokens / total time", "one prompt (box: quartiles)"],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(names) <= 5 else -0.2), ncol=2,
              fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_accepted(results: dict, plt):
    hists = {n: m["accepted_histogram"] for n, m in results["methods"].items() if m.get("accepted_histogram")}
    if not hists:
        return None
    lengths = list(range(1, max(int(k) for h in hists.values() for k in h) + 1))
    fig, ax = plt.subplots(figsize=(min(11.0, max(5.0, 0.45 * len(lengths) * len(hists) + 2)), 4.2))
    width = 0.8 / len(hists)
    for j, (name, hist) in enumerate(hists.items()):
        total = sum(hist.values())
        shares = [hist.get(str(k), 0) / total for k in lengths]
        mean = results["methods"][name]["mean_accepted_per_pass"]
        ax.bar([k + (j - (len(hists) - 1) / 2) * width for k in lengths], shares, width=width,
               label=f"{name} (mean {mean:.2f})")
    ax.set_xticks(lengths)
    ax.set_xlabel("tokens accepted in one forward pass")
    ax.set_ylabel("share of passes")
    ax.set_title("Accepted tokens per pass\n" + _subtitle(results), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_categories(results: dict, plt):
    methods = results["methods"]
    base = "hf" if "hf" in methods else "ar" if "ar" in methods else None
    cats = sorted({c for m in methods.values() for c in (m.get("by_category") or {})})
    if base is None or not cats:
        return None
    shown = [n for n in methods if n != base]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(cats) * len(shown) + 2), 4.2))
    width = 0.8 / len(shown)
    for j, name in enumerate(shown):
        by_cat = methods[name].get("by_category") or {}
        values = [(by_cat.get(c) or {}).get(f"speedup_vs_{base}") or 0.0 for c in cats]
        ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(cats))], values, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20 if len(cats) > 5 else 0)
    ax.set_ylabel(f"speedup over {base} (tokens/s ratio)")
    ax.set_title(f"Speedup over {base} by category\n" + _subtitle(results), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


# -- writing --------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(results: dict, out_dir: Path, plots: bool = True) -> list[str]:
    """results.json, results.md, command.txt and the plots, all in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        results["plots"] = plot_all(results, out_dir)
        written += results["plots"]
    _atomic_write(out_dir / "results.md", markdown(results))
    _atomic_write(out_dir / "command.txt", results["command"] + "\n")
    _atomic_write(out_dir / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return ["results.json", "results.md", "command.txt"] + written
