"""`drawbot doctor`: check everything the bot needs, print one table with a verdict and the fix for each, and exit 0
when the bot can start (1 when it cannot).

Each check is a small function of the config and of `Facts`, what was measured about this machine (Python, torch,
CUDA, GPUs, RAM, free disk). `probe()` measures them for real; tests build `Facts` by hand to play "no CUDA" or "8 GB
card". Files (model weights, token files, the database) are checked where the config says they are.

Tokens are never printed: a token check says only where the token comes from ("set (from env ...)").
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sqlite3
import stat
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal, TextIO
from urllib.parse import quote

from bot.config import Config, ConfigError, read_token

GIB = 1024**3

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 4)

# Host RAM each mode needs for MajicFLUX, in GiB as the OS reports it: the weights kept in RAM plus ~1.5 GiB for
# Python, torch and DiffSynth. offload: fp8 DiT 11.1 + bf16 T5 9.1 + CLIP/VAE 0.4 = 20.6; stream: fp8 DiT 11.1 +
# fp8 T5 4.6 + 0.4 = 16.1 while loading (the bot process peaked at 17.7 GiB, bench/startup.py), then less: the GPU's
# blocks give their host copies back (13.9 GiB at an 8 GB budget, 9.7 at 12); resident: what loading passes through.
RAM_NEEDED_GIB = {"offload": 24.0, "resident": 12.0}  # load peaks measured in bench/ (RSS)
# stream: engine.host_ram says, by the weight path the budget picks (pinned 17.7 GiB, file-backed 10 GiB)
RESIDENT_VRAM_GIB = 24.0
"""`resident` keeps fp8 DiT + bf16 T5/CLIP/VAE (~22 GiB) on the card, plus activations."""
SLOW_BUDGET_GIB = 6.0
"""Below this `vram_budget_gb` almost every layer is copied in for every step: it works, slowly."""
DOWNLOAD_GIB = 35.0
"""`drawbot download` writes ~33 GB."""
MIN_FREE_DISK_GIB = 1.0
PNG_BYTES_PER_PIXEL = 2.0
"""Rough size of a stored picture: PNG of a detailed 8-bit RGB image (~2 MB at 1024x1024)."""


class Verdict(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "-"


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    """What was found; may hold several lines."""
    fix: str = ""
    """What to do about a FAIL or WARN."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int | None = None
    capability: tuple[int, int] = (0, 0)
    bf16: bool = True
    compile_blocker: str | None = None
    """Why torch.compile cannot run on this GPU here (engine.compat.compile_unsupported_reason), or None."""


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class Facts:
    """What `probe()` measured about this machine (or what a test says it is)."""

    python: tuple[int, int, int]
    torch_version: str | None
    """None when torch cannot be imported (`torch_error` says why)."""
    torch_cuda: str | None
    """The CUDA version torch was built for; None for a CPU-only build."""
    cuda_available: bool
    gpus: tuple[Gpu, ...]
    ram_total: int
    ram_available: int
    swap_total: int = 0
    torch_error: str | None = None
    cuda_error: str | None = None
    free_bytes: Callable[[Path], int] = field(default=_disk_free)
    """Free bytes on the file system holding an existing path."""


def probe() -> Facts:
    """Measure this machine. Imports torch (a few seconds) and initialises CUDA on each GPU."""
    import psutil

    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    python = (sys.version_info.major, sys.version_info.minor, sys.version_info.micro)
    machine = functools.partial(Facts, python=python, ram_total=memory.total, ram_available=memory.available,
                                swap_total=swap.total)
    try:
        import torch
    except Exception as exc:  # a broken install must still get a table, not a traceback
        return machine(torch_version=None, torch_cuda=None, cuda_available=False, gpus=(),
                       torch_error=f"{type(exc).__name__}: {exc}")
    cuda_error = None
    gpus: list[Gpu] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = torch.cuda.is_available()
            from engine.compat import compile_unsupported_reason

            for index in range(torch.cuda.device_count() if available else 0):
                props = torch.cuda.get_device_properties(index)
                free, total = torch.cuda.mem_get_info(index)
                # Native bfloat16 arrived with Ampere (compute 8.x): older cards emulate it slowly.
                gpus.append(Gpu(index=index, name=props.name, total_bytes=int(total), free_bytes=int(free),
                                capability=(props.major, props.minor), bf16=props.major >= 8,
                                compile_blocker=compile_unsupported_reason(torch.device("cuda", index))))
        except Exception as exc:
            available, cuda_error = False, f"{type(exc).__name__}: {exc}"
    if cuda_error is None and not available:  # torch explains itself in a warning, e.g. "... driver too old"
        cuda_error = next((str(w.message) for w in reversed(caught) if "cuda" in str(w.message).lower()), None)
    return machine(torch_version=str(torch.__version__), torch_cuda=torch.version.cuda, cuda_available=available,
                   gpus=tuple(gpus), cuda_error=cuda_error)


