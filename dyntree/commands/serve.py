"""`dyntree serve`: an OpenAI-compatible HTTP server (chat and text completions, streaming) on one model."""

from __future__ import annotations

from ..cli import add_model_args, tree_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible /v1/chat/completions "
                                            "and /v1/completions, streaming)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                        "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients see in /v1/models and responses (default: the model's own)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="completion length when a request gives no max_tokens (capped by the context)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import DynTreeError
    from ..extras import require_extra

    require_extra("server", "dyntree serve")  # before the model loads
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise DynTreeError(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens < 1:
        raise DynTreeError("--max-tokens must be at least 1")

    from ..api import DynTree
    from ..server import create_app

    dt = DynTree.from_pretrained(args.model, heads=args.heads, tree=tree_config(args), device=args.device,
                                 dtype=args.dtype)
    app = create_app(dt, served_model_name=args.served_model_name, default_max_tokens=args.max_tokens)
    print(f"dyntree serve: {app.state.service.model_name} (tree {dt.proposer.name}; heads: {dt.heads_note}) "
          f"on http://{args.host}:{args.port}; one request decodes at a time", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
