"""A benchmark across batch sizes (`dyntree bench --batch-size 1,2,4,8,16`): one ordinary run per batch size,
then a ProPD-style table (tokens/s and speedup over `ar` at the same batch size) and a plot of the speedups.

Pure functions from the runs' results (each a results.json dict) to the table, the markdown and the summary
JSON; the plot needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DynTreeError

SWEEP_MD = "batch_sweep.md"
SWEEP_JSON = "batch_sweep.json"
SWEEP_PNG = "batch_sweep.png"


def parse_batch_sizes(text: str | int) -> list[int]:
    """`--batch-size`: one size (`4`) or a comma-separated sweep (`1,2,4,8,16`), each at least 1, no repeats."""
    parts = [p.strip() for p in str(text).split(",")]
    sizes = []
    for part in parts:
        if not part.isdigit() or int(part) < 1:
            raise DynTreeError(f"--batch-size: expected positive integers such as 4 or 1,2,4,8, got {text!r}")
        if int(part) in sizes:
            raise DynTreeError(f"--batch-size: {part} is listed twice")
        sizes.append(int(part))
    return sizes


def check_batch_sizes(sizes: list[int], prompts: int) -> None:
    """A batch larger than the prompts to decode would only repeat the largest batch that fits."""
    if max(sizes) > prompts:
        raise DynTreeError(f"--batch-size {max(sizes)} exceeds the {prompts} prompts of this run "
                           "(choose more with --prompts/--limit/--per-category)")


def _first_tokens(results: dict, method: str) -> dict[tuple[str, int], list[int]]:
    """A method's tokens per prompt turn (first repeat) from a results.json's raw runs."""
    out: dict[tuple[str, int], list[int]] = {}
    for run in results.get("runs", []):
        if run["method"] == method:
            out.setdefault((run["prompt_id"], run["turn"]), run["token_ids"])
    return out


def sweep_rows(runs: list[dict]) -> list[dict]:
    """One row per batch size: per method tokens/s, speedup over ar (same batch size), tokens per pass, the
    greedy exact-match rate against plain decoding at the same batch size (per sequence) and, when the sweep
    has batch 1, how many of its sequences equal `ar`'s at batch 1 (each prompt's own plain decoding)."""
    single = next((r for r in runs if r["settings"].get("batch_size", 1) == 1), None)
    alone = _first_tokens(single, "ar") if single is not None else {}
    rows = []
    for results in runs:
        methods = {}
        for name, m in results["methods"].items():
            methods[name] = {"tokens_per_second": m["tokens_per_second"],
                             "speedup_vs_ar": m.get("speedup_vs_ar"),
                             "mean_accepted_per_pass": m.get("mean_accepted_per_pass"),
                             "exact_match_rate": m.get("exact_match_rate"),
                             "exact_compared": m.get("exact_compared"),
                             "equal_to_ar_batch1": None, "compared_to_ar_batch1": 0}
            if alone and m.get("greedy", True) and m.get("settings", {}).get("weights") == \
                    single["methods"].get("ar", {}).get("settings", {}).get("weights"):
                mine = _first_tokens(results, name)
                keys = [k for k in mine if k in alone]
                methods[name]["equal_to_ar_batch1"] = sum(mine[k] == alone[k] for k in keys)
                methods[name]["compared_to_ar_batch1"] = len(keys)
        rows.append({"batch_size": results["settings"].get("batch_size", 1), "methods": methods})
    return sorted(rows, key=lambda r: r["batch_size"])


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def sweep_markdown(runs: list[dict], command: str) -> str:
    """The table to paste into BENCHMARKS.md: a row per batch size; per method tokens/s (all sequences) with
    the speedup over ar at the same batch size, tokens per pass, and greedy exactness per sequence."""
    rows = sweep_rows(runs)
    names = list(rows[0]["methods"])
    first = runs[0]
    settings, env = first["settings"], first["environment"]
    header = ["batch"] + [f"{n} tok/s" if n == "ar" else f"{n} tok/s (vs ar)" for n in names] + [
        f"{n} acc/pass" for n in names if n != "ar"] + ["exact", "= ar at batch 1"]
    lines = [f"Batch sweep: {first['prompts']['count']} prompts x {settings['turns']} turn(s), "
             f"{settings['max_new_tokens']} new tokens, {env['device']}"
             + (f" ({env['gpu']})" if env.get("gpu") else f" ({env.get('cpu') or 'cpu'})")
             + f", {settings.get('weights', settings.get('dtype', 'float32'))}, {env['torch_threads']} threads",
             "", "| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for row in rows:
        cells = [str(row["batch_size"])]
        for name in names:
            m = row["methods"].get(name)
            if m is None:
                cells.append("n/a")
                continue
            speed = f"{m['tokens_per_second']:.1f}"
            if name != "ar" and m["speedup_vs_ar"] is not None:
                speed += f" ({m['speedup_vs_ar']:.2f}x)"
            cells.append(speed)
        cells += [_fmt(row["methods"][n]["mean_accepted_per_pass"], ".2f") for n in names if n != "ar"]
        exact = [(m["exact_match_rate"], m["exact_compared"]) for n, m in row["methods"].items()
                 if n != "ar" and m["exact_match_rate"] is not None]
        cells.append(", ".join(f"{100 * r:.0f}% of {c}" for r, c in exact) if exact else "n/a")
        alone = [(m["equal_to_ar_batch1"], m["compared_to_ar_batch1"]) for m in row["methods"].values()
                 if m["compared_to_ar_batch1"]]
        cells.append(f"{sum(e for e, _ in alone)}/{sum(c for _, c in alone)}" if alone else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "tok/s: new tokens of all sequences over wall time, prompts decoded batch-size at a time; vs ar: "
              "over plain decoding at the same batch size; exact: greedy sequences equal to plain decoding's, "
              "token for token (per method, in column order); = ar at batch 1: sequences of all greedy methods (ar "
              "included) equal to plain decoding of their prompt alone, in the same dtype.", "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot_sweep(runs: list[dict], path: Path) -> bool:
    """Speedup over ar against batch size, one line per method; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sweep_rows(runs)
    names = [n for n in rows[0]["methods"] if n != "ar"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = [r["batch_size"] for r in rows]
    for name in names:
        speedups = [r["methods"].get(name, {}).get("speedup_vs_ar") for r in rows]
        points = [(b, s) for b, s in zip(sizes, speedups) if s is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="ar (plain decoding)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over ar (tokens/s)")
    env = runs[0]["environment"]
    ax.set_title(f"Speedup by batch size ({env.get('gpu') or env['device']}, "
                 f"{runs[0]['settings'].get('weights', runs[0]['settings'].get('dtype', 'float32'))})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_sweep(runs: list[dict], out_dir: Path, command: str, plots: bool = True) -> list[str]:
    """batch_sweep.md (the table), batch_sweep.json (its numbers) and batch_sweep.png into `out_dir`; each
    batch size's own results are in `batch<B>/`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SWEEP_MD).write_text(sweep_markdown(runs, command))
    summary = {"format": "dyntree-batch-sweep", "command": command, "rows": sweep_rows(runs),
               "runs": {str(r["settings"].get("batch_size", 1)): f"batch{r['settings'].get('batch_size', 1)}/"
                        "results.json" for r in runs}}
    (out_dir / SWEEP_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    written = [SWEEP_MD, SWEEP_JSON]
    if plots and plot_sweep(runs, out_dir / SWEEP_PNG):
        written.append(SWEEP_PNG)
    return written
