"""`drawbot draw`: one picture through the same async engine the bot uses, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

from bot.chat import PlainMarkup
from bot.commands import SEED_MAX, DrawRules, UsageError, validate_draw
from bot.config import Config
from bot.engine_setup import EngineSetupError, choose_model, start_engine
from bot import replies
from bot.replies import steps as steps_text
from engine.jobs import EngineError, GenerationRequest, JobEvent
from engine.png import SAVE_FORMATS, convert
from engine.settings import EngineSettings



def say(text: str) -> int:
    """One line for the owner; returns the set-up exit code."""
    print(f"drawbot: {text}", file=sys.stderr)
    return 2


def check_output(output: Path) -> str | None:
    """Why the picture could not be saved at `output` (None: it can), checked before drawing, not after."""
    if output.suffix.lower() not in SAVE_FORMATS:
        return (f"-o {output}: drawbot writes {', '.join(SAVE_FORMATS)} files; end the name with one of them, "
                f"e.g. -o {output.with_suffix('.png').name}")
    folder = output.parent
    if output.is_dir():
        return f"-o {output} is a folder: name the file, e.g. -o {output / 'drawbot.png'}"
    if not folder.is_dir():
        return f"-o {output}: the folder {folder} does not exist; create it first (mkdir -p {folder})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"-o {output}: cannot write into {folder}; choose a folder you can write to"
    return None


def draw(config: Config, args: argparse.Namespace) -> int:
    settings = config.engine
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    rules = DrawRules(min_steps=settings.min_steps, max_steps=settings.max_steps, default_steps=settings.default_steps,
                      width=settings.width, height=settings.height, max_prompt_chars=config.limits.max_prompt_chars,
                      max_prompt_tokens=config.limits.max_prompt_tokens)
    try:  # the prompt rules chat applies (not empty, not too long), so the CLI accepts what a user could ask
        prompt = validate_draw(args.prompt, None, None, rules).prompt
    except UsageError as exc:
        return say(replies.usage_problem(PlainMarkup(), exc.problem).replace("/draw ", "drawbot draw "))
    problem = check_output(args.output)
    if problem:
        return say(problem)
    steps = settings.default_steps if args.steps is None else args.steps
    if not settings.min_steps <= steps <= settings.max_steps:
        print(f"drawbot: --steps must be {settings.min_steps}..{settings.max_steps} (got {steps})", file=sys.stderr)
        return 2
    seed = secrets.randbelow(SEED_MAX + 1) if args.seed is None or args.seed == -1 else args.seed
    if not 0 <= seed <= SEED_MAX:
        print(f"drawbot: --seed must be 0..{SEED_MAX} or -1 for random (got {seed})", file=sys.stderr)
        return 2
    settings = fall_back_to_tiny_if_needed(settings, explicit=bool(args.model))
    width = args.width or settings.width
    height = args.height or settings.height
    for name, value in (("--width", width), ("--height", height)):
        if not (64 <= value <= 2048 and value % 16 == 0):
            print(f"drawbot: {name} must be a multiple of 16 between 64 and 2048 (got {value})", file=sys.stderr)
            return 2
    request = GenerationRequest(prompt=prompt, seed=seed, steps=steps, width=width, height=height)
    return asyncio.run(_draw(config, settings, request, args.output))


def fall_back_to_tiny_if_needed(settings: EngineSettings, *, explicit: bool) -> EngineSettings:
    """No MajicFLUX files and no explicit choice: say so plainly and use the built-in tiny model."""
    choice = choose_model(settings, explicit=explicit)
    if choice.fell_back:
        print(f"drawbot: no MajicFLUX weights under {settings.models_dir}/ - using the built-in tiny test model, "
              "whose pictures are noise. Run `drawbot download` to fetch the real model (about 33 GB).",
              file=sys.stderr)
    return choice.settings


async def _draw(config: Config, settings: EngineSettings, request: GenerationRequest, output: Path) -> int:
    try:  # `drawbot draw` draws here, never through a cluster
        engine = await start_engine(config, settings, say=say, cluster=False)
    except EngineSetupError as exc:
        say(str(exc))
        return exc.exit_code
    bar = tqdm(total=request.steps, unit="step", desc="drawing", file=sys.stderr)

    def on_event(event: JobEvent) -> None:
        if event.kind == "progress" and event.step:
            bar.update(event.step - bar.n)

    try:
        job = engine.submit(request, on_event)
        result = await job.wait()
    except EngineError as exc:  # failed, or refused up front (a size this device cannot afford)
        bar.close()  # ends the progress line first: the complaint is a line of its own
        print(f"drawbot: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        await engine.close()
    try:
        output.write_bytes(convert(result.png, SAVE_FORMATS[output.suffix.lower()]))
    except OSError as exc:  # checked before drawing; a disk that filled up meanwhile still gets one line
        print(f"drawbot: cannot save {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"saved {output} (seed {request.seed}, {steps_text(request.steps)}, {request.width}x{request.height}, "
          f"{result.seconds:.1f} s, {result.seconds_per_step:.2f} s/step)")
    if result.test_model:
        print(f"note: {replies.TEST_MODEL_NOTICE}")
    return 0
