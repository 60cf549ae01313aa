"""The `srr` command: serve, model, train, eval, diagnose, data, bench.

It sits above everything: the HTTP app (server.api), the serving core (ranker) and the
training and evaluation code (ranker.training, ranker.evaluation)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from server.api.config import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags fall back to SRR_* variables, then defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"SRR_{name.upper()}"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.description} [{env}]")
        else:
            parser.add_argument(flag, default=None, help=f"{field.description} [{env}]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def check_scorer_fits(scorer_config, model_dir: Path) -> None:
    model_cfg = json.loads((model_dir / "config.json").read_text())
    width = model_cfg.get("hidden_size")
    n_layers = model_cfg.get("num_hidden_layers")
    if width != scorer_config.hidden_size:
        raise SystemExit(f"scorer expects hidden size {scorer_config.hidden_size}, but the model "
                         f"in {model_dir} has {width}: use a scorer trained for this model")
    bad = [layer for layer in scorer_config.layers if not 0 <= layer < (n_layers or 0)]
    if bad:
        raise SystemExit(f"scorer reads layer(s) {bad}, but the model has {n_layers} layers")


def serve(settings: Settings) -> int:
    import uvicorn

    from ranker import models
    from ranker.engine import Engine
    from ranker.scorer import SRRScorer
    from server.api.app import Servings, build_servings, create_app

    try:
        scorer = SRRScorer.from_pretrained(settings.scorer_dir)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f"cannot load the scorer: {e}") from None
    model_dir = settings.model_dir or models.prepare()
    check_scorer_fits(scorer.config, model_dir)
    engine = Engine(model_dir, scorer.config.layers, cache_dir=settings.cache_dir,
                    max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager,
                    served_model_name=settings.served_model_name, dtype=settings.dtype)

    async def build() -> Servings:
        await engine.start()
        return build_servings(settings, engine, scorer)

    dead = []

    def on_engine_dead() -> None:
        dead.append(True)
        server.should_exit = True

    app = create_app(settings, build, on_engine_dead)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           timeout_graceful_shutdown=60))
    server.run()
    return 1 if dead else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="srr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    _add_settings_flags(p_serve)
    p_model = sub.add_parser("model", help="the default model")
    p_model.add_argument("action", choices=["path"])
    p_train = sub.add_parser("train", help="train the scorer on real labelled data (see ranker/training/train.py)")
    p_train.add_argument("--out", type=Path, default=Path("weights/smollm2-135m-instruct"))
    p_train.add_argument("--epochs", type=int, default=30)
    p_eval = sub.add_parser("eval", help="evaluate the scorer and the server (see ranker/evaluation/evaluate.py)")
    p_eval.add_argument("--scorer-dir", type=Path, default=Path("weights/smollm2-135m-instruct"))
    p_eval.add_argument("--out", type=Path, default=Path("weights/smollm2-135m-instruct/eval"))
    p_eval.add_argument("--advbench", type=int, default=100, help="AdvBench prompts (of 520)")
    p_eval.add_argument("--xstest", type=int, default=250, help="XSTest safe prompts (of 250)")
    p_eval.add_argument("--max-tokens", type=int, default=64)
    p_eval.add_argument("--epochs", type=int, default=30)
    p_diag = sub.add_parser("diagnose", help="diagnostics that ship nothing (see ranker/evaluation/families.py)")
    p_diag.add_argument("what", choices=["xstest-families"])
    p_diag.add_argument("--scorer-dir", type=Path, default=Path("weights/smollm2-135m-instruct"))
    p_diag.add_argument("--out", type=Path, default=Path("weights/smollm2-135m-instruct/eval"))
    p_diag.add_argument("--epochs", type=int, default=30)
    p_data = sub.add_parser("data", help="training and evaluation data")
    p_data.add_argument("action", choices=["fetch"])
    p_bench = sub.add_parser("bench", help="benchmark against plain vLLM (see server/bench.py)")
    p_bench.add_argument("--k", type=int, default=8)
    p_bench.add_argument("--tokens", type=int, default=64)
    p_bench.add_argument("--requests", type=int, default=16)
    p_bench.add_argument("--seed", type=int, default=None)
    p_bench.add_argument("--port", type=int, default=8100)
    p_bench.add_argument("--model-dir", default=None)
    p_bench.add_argument("--out", default="reports/bench.json")
    args = parser.parse_args(argv)

    if args.command == "serve":
        return serve(settings_from_args(args))
    if args.command == "eval":
        import asyncio

        from ranker.evaluation import evaluate

        report = asyncio.run(evaluate.run(args.scorer_dir, args.out, Settings().cache_dir,
                                          args.advbench, args.xstest, args.max_tokens, args.epochs))
        print((args.out / "report.md").read_text())
        return 0 if report else 1
    if args.command == "diagnose":
        import asyncio

        from ranker.evaluation import families

        asyncio.run(families.diagnose_xstest_families(args.scorer_dir, args.out, Settings().cache_dir,
                                                      args.epochs))
        print((args.out / "xstest-families.md").read_text())
        return 0
    if args.command == "data":
        from ranker.training import data

        print(data.fetch())
        return 0
    if args.command == "bench":
        from server import bench

        return bench.main(args)
    if args.command == "train":
        import asyncio

        from ranker.training import train

        report = asyncio.run(train.run(args.out, Settings().cache_dir, epochs=args.epochs))
        print(json.dumps({k: report[k] for k in ("chosen", "val", "test", "xstest")}, indent=2))
        return 0
    if args.command == "model":
        from ranker import models

        print(models.prepare())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