# -- helpers ------------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:2])


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _needs_gpu(config: Config) -> bool:
    return config.engine.model != "tiny" and config.engine.device != "cpu"


def _gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _chosen_gpu(config: Config, facts: Facts) -> Gpu | None:
    index = _gpu_index(config.engine.device)
    return next((g for g in facts.gpus if g.index == index), None)


def _download_command(config_path: Path | None) -> str:
    where = f" --config {config_path}" if config_path else ""
    return f"drawbot{where} download"


# -- the checks ---------------------------------------------------------------------------------------------------


def check_config(config: Config, config_path: Path | None) -> Check:
    if config_path is None:
        return Check("config", Verdict.OK, "no config file: built-in defaults (see config.example.toml)")
    return Check("config", Verdict.OK, f"{config_path} (valid)")


def check_python(facts: Facts) -> Check:
    shown = ".".join(map(str, facts.python))
    if tuple(facts.python[:2]) < MIN_PYTHON:
        return Check("python", Verdict.FAIL, f"{shown} ({sys.executable})",
                     f"drawbot needs Python {'.'.join(map(str, MIN_PYTHON))}+: make the venv with a newer python3")
    return Check("python", Verdict.OK, f"{shown} ({sys.executable})")


def check_torch(facts: Facts) -> Check:
    if facts.torch_version is None:
        return Check("torch", Verdict.FAIL, f"cannot import torch: {facts.torch_error}",
                     "install the dependencies: `make install` in the drawbot folder")
    built = f"built for CUDA {facts.torch_cuda}" if facts.torch_cuda else "CPU-only build"
    if _version_tuple(facts.torch_version) < MIN_TORCH:
        return Check("torch", Verdict.FAIL, f"{facts.torch_version} ({built})",
                     f"drawbot needs torch {'.'.join(map(str, MIN_TORCH))}+: `make install` (see constraints.txt)")
    return Check("torch", Verdict.OK, f"{facts.torch_version} ({built})")


def check_cuda(config: Config, facts: Facts) -> Check:
    device = config.engine.device
    gpus = ", ".join(f"GPU {g.index}: {g.name}" for g in facts.gpus)
    if facts.cuda_available and facts.gpus:
        gpu = _chosen_gpu(config, facts)
        if gpu is None:
            return Check("cuda", Verdict.FAIL, f"engine.device = {device!r} but this machine has {gpus}",
                         f"set [engine] device to \"cuda:0\" ... \"cuda:{len(facts.gpus) - 1}\", or \"auto\"")
        detail = (f"GPU {gpu.index}: {gpu.name}, {_gib(gpu.total_bytes)}, compute {gpu.capability[0]}."
                  f"{gpu.capability[1]}, torch built for CUDA {facts.torch_cuda}")
        if device == "cpu":
            return Check("cuda", Verdict.OK, detail + " (not used: engine.device = \"cpu\")")
        if not _needs_gpu(config):
            return Check("cuda", Verdict.OK, detail)
        if not gpu.bf16:
            return Check("cuda", Verdict.WARN, detail + "; no native bfloat16",
                         "this card computes bfloat16 slowly (it predates RTX 30xx); pictures will take longer")
        return Check("cuda", Verdict.OK, detail)
    if device.startswith("cuda") or _needs_gpu(config):
        found = facts.cuda_error or "torch sees no CUDA GPU"
        if facts.torch_version is not None and not facts.torch_cuda:
            base = facts.torch_version.split("+")[0]
            fix = (f"this torch ({facts.torch_version}) is a CPU-only build: install a CUDA build of it into the "
                   f"venv (PyPI's Linux wheels are CUDA builds): `.venv/bin/pip install --force-reinstall "
                   f"torch=={base} --index-url https://pypi.org/simple`")
        else:
            fix = ("check that `nvidia-smi` lists the card (install or update the NVIDIA driver, then reboot); "
                   "if it works in your shell but not in the service, check the unit's DeviceAllow= lines and that "
                   "/dev/nvidia-uvm exists (docs/deploy.md, \"GPU not found\")")
        if not _needs_gpu(config):
            fix += f"; or set [engine] device = \"auto\" to draw on the CPU ({_why_no_gpu(config)})"
        return Check("cuda", Verdict.FAIL, found, fix)
    return Check("cuda", Verdict.OK, f"no CUDA GPU, not needed ({_why_no_gpu(config)})")


