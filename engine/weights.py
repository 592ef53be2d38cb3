"""Which weight files drawbot needs, where they live, how to fetch them and how to check them.

Real layout under `models_dir` (the folders ModelScope's snapshot_download writes with `local_dir`):

    MAILAND/majicflus_v1/majicflus_v134.safetensors                  MajicFLUX DiT (Flux.1-dev fine-tune)
    black-forest-labs/FLUX.1-dev/ae.safetensors                      VAE
    black-forest-labs/FLUX.1-dev/text_encoder/model.safetensors      CLIP-L
    black-forest-labs/FLUX.1-dev/text_encoder_2/model-0000{1,2}-of-00002.safetensors   T5-XXL (sharded)
    black-forest-labs/FLUX.1-dev/tokenizer/, tokenizer_2/            tokenizers (always local, never a hub)

The tiny test model uses the same layout under `models_dir/tiny/`. Every safetensors file is checked against the hash
DiffSynth uses to recognise it (md5 over key names and shapes, see shared notes), so a wrong file fails at start-up with
its path and the command that fixes it, instead of failing deep inside the pipeline.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DIT_REPO = "MAILAND/majicflus_v1"
FLUX_REPO = "black-forest-labs/FLUX.1-dev"

TOKENIZER_1_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
TOKENIZER_2_FILES = ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")


class WeightsError(Exception):
    """Missing or wrong weight files. `problems` holds one line per file, each with its fix."""

    def __init__(self, problems: list[str]):
        super().__init__("model files are not ready:\n  - " + "\n  - ".join(problems))
        self.problems = problems


class DownloadError(WeightsError):
    """`drawbot download` could not fetch the files (one line for the owner)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.problems = [message]


def _first_line(exc: BaseException) -> str:
    """The root cause in one short line (requests nests the DNS error three exceptions deep)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:159] + "…"


def _out_of_room(exc: BaseException) -> bool:
    """Somewhere in the chain of causes, the disk was full (or the owner's quota reached)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _remove_empty_leftovers(target: Path, *, stop_at: Path) -> None:
    """ModelScope leaves `._____temp` (its partial downloads) in the target; an empty one, and the empty folders
    made for it, are removed. One holding a partial file stays, so the next try resumes it."""
    for folder in (target / "._____temp", target, *target.parents):
        if folder == stop_at or stop_at not in folder.parents:
            break
        try:
            folder.rmdir()  # only when empty
        except OSError:
            break


@dataclass(frozen=True)
class ModelFiles:
    """Absolute paths of one complete model (real or tiny)."""

    root: Path
    dit: Path
    clip: Path
    t5: tuple[Path, ...]
    vae: Path
    tokenizer_1: Path
    tokenizer_2: Path
    hashes: dict[str, str]
    """DiffSynth hash expected for "dit", "clip", "t5", "vae"."""

    @property
    def weight_parts(self) -> dict[str, list[Path]]:
        return {"dit": [self.dit], "clip": [self.clip], "t5": list(self.t5), "vae": [self.vae]}


# The hashes DiffSynth 2.1.12 registers for these exact files (diffsynth/configs/model_configs.py).
REAL_HASHES = {
    "dit": "3394f306c4cbf04334b712bf5aaed95f",
    "clip": "94eefa3dac9cec93cb1ebaf1747d7b78",
    "t5": "22540b49eaedbc2f2784b2091a234c7c",
    "vae": "21ea55f476dfc4fd135587abb59dfe5d",
}

# What `drawbot download` fetches: repo -> file patterns (ModelScope allow_patterns).
DOWNLOADS: dict[str, list[str]] = {
    DIT_REPO: ["majicflus_v134.safetensors"],
    FLUX_REPO: [
        "ae.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/*.safetensors",
        "text_encoder_2/*.json",
        "tokenizer/*",
        "tokenizer_2/*",
    ],
}


def layout(root: Path, hashes: dict[str, str]) -> ModelFiles:
    flux = root / FLUX_REPO
    return ModelFiles(
        root=root,
        dit=root / DIT_REPO / "majicflus_v134.safetensors",
        clip=flux / "text_encoder" / "model.safetensors",
        t5=(
            flux / "text_encoder_2" / "model-00001-of-00002.safetensors",
            flux / "text_encoder_2" / "model-00002-of-00002.safetensors",
        ),
        vae=flux / "ae.safetensors",
        tokenizer_1=flux / "tokenizer",
        tokenizer_2=flux / "tokenizer_2",
        hashes=hashes,
    )


def real_model_files(models_dir: Path) -> ModelFiles:
    return layout(Path(models_dir).resolve(), REAL_HASHES)


def check(files: ModelFiles, *, fix: str) -> list[str]:
    """Problems with `files` (empty when all is well). Reads only safetensors headers: fast even for 24 GB."""
    from engine import compat

    compat.apply()
    from diffsynth.core.loader.file import hash_model_file

    problems: list[str] = []
    for name, parts in files.weight_parts.items():
        missing = [p for p in parts if not p.is_file()]
        if missing:
            problems += [f"{p}: missing (fix: {fix})" for p in missing]
            continue
        paths = [str(p) for p in parts]
        try:
            got = hash_model_file(paths if len(paths) > 1 else paths[0])
        except Exception as exc:  # a truncated or non-safetensors file
            problems.append(f"{parts[0]}: unreadable ({type(exc).__name__}: {exc}) (fix: delete it, then {fix})")
            continue
        if got != files.hashes[name]:
            shown = parts[0] if len(parts) == 1 else parts[0].parent
            problems.append(
                f"{shown}: not the expected {name} weights (hash {got}, expected {files.hashes[name]}) "
                f"(fix: delete it, then {fix})"
            )
    for folder, needed in ((files.tokenizer_1, TOKENIZER_1_FILES), (files.tokenizer_2, TOKENIZER_2_FILES)):
        for filename in needed:
            if not (folder / filename).is_file():
                problems.append(f"{folder / filename}: missing (fix: {fix})")
    return problems


SnapshotDownload = Callable[..., str]


def download(models_dir: Path, *, snapshot_download: SnapshotDownload | None = None) -> ModelFiles:
    """Fetch exactly the files drawbot needs with ModelScope (resumable: finished files are skipped, partial ones
    continue), then verify their hashes. Raises WeightsError if anything is still wrong."""
    if snapshot_download is None:
        from modelscope import snapshot_download as modelscope_download  # what a user runs; tests pass their own

        snapshot_download = modelscope_download
    models_dir = Path(models_dir).resolve()
    for repo_id, patterns in DOWNLOADS.items():
        target = models_dir / repo_id
        log.info("downloading %s (%s) into %s", repo_id, ", ".join(patterns), target)
        try:
            snapshot_download(repo_id, allow_patterns=patterns, local_dir=str(target))
        except Exception as exc:  # network, DNS, proxy, HTTP errors: whatever ModelScope's client raises
            if _out_of_room(exc):
                raise DownloadError(f"the disk holding {models_dir} is full: the model needs about 33 GB; free some "
                                    "space (or point [engine] models_dir at a bigger disk), then run `drawbot "
                                    "download` again; finished files are kept") from None
            raise DownloadError(f"cannot download {repo_id} from ModelScope ({_first_line(exc)}): check the network "
                                "(or HTTPS_PROXY), then run `drawbot download` again; finished files are kept") \
                from None
        finally:
            _remove_empty_leftovers(target, stop_at=models_dir)
    files = real_model_files(models_dir)
    problems = check(files, fix="drawbot download")
    if problems:
        raise WeightsError(problems)
    return files
