"""Serving benchmark: `dyntree serve` under concurrency 1, 2, 4, 8 and 16, one-at-a-time vs batched, plus RSS.

For each `--max-batch` value (default "1,16": 1 is the one-at-a-time server, every request waits for the
previous one's whole answer; 16 lets all 16 clients share each forward pass) it starts the server on the
default model and heads, runs `load_test.py` at each concurrency, then (for the last value only, unless
`--rss-all`) reads the server's RSS after a warm-up, sends `--rss-requests` (500) more requests at
concurrency 8 and reads it again. Then it sends SIGTERM and records how the server stopped. Everything goes
into one JSON file, and a markdown table for BENCHMARKS.md is printed.

Run it alone on the machine (timings are meaningless on shared cores):

  OMP_NUM_THREADS=2 python benchmarks/serve_load.py --threads 2 --out docs/bench/serve-load.json

Extra server options go after `--`: `... --out x.json -- --tree dynamic --tree-size 8`.

The load-test client runs in a process of its own, out of the engine's way as far as the machine allows:
on its own CPUs when there are more CPUs than the server's `--threads` (the server, and the library run, get
the first ones), else at the lowest priority (nice 19), so that it takes the CPU only where the engine leaves
it. The JSON records which (`client_placement`).

`--library` first decodes the same requests (the concurrency-1 level's prompts, in its order, greedy, chat
template, `--max-tokens` each) through `DynTree.stream` in a process of its own with the server's threads, so
one client through the server reads as a ratio of the library's tokens/s from one run:

  python benchmarks/serve_load.py --threads 2 --library --max-batch 16 --concurrency 1,8 --max-tokens 128 \
      --out docs/bench/serve-load/one-client.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import load_prompts  # noqa: E402

CONCURRENCY = (1, 2, 4, 8, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_healthy(url: str, process: subprocess.Popen, seconds: float) -> None:
    import httpx

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {seconds:g} s")


def placement(threads: int | None) -> dict:
    """Where the server (and the library run) and the load-test client run: CPU sets when the machine has CPUs
    to spare beyond the server's threads, else the whole machine for both and nice 19 for the client."""
    cpus = sorted(os.sched_getaffinity(0))
    wanted = threads or len(cpus)
    if len(cpus) > wanted:
        return {"server_cpus": cpus[:wanted], "client_cpus": cpus[wanted:], "client_nice": 0,
                "how": f"server on CPUs {cpus[:wanted]}, client on CPUs {cpus[wanted:]}"}
    return {"server_cpus": None, "client_cpus": None, "client_nice": 19,
            "how": f"{len(cpus)} CPUs, all the server's threads: client at nice 19"}


def confine(cpus: list[int] | None, nice: int = 0):
    """A `preexec_fn` putting the child on `cpus` and at `nice` (None when there is nothing to do)."""
    if cpus is None and not nice:
        return None

    def apply():
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if nice:
            os.nice(nice)

    return apply