def _why_no_gpu(config: Config) -> str:
    return "the tiny test model runs on the CPU" if config.engine.model == "tiny" else "engine.device = \"cpu\""


def check_vram(config: Config, facts: Facts) -> Check:
    engine = config.engine
    if not _needs_gpu(config):
        return Check("vram", Verdict.OK, f"not needed ({_why_no_gpu(config)})")
    gpu = _chosen_gpu(config, facts) if facts.cuda_available else None
    if gpu is None:
        return Check("vram", Verdict.SKIP, "no GPU to measure (see cuda)")
    total_gib = gpu.total_bytes / GIB
    free = f", {_gib(gpu.free_bytes)} free now" if gpu.free_bytes is not None else ""
    if engine.mode == "resident":
        if total_gib < RESIDENT_VRAM_GIB - 0.5:  # a "24 GB" card reports ~23.6 GiB
            return Check("vram", Verdict.FAIL,
                         f"mode \"resident\" needs a ~{RESIDENT_VRAM_GIB:.0f} GB card; GPU {gpu.index} has "
                         f"{_gib(gpu.total_bytes)}",
                         f"set [engine] mode = \"offload\" and vram_budget_gb = {max(1.0, total_gib - 0.5):.1f}")
        return Check("vram", Verdict.OK, f"mode resident on {_gib(gpu.total_bytes)}{free}")
    budget = engine.vram_budget_gb
    if budget > total_gib + 0.05:
        return Check("vram", Verdict.FAIL,
                     f"vram_budget_gb = {budget:g} but GPU {gpu.index} has {_gib(gpu.total_bytes)}",
                     f"set [engine] vram_budget_gb to at most {max(1.0, total_gib - 0.5):.1f}")
    detail = f"mode {engine.mode}, budget {budget:g} GiB on a {_gib(gpu.total_bytes)} card{free}"
    if gpu.free_bytes is not None and gpu.free_bytes / GIB < budget - 0.05:
        return Check("vram", Verdict.WARN, detail,
                     "other programs use the GPU now; close them or lower vram_budget_gb, or pictures may fail "
                     "with out-of-memory")
    if budget < SLOW_BUDGET_GIB:
        return Check("vram", Verdict.WARN, detail,
                     f"a budget under {SLOW_BUDGET_GIB:g} GiB works but is very slow; raise vram_budget_gb if the "
                     "card allows")
    return Check("vram", Verdict.OK, detail)


def check_compile(config: Config, facts: Facts) -> Check:
    """Whether the engine will run the DiT blocks under torch.compile (engine.torch_compile, stream mode)."""
    setting = config.engine.torch_compile
    if not _needs_gpu(config) or config.engine.mode != "stream":
        return Check("torch.compile", Verdict.OK, "not used (stream mode on a GPU only)")
    if setting is False:
        return Check("torch.compile", Verdict.OK, "off (engine.torch_compile = false)")
    gpu = _chosen_gpu(config, facts) if facts.cuda_available else None
    if gpu is None:
        return Check("torch.compile", Verdict.SKIP, "no GPU to check (see cuda)")
    if gpu.compile_blocker is None:
        return Check("torch.compile", Verdict.OK, "on: the DiT blocks compile at start-up (about 10 s on 16 cores, "
                     "longer on fewer) and run ≈25% faster")
    if gpu.capability < (8, 0) and setting == "auto":  # nothing to fix: the card predates what it needs
        return Check("torch.compile", Verdict.OK, f"off: {gpu.compile_blocker}")
    then = "drawbot will try, fail and run eagerly" if setting is True else "steps run ≈25% slower without it"
    return Check("torch.compile", Verdict.WARN, f"off: {gpu.compile_blocker}",
                 f"{then}; install what is missing (a C compiler: `sudo apt install gcc`), or set "
                 "[engine] torch_compile = false to silence this")


