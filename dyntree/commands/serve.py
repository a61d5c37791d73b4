"""`dyntree serve`: an OpenAI-compatible HTTP server (chat and text completions, streaming) on one model."""

from __future__ import annotations

from ..cli import add_model_args, tree_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible /v1/chat/completions "
                                            "and /v1/completions, streaming, continuous batching, /metrics)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                        "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients see in /v1/models and responses (default: the model's own)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="completion length when a request gives no max_tokens (capped by the context)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in each forward pass (continuous batching; 1 = one at a time)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a free batch row; beyond that the server answers 429")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take from arrival to its last token, then 504 (0 = no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds requests in flight get to finish before they are failed with 503")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: the model's context); with "
                        "--max-batch it bounds the KV cache's memory")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_model_args(p)
    p.set_defaults(func=run)


def measured_tree_size_for(dt, max_batch: int):
    """The engine's node budget by batch size (`DynTree.nodes_for_batch` through `trees.sizing.batch_sizer`):
    batch sizes 1, 2, 4, ... up to `max_batch` measured now, before serving, once per machine (then read from
    the cache), as is an auto-sized tree's latency at those batch sizes (`TreeSizer.prepare`); None (the
    engine's default rule) when the heads have no profile of this tree."""
    from ..trees.sizing import batch_sizer

    if max_batch < 2:
        return None
    batches = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})
    if dt.sizer.prepare(dt.config, batches) is None:
        return None
    return batch_sizer(dt.nodes_for_batch, batches)


def run(args) -> int:
    from ..errors import DynTreeError
    from ..extras import require_extra

    require_extra("server", "dyntree serve")  # before the model loads

    if not 0 <= args.port <= 65535:
        raise DynTreeError(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens < 1:
        raise DynTreeError("--max-tokens must be at least 1")
    if args.max_batch < 1:
        raise DynTreeError("--max-batch must be at least 1")
    if args.max_queue < 0:
        raise DynTreeError("--max-queue must be at least 0")
    if args.request_timeout < 0 or args.shutdown_timeout < 0:
        raise DynTreeError("--request-timeout and --shutdown-timeout must be >= 0")

    import torch

    from ..api import DynTree
    from ..engine import on_own_thread
    from ..server import create_app, run_server

    threads = torch.get_num_threads()  # `--threads`, set on this thread; OpenMP keeps it per thread

    def load():
        torch.set_num_threads(threads)
        dt = DynTree.from_pretrained(args.model, heads=args.heads, tree=tree_config(args), device=args.device,
                                     weights=args.weights)
        return dt, measured_tree_size_for(dt, args.max_batch)

    # Torch work stays off the main thread, so that the engine thread owns the process's only OpenMP pool.
    dt, sizer = on_own_thread(load)
    app = create_app(dt, served_model_name=args.served_model_name, default_max_tokens=args.max_tokens,
                     max_batch=args.max_batch, max_queue=args.max_queue,
                     request_timeout=args.request_timeout or None, shutdown_timeout=args.shutdown_timeout,
                     max_model_len=args.max_model_len, tree_size_for=sizer)
    if sizer is not None:
        print("dyntree serve: nodes per sequence by batch size (measured on this machine): " + ", ".join(
            f"{b}: {n}" for b, n in sorted(sizer.choices.items())), flush=True)
    service = app.state.service
    print(f"dyntree serve: {service.model_name} (tree {dt.proposer.name}; heads: {dt.heads_note}) "
          f"on http://{args.host}:{args.port}; up to {args.max_batch} requests decode together, "
          f"{args.max_queue} more may wait", flush=True)
    run_server(app, args.host, args.port, args.log_level)
    return 0