def client_load(url: str, concurrency: int, requests: int, args, place: dict, time_limit: float = 3600.0) -> dict:
    """One level of `load_test.py`, in a process of its own placed by `place`; its summary."""
    out = Path(args.out).parent / f".load-c{concurrency}.json"
    command = [sys.executable, str(Path(__file__).resolve().parent / "load_test.py"), "--url", url,
               "--concurrency", str(concurrency), "--requests", str(requests), "--max-tokens",
               str(args.max_tokens), "--timeout", str(args.request_timeout), "--time-limit", str(time_limit),
               "--out", str(out)]
    if args.prompts:
        command += ["--prompts", args.prompts]
    done = subprocess.run(command, capture_output=True, text=True,
                          preexec_fn=confine(place["client_cpus"], place["client_nice"]))
    if not out.exists():
        raise RuntimeError("the load test failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
    summary = json.loads(out.read_text())
    out.unlink()
    return summary


def serve(max_batch: int, args, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "dyntree", "serve", "--port", str(port), "--max-batch", str(max_batch),
               "--max-queue", str(args.max_queue), "--log-level", "warning", "--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += args.server_args
    log = log_path.open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                            preexec_fn=confine(args.placement["server_cpus"]))


def stop(process: subprocess.Popen, seconds: float = 120.0) -> dict:
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is the normal end.
    return {"exit_code": code, "graceful": code in (0, -signal.SIGTERM),
            "stop_seconds": round(time.monotonic() - start, 2)}


def run_config(max_batch: int, args, prompts: list[str], measure_rss: bool, log_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(max_batch, args, port, log_dir / f"serve-b{max_batch}.log")
    out: dict = {"max_batch": max_batch, "levels": []}
    try:
        wait_healthy(url, process, args.startup_timeout)
        place = args.placement
        client_load(url, 1, 2, args, place)  # warm-up: first-call costs out of the way
        for concurrency in args.concurrency:
            requests = max(args.requests_per_level, 2 * concurrency)
            summary = client_load(url, concurrency, requests, args, place)
            print(json.dumps({"max_batch": max_batch, **{k: summary[k] for k in (
                "concurrency", "ok", "errors", "throughput_tokens_per_s", "ttft_p50_s", "latency_p50_s",
                "latency_p95_s")}}), flush=True)
            out["levels"].append(summary)
        if measure_rss:
            # Every prompt once first: the KV cache grows (once) to the longest prompt + completion it has to
            # hold, which is its working size, not a leak; growth is measured from there.
            client_load(url, 8, len(prompts), args, place)
            before = rss_bytes(process.pid)
            summary = client_load(url, 8, args.rss_requests, args, place, time_limit=7200)
            after = rss_bytes(process.pid)
            out["rss"] = {"requests": args.rss_requests, "concurrency": 8, "before_bytes": before,
                          "after_bytes": after, "growth_percent": round(100 * (after - before) / before, 2),
                          "ok": summary["ok"], "errors": summary["errors"],
                          "throughput_tokens_per_s": summary["throughput_tokens_per_s"]}
            print(json.dumps({"max_batch": max_batch, "rss": out["rss"]}), flush=True)
    finally:
        out["shutdown"] = stop(process)
    return out


LIBRARY_RUN = """
import json, sys, time
import torch
from dyntree import DynTree
args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])
dt = DynTree.from_pretrained(args["model"])
list(dt.stream(args["prompts"][0], max_new_tokens=4))  # warm-up, as the server gets one
tokens, start = 0, time.perf_counter()
for prompt in args["prompts"]:
    tokens += sum(len(chunk.token_ids) for chunk in dt.stream(prompt, max_new_tokens=args["max_tokens"]))
seconds = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                  "tree": dt.proposer.name}))
"""


def library_speed(args, prompts: list[str]) -> dict:
    """Tokens/s of the same requests as concurrency 1 (same prompts, order and lengths) through the library's
    `DynTree.stream`, one after another, in a fresh process with the server's threads."""
    requests = max(args.requests_per_level, 2)
    chosen = [prompts[i % len(prompts)] for i in range(requests)]
    payload = json.dumps({"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens,
                          "prompts": chosen})
    done = subprocess.run([sys.executable, "-c", LIBRARY_RUN, payload], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], preexec_fn=confine(args.placement["server_cpus"]))
    if done.returncode != 0:
        raise RuntimeError("the library run failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"library": result}), flush=True)
    return result


def table(results: list[dict], library: dict | None = None) -> str:
    lines = ["| max batch | concurrency | ok / errors | tokens/s | vs c=1 | TTFT p50 (s) | latency p50 (s) | p95 (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for config in results:
        base = config["levels"][0]["throughput_tokens_per_s"] if config["levels"] else 0
        for level in config["levels"]:
            ratio = level["throughput_tokens_per_s"] / base if base else 0
            lines.append(f"| {config['max_batch']} | {level['concurrency']} | {level['ok']} / {level['errors']} | "
                         f"{level['throughput_tokens_per_s']:.1f} | {ratio:.2f}x | {level['ttft_p50_s']} | "
                         f"{level['latency_p50_s']} | {level['latency_p95_s']} |")
    if library is not None:
        lines.append(f"\nLibrary (`DynTree.stream`, the concurrency-1 requests one after another): "
                     f"{library['tokens_per_s']:.1f} tokens/s")
        for config in results:
            one = [level for level in config["levels"] if level["concurrency"] == 1]
            if one and library["tokens_per_s"]:
                lines.append(f"One client through the server (max batch {config['max_batch']}): "
                             f"{one[0]['throughput_tokens_per_s'] / library['tokens_per_s']:.2f}x the library")
    for config in results:
        if "rss" in config:
            r = config["rss"]
            lines.append(f"\nRSS (max batch {config['max_batch']}): {r['before_bytes'] / 2**20:.1f} MiB before and "
                         f"{r['after_bytes'] / 2**20:.1f} MiB after {r['requests']} requests at concurrency 8 "
                         f"({r['growth_percent']:+.2f}%; {r['ok']} ok, {r['errors']} errors)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--max-batch", default="1,16", help="comma-separated --max-batch values to compare")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--requests-per-level", type=int, default=32,
                        help="requests at each concurrency (at least twice the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rss-requests", type=int, default=500)
    parser.add_argument("--rss-all", action="store_true", help="measure RSS for every --max-batch value")
    parser.add_argument("--prompts", default=None, help="prompt file (default: the packaged MT-Bench first turns)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--library", action="store_true",
                        help="first time the concurrency-1 requests through the library, for the ratio")
    args = parser.parse_args(argv)
    args.server_args = server_args
    args.placement = placement(args.threads)
    print(f"placement: {args.placement['how']}", flush=True)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.max_batch.split(",")]
    prompts = load_prompts(args.prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    library = library_speed(args, prompts) if args.library else None
    results = []
    for i, max_batch in enumerate(batches):
        results.append(run_config(max_batch, args, prompts, args.rss_all or i == len(batches) - 1, out.parent))
        report = {"settings": {k: v for k, v in vars(args).items()}, "started": started,
                  "seconds": round(time.time() - started, 1), "cpu_count": os.cpu_count(),
                  "client_placement": args.placement["how"], "library": library,
                  "results": results}
        out.write_text(json.dumps(report, indent=1) + "\n")  # after each configuration: a partial run is kept
    print(table(results, library))
    lost = sum(level["errors"] for config in results for level in config["levels"])
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