def _weight_path_line(engine, facts: Facts) -> str:
    """Which weight path `stream` mode takes here (engine.host_ram: pinned RAM, or the weight cache file)."""
    from engine import host_ram

    budget = host_ram.budget_gib(engine, available=facts.ram_available / GIB)
    pinned = host_ram.PINNED_PATH_GIB[engine.model]
    if host_ram.weight_path(engine, available=facts.ram_available / GIB) == "pinned":
        return f"weights pinned in RAM (host RAM budget {budget:.1f} GiB >= {pinned:g} GiB)"
    return (f"weights file-backed: host RAM budget {budget:.1f} GiB < {pinned:g} GiB for the pinned path, so they "
            f"are read from the weight cache in {host_ram.weight_cache_dir(engine)} (written once, ~16 GB)")


def check_ram(config: Config, facts: Facts) -> Check:
    engine = config.engine
    have = f"{_gib(facts.ram_total)} RAM, {_gib(facts.ram_available)} available"
    if engine.model == "tiny":
        return Check("ram", Verdict.OK, f"{have} (the tiny model needs little)")
    if engine.mode != "stream":
        need = RAM_NEEDED_GIB[engine.mode]
        detail = f"{have}; mode {engine.mode} needs ~{need:g} GiB"
    else:
        from engine import host_ram

        need = host_ram.need_gib(engine, available=facts.ram_available / GIB)
        path = host_ram.weight_path(engine, available=facts.ram_available / GIB)
        detail = (f"{have}; mode stream with {'pinned' if path == 'pinned' else 'file-backed'} weights needs "
                  f"~{need:g} GiB\n" + _weight_path_line(engine, facts))
    if facts.ram_total / GIB >= need:
        if facts.ram_available / GIB < need:
            return Check("ram", Verdict.WARN, detail,
                         "other programs use much of the RAM now; loading the model may swap or be killed")
        return Check("ram", Verdict.OK, detail)
    if (facts.ram_total + facts.swap_total) / GIB >= need:
        return Check("ram", Verdict.WARN, detail + f" (with {_gib(facts.swap_total)} swap)",
                     "the model will only fit by swapping: loading and every picture will be slow; add RAM")
    advice = "add RAM or swap"
    if engine.mode == "offload":
        from engine import host_ram

        advice += ", or try mode = \"stream\" (~{:g} GiB with file-backed weights)".format(
            host_ram.FILE_PATH_GIB[engine.model])
    elif engine.mode == "stream" and engine.host_ram_budget_gb != "auto":
        advice += ", or set [engine] host_ram_budget_gb = \"auto\" (file-backed weights where RAM is short)"
    return Check("ram", Verdict.FAIL, detail, advice)


