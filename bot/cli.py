"""`drawbot` command line: run the bot, draw one picture, download weights, check the installation.

The composition root: the only place that builds the engine, the store and the adapters and wires them together.
Heavy imports (torch, diffsynth) happen inside the subcommands that need them, so `drawbot --help` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from bot.config import Config, ConfigError, load_config

log = logging.getLogger("drawbot")


def _default_config_path() -> Path | None:
    env = os.environ.get("DRAWBOT_CONFIG")
    if env:
        return Path(env)
    return Path("config.toml") if Path("config.toml").is_file() else None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0 < seconds <= 3600)")
    return value


def _global_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, before or after its name (`drawbot --config X run` = `drawbot run --config X`).

    SUPPRESS as the default: a subparser that did not see the option leaves the value the main parser set alone."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help="config file (default: $DRAWBOT_CONFIG, else ./config.toml if present, "
                              "else built-in defaults)")
    return options


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(prog="drawbot", description="Self-hosted Flux drawing bot for Discord and Telegram.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    run = add("run", help="run the bot (Telegram / Discord if tokens are set, else the local console)")
    run.add_argument("--model", choices=["majicflus", "tiny"], help="override engine.model")
    run.add_argument("--stop-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                     help="on SIGTERM, how long the picture being drawn may take to finish before it is left for "
                          "the next start (default 60; keep it well under the service's TimeoutStopSec)")

    draw = add("draw", help="draw one picture through the engine and save it")
    draw.add_argument("prompt")
    draw.add_argument("--seed", type=int, default=None, help="0..4294967295 (default: random, printed)")
    draw.add_argument("--steps", type=int, default=None)
    draw.add_argument("--width", type=int, default=None)
    draw.add_argument("--height", type=int, default=None)
    draw.add_argument("-o", "--output", type=Path, default=Path("drawbot.png"))
    draw.add_argument("--model", choices=["majicflus", "tiny"], help="override engine.model")

    worker = add("worker", help="draw the jobs of a bot with [cluster] on this machine's GPU (through Redis)")
    worker.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: engine.device); one worker per GPU")
    worker.add_argument("--name", default=None, help="this worker's name in logs and `drawbot doctor` "
                                                     "(default: host-device-pid)")

    add("download", help="download MajicFLUX + FLUX.1-dev encoders/VAE from ModelScope and verify them")
    add("doctor", help="check everything the bot needs and say how to fix what is missing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_path = getattr(args, "config", None) or _default_config_path()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"drawbot: config error: {exc}", file=sys.stderr)
        return 2
    from bot.logs import configured_tokens, setup_logging

    setup_logging(config.logging.level, secrets=configured_tokens(config))
    try:
        if args.command == "draw":
            from bot.draw_command import draw

            return draw(config, args)
        if args.command == "download":
            from engine.weights import WeightsError, download

            # urllib3 warns at each retry of a failed connection; the one line below says it all.
            logging.getLogger("urllib3").setLevel(logging.ERROR)
            try:
                files = download(config.engine.models_dir)
            except WeightsError as exc:
                print(f"drawbot: {exc}", file=sys.stderr)
                return 1
            print(f"all model files are present and verified under {files.root}")
            return 0
        if args.command == "doctor":
            from bot.doctor import doctor

            return doctor(config, config_path=config_path)
        if args.command == "worker":
            from bot.cluster.worker import run_worker

            return asyncio.run(run_worker(config, device=args.device, name=args.name))
        if args.command == "run":
            from bot.runner import STOP_TIMEOUT, run

            return asyncio.run(run(config, model_override=args.model, config_path=config_path,
                                   stop_timeout=args.stop_timeout or STOP_TIMEOUT))
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