def check_model_files(config: Config, *, config_path: Path | None = None, files=None,
                      facts: Facts | None = None) -> Check:
    """MajicFLUX + FLUX.1-dev files present with DiffSynth's hashes. `files` (an engine.weights.ModelFiles) lets a
    test point at another layout; by default it is the real one under models_dir."""
    engine = config.engine
    if engine.model == "tiny" and files is None:
        return Check("model files", Verdict.OK,
                     "tiny test model (pictures are noise; written under models_dir/tiny on first start)")
    from engine import weights

    files = files if files is not None else weights.real_model_files(engine.models_dir)
    command = _download_command(config_path)
    try:
        problems = weights.check(files, fix=command)
    except Exception as exc:  # diffsynth missing or broken: the table must still come out
        return Check("model files", Verdict.FAIL, f"cannot check {files.root}: {type(exc).__name__}: {exc}",
                     "install the dependencies: `make install` in the drawbot folder")
    if not problems:
        return Check("model files", Verdict.OK, f"all present, hashes match ({files.root})")
    fix = f"run `{command}` as the user the bot runs as (it fetches only what is missing or incomplete)"
    if any("hash" in p or "unreadable" in p for p in problems):
        fix += "; delete each file reported as wrong or unreadable first"
    if facts is not None and any(": missing" in p for p in problems):
        free = facts.free_bytes(_nearest_existing(files.root))
        if free / GIB < DOWNLOAD_GIB:
            fix += f"; the download needs ~{DOWNLOAD_GIB:.0f} GB and only {_gib(free)} is free there"
    # One line per file, relative to the models folder; the fix is said once for all of them.
    shown = [re.sub(r" \(fix: .*\)$", "", p).replace(f"{files.root}/", "") for p in problems]
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return Check("model files", Verdict.FAIL, f"{count} under {files.root}:\n" + "\n".join(shown), fix)


TokenSource = tuple[str | None, str, str | None]


def _token_source(platform: Literal["telegram", "discord"], token_file: Path | None) -> TokenSource:
    """(token, where it comes from, problem). Never returns the token in the texts."""
    env_name = f"DRAWBOT_{platform.upper()}_TOKEN"
    if os.environ.get(env_name, "").strip():
        return os.environ[env_name].strip(), f"set (from env {env_name})", None
    if token_file is None:
        return None, "not set", None
    try:
        token = read_token(platform, token_file)
    except ConfigError as exc:
        return None, "unreadable", str(exc)
    return token, f"set (from file {token_file})", None


_TOKEN_SHAPES = {
    "telegram": (re.compile(r"^\d{5,}:[A-Za-z0-9_-]{30,}$"), "digits, a colon, then ~35 letters (from @BotFather)"),
    "discord": (re.compile(r"^[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$"),
                "three dot-separated parts (Developer Portal, Bot, Reset Token)"),
}


def check_token(config: Config, platform: Literal["telegram", "discord"]) -> Check:
    settings = config.telegram if platform == "telegram" else config.discord
    name = f"{platform} token"
    env_name = f"DRAWBOT_{platform.upper()}_TOKEN"
    if settings.enabled is False:
        return Check(name, Verdict.OK, f"{platform.capitalize()} is off ([{platform}] enabled = false)")
    token, source, problem = _token_source(platform, settings.token_file)
    if problem:
        return Check(name, Verdict.FAIL, problem,
                     f"make the file readable by the bot's user (chmod 600, owned by it), or set {env_name}")
    if token is None:
        if settings.enabled:
            return Check(name, Verdict.FAIL, f"[{platform}] enabled = true but no token is set",
                         f"set {env_name} (in /etc/drawbot/drawbot.env for the service), or [{platform}] token_file")
        return Check(name, Verdict.SKIP, f"not set: {platform.capitalize()} stays off")
    pattern, shape = _TOKEN_SHAPES[platform]
    if not pattern.match(token):
        return Check(name, Verdict.WARN, f"{source}, but it does not look like a {platform.capitalize()} token",
                     f"a {platform.capitalize()} bot token is {shape}; check for a missing piece or extra quotes")
    if settings.token_file is not None and source.startswith("set (from file"):
        mode = stat.S_IMODE(Path(settings.token_file).stat().st_mode)
        if mode & 0o077:
            return Check(name, Verdict.WARN, f"{source}; the file is readable by others (mode {mode:o})",
                         f"chmod 600 {settings.token_file}")
    return Check(name, Verdict.OK, source)


def check_chat_platforms(config: Config) -> Check:
    on = [p.capitalize() for p in ("telegram", "discord") if config_platform_on(config, p)]
    if on:
        return Check("chat", Verdict.OK, "will serve " + " and ".join(on))
    if config.console.enabled:
        return Check("chat", Verdict.OK, "local console only ([console] enabled = true)")
    return Check("chat", Verdict.FAIL, "no chat token is set, so `drawbot run` would only open the local console",
                 "put DRAWBOT_TELEGRAM_TOKEN=... and/or DRAWBOT_DISCORD_TOKEN=... in /etc/drawbot/drawbot.env "
                 "(service) or the environment; for a local try only, set [console] enabled = true")


def check_database(config: Config) -> Check:
    from bot.store import SCHEMA_VERSION, foreign_database

    path = Path(config.storage.database_path).absolute()
    own_it = (f"the folder must belong to the user the bot runs as: `sudo chown -R drawbot:drawbot "
              f"{path.parent}` (the service's StateDirectory= does this for /var/lib/drawbot)")
    if not path.exists():
        parent = _nearest_existing(path.parent)
        if not parent.is_dir():
            return Check("database", Verdict.FAIL, f"cannot create {path}: {parent} is not a folder",
                         "point [storage] state_dir (or database) at a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check("database", Verdict.FAIL, f"cannot create {path}: {parent} is not writable", own_it)
        return Check("database", Verdict.OK, f"{path} (created at first start)")
    if not path.is_file():
        return Check("database", Verdict.FAIL, f"{path} is not a file", "point [storage] database at a file path")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        return Check("database", Verdict.FAIL, f"{path} (or its folder) is not writable", own_it)
    try:
        # mode=rw never creates a file; BEGIN IMMEDIATE takes (and at once drops) the write lock.
        connection = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=2.0)
        try:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            app_id = int(connection.execute("PRAGMA application_id").fetchone()[0])
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return Check("database", Verdict.WARN, f"{path} is busy ({exc})",
                         "another process holds the write lock; is the bot already running?")
        return Check("database", Verdict.FAIL, f"{path}: {exc}", own_it)
    except sqlite3.DatabaseError as exc:
        return Check("database", Verdict.FAIL, f"{path} is not a drawbot database or is damaged ({exc})",
                     "move it away (the bot creates a new one), or point [storage] database elsewhere")
    foreign = foreign_database(path, app_id, version, tables)
    if foreign:
        detail, _, fix = foreign.rpartition(": ")
        return Check("database", Verdict.FAIL, detail, fix)
    if version > SCHEMA_VERSION:
        return Check("database", Verdict.FAIL,
                     f"{path} was written by a newer drawbot (schema {version}; this one knows {SCHEMA_VERSION})",
                     "upgrade drawbot, or point [storage] database at another file")
    return Check("database", Verdict.OK, f"{path} (schema {version}, writable)")


def check_state_dir_owner(config: Config) -> Check:
    """`drawbot run` locks its state dir; a bot holding it now means a second `drawbot run` there would refuse."""
    from bot.statelock import held_by

    state_dir = Path(config.storage.state_dir).absolute()
    pid = held_by(state_dir)
    if pid is None:
        return Check("state dir", Verdict.OK, f"{state_dir} (no bot running on it)")
    holder = f"process {pid}" if pid else "another process"
    return Check("state dir", Verdict.WARN, f"a drawbot ({holder}) is running on {state_dir}",
                 "a second `drawbot run` here exits: stop the running one first (`systemctl stop drawbot`)")


def check_disk(config: Config, facts: Facts) -> Check:
    storage, engine = config.storage, config.engine
    where = _nearest_existing(storage.images_dir)
    if not where.is_dir():
        return Check("disk", Verdict.FAIL, f"{storage.images_dir}: {where} is not a folder",
                     "point [storage] state_dir at a folder")
    free = facts.free_bytes(where)
    picture = engine.width * engine.height * PNG_BYTES_PER_PIXEL
    detail = f"{_gib(free)} free for pictures at {where}"
    if free / GIB < MIN_FREE_DISK_GIB:
        return Check("disk", Verdict.FAIL, detail,
                     f"free at least {MIN_FREE_DISK_GIB:g} GiB there, or lower [storage] keep_images_count / "
                     "keep_images_days")
    if storage.keep_images_count:
        kept = storage.keep_images_count * picture
        if free < kept:
            return Check("disk", Verdict.WARN, detail + f"; keeping {storage.keep_images_count} pictures takes "
                         f"~{_gib(kept)}", "free space, or lower [storage] keep_images_count")
    return Check("disk", Verdict.OK, detail)


def config_platform_on(config: Config, platform: Literal["telegram", "discord"]) -> bool:
    settings = config.telegram if platform == "telegram" else config.discord
    return settings.enabled is not False and _token_source(platform, settings.token_file)[0] is not None


def check_model_for_users(config: Config) -> Check | None:
    """Only when it matters: the tiny model with a chat platform on would send real users noise."""
    if config.engine.model == "tiny" and any(config_platform_on(config, p) for p in ("telegram", "discord")):
        return Check("model choice", Verdict.WARN, "engine.model = \"tiny\" with a chat token set: users get noise",
                     "set [engine] model = \"majicflus\" and run `drawbot download`")
    return None


def run_checks(config: Config, facts: Facts, *, config_path: Path | None = None, model_files=None) -> list[Check]:
    checks = [
        check_config(config, config_path),
        check_python(facts),
        check_torch(facts),
        check_cuda(config, facts),
        check_vram(config, facts),
        check_compile(config, facts),
        check_ram(config, facts),
        check_model_files(config, config_path=config_path, files=model_files, facts=facts),
        check_token(config, "telegram"),
        check_token(config, "discord"),
        check_chat_platforms(config),
        check_database(config),
        check_state_dir_owner(config),
        check_disk(config, facts),
    ]
    extra = check_model_for_users(config)
    if extra is not None:
        checks.append(extra)
    if config.cluster.enabled:
        checks.append(check_cluster(config))
    return checks


def check_cluster(config: Config) -> Check:
    """[cluster]: Redis answers, and which drawing workers are live (imports redis only here)."""
    from bot.cluster.remote import doctor_lines

    reachable, found, fix = doctor_lines(config)
    if not reachable:
        return Check("cluster (Redis)", Verdict.FAIL, found, fix)
    return Check("cluster (Redis)", Verdict.WARN if fix else Verdict.OK, found, fix)


# -- the table ----------------------------------------------------------------------------------------------------


def can_start(checks: Sequence[Check]) -> bool:
    return not any(c.verdict is Verdict.FAIL for c in checks)


def _wrap(text: str, width: int, indent: str) -> list[str]:
    # Paths stay whole: never split at their hyphens or slashes.
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def render(checks: Sequence[Check], *, width: int = 110) -> str:
    name_w = max(len("check"), *(len(c.name) for c in checks))
    verdict_w = 6
    indent = " " * (2 + name_w + 2 + verdict_w + 2)
    text_w = max(40, width - len(indent))
    lines = [f"  {'check':<{name_w}}  {'result':<{verdict_w}}  details",
             f"  {'-' * name_w}  {'-' * verdict_w}  {'-' * min(text_w, 60)}"]
    for c in checks:
        detail_lines = []
        for part in c.detail.splitlines() or [""]:
            detail_lines += _wrap(part, text_w, "  ") or [""]
        lines.append(f"  {c.name:<{name_w}}  {c.verdict.value:<{verdict_w}}  {detail_lines[0]}")
        lines += [indent + more for more in detail_lines[1:]]
        if c.fix and c.verdict in (Verdict.FAIL, Verdict.WARN):
            lines += [indent + row for row in _wrap("fix: " + c.fix, text_w, "     ")]
    fails = sum(c.verdict is Verdict.FAIL for c in checks)
    warns = sum(c.verdict is Verdict.WARN for c in checks)
    warned = f" ({warns} warning{'s' if warns != 1 else ''})" if warns else ""
    if fails:
        verdict = (f"verdict: NOT READY - fix the {fails} problem{'s' if fails != 1 else ''} marked FAIL, then run "
                   f"`drawbot doctor` again{warned}")
    else:
        verdict = f"verdict: ready - the bot can start{warned}"
    return "\n".join(lines + ["", verdict])


def doctor(config: Config, *, config_path: Path | None = None, facts: Facts | None = None,
           out: TextIO | None = None, model_files=None) -> int:
    """Print the table; 0 when the bot can start, 1 when something marked FAIL must be fixed first."""
    out = sys.stdout if out is None else out
    facts = probe() if facts is None else facts
    checks = run_checks(config, facts, config_path=config_path, model_files=model_files)
    print("drawbot doctor\n", file=out)
    print(render(checks, width=shutil.get_terminal_size((110, 24)).columns), file=out, flush=True)
    return 0 if can_start(checks) else 1
