"""The table of one `bench/lowram.sh` run (issue 13), from the files it wrote: s/step of the pinned engine and of
the file-backed one in a 10 GiB memory cgroup (warm and dropped page cache) against the transfer floor (bytes
streamed per step / the cache file's measured read rate), memory (anonymous, file-backed, pinned), start-up from a
cold page cache against bytes / the cold read rate, and the first cache builds from a float8 and a bf16 DiT file.
Missing parts (a step that timed out or was killed) show as '-'.

    python -m bench.lowram_report DIR [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1024**3


def _lines(path: Path) -> list[dict]:
    """Every JSON object in a file: a whole-file JSON list (bench.startup --out) or JSON lines among other text."""
    if not path.is_file():
        return []
    text = path.read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except ValueError:
        pass
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _event(events: list[dict], name: str) -> dict:
    return next((e for e in events if e.get("event") == name), {})


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summarize(folder: Path) -> dict:
    pinned = _lines(folder / "pinned8.json") or _lines(folder / "pinned.log")  # the log when it did not finish
    warm_rate = (_lines(folder / "read_warm.json") or [{}])[0].get("GBps")
    mapped_cold_rate = (_lines(folder / "read_cold.json") or [{}])[0].get("GBps")
    direct_cold_rate = (_lines(folder / "read_cold_direct.json") or [{}])[0].get("GBps")
    # The disk's rate: the better of the two ways of reading it (a floor is what the disk can do, not our path).
    cold_rate = max([r for r in (mapped_cold_rate, direct_cold_rate) if r], default=None)
    runs: dict = {}
    # The 8 GB card (10 GiB cgroup; names as lowram.sh a-f write them), and the 12 GB one (8 GiB cgroup, `g`) when run.
    for card, pinned_name, pinned_json, file_json, log_prefix in ((8, "pinned", "pinned8", "file8", "file"),
                                                                   (12, "pinned12", "pinned12", "file12", "file12")):
        pinned = (_lines(folder / f"{pinned_json}.json")
                  or _lines(folder / f"{pinned_name}.log"))  # the log when it did not finish
        if card == 12 and not (pinned or (folder / f"{file_json}_cold.json").is_file()):
            continue
        runs[pinned_name] = {"card_gb": card, "s_per_step": _event(pinned, "picture").get("s_per_step"),
                             "load_s": _event(pinned, "loaded").get("seconds"),
                             "pinned_gib": _event(pinned, "loaded").get("pinned_gib"),
                             "rss_anon_gib": _event(pinned, "loaded").get("rssanon_gib"),
                             "peak_rss_gib": _event(pinned, "picture").get("peak_rss_gib")}
        for kind in ("warm", "cold"):
            name = f"{log_prefix}_{kind}"
            events = _lines(folder / f"{file_json}_{kind}.json") or _lines(folder / f"{name}.log")
            loaded, picture = _event(events, "loaded"), _event(events, "picture")
            memory = (_lines(folder / f"{name}.mem.json") or [{}])[0]
            streamed, from_disk = loaded.get("dit_streamed_gib"), loaded.get("dit_from_disk_gib") or 0.0
            rate = cold_rate if from_disk else warm_rate
            # Per step: the units kept in the page cache at its rate, the rest at the disk's.
            floor = ((streamed - from_disk) * GIB / (warm_rate * 1e9) + from_disk * GIB / (cold_rate * 1e9)
                     if streamed is not None and warm_rate and cold_rate else None)
            runs[name] = {"card_gb": card, "pinned_run": pinned_name, "s_per_step": picture.get("s_per_step"),
                          "picture_s": picture.get("seconds"), "load_s": loaded.get("seconds"),
                          "dit_streamed_gib": streamed, "dit_from_disk_gib": from_disk, "read_GBps": rate,
                          "floor_s": floor, "pinned_gib": picture.get("pinned_gib", loaded.get("pinned_gib")),
                          "rss_anon_gib": picture.get("rssanon_gib"), "peak_rss_gib": picture.get("peak_rss_gib"),
                          **memory}
    builds = {}
    for label in ("float8", "bf16"):
        build = next((e for e in _lines(folder / f"build_{label}.json") if "total_s" in e), {})
        memory = (_lines(folder / f"build_{label}.mem.json") or [{}])[0]
        builds[label] = {**build, **{k: v for k, v in memory.items() if k != "run"}}
    written = sum(builds["float8"].get(m, {}).get("written_gib", 0) for m in ("dit", "t5")) or None
    cold_events = _lines(folder / "file8_cold.json") or _lines(folder / "file_cold.log")
    cold_loaded = _event(cold_events, "loaded")
    # What the engine's start-up really read from the disk (`startup`), else the cache's size.
    read = (startup(cold_events, cold_rate)["read_gib"] if cold_loaded else None) or written
    cold_start = (read * GIB / (cold_rate * 1e9)) if read and cold_rate else None
    parts = {k: cold_loaded.get(k) for k in ("load_s", "packing_s", "calibration_s", "warmup_s", "reading_s")}
    startups = {name: startup(events, cold_rate) for name in STARTUP_RUNS
                if (events := _lines(folder / f"{name}.json")) and _event(events, "loaded")}
    return {"runs": runs, "builds": builds, "startups": startups,
            "read_GBps": {"warm": warm_rate, "cold": cold_rate, "cold_mapped": mapped_cold_rate,
                          "cold_direct": direct_cold_rate},
            "startup_cold": {"load_s": runs["file_cold"]["load_s"], "cache_gib": written, "read_gib": read,
                             "bytes_over_cold_rate_s": cold_start, "parts_s": parts}}


STARTUP_RUNS = ("file8_cold_noahead", "file8_cold", "file12_cold")
"""Start-ups from a dropped page cache: the 8 GB card (in runs 7 and 8 also without the start-up read-ahead they
tried: `_noahead`), the 12 GB card."""
PHASES = ("load_s", "packing_s", "calibration_s", "warmup_s", "reading_s")


def startup(events: list[dict], cold_rate: float | None) -> dict:
    """One start-up from a dropped page cache: its seconds against the bytes it read over the disk's rate (what
    bench.startup's /proc/self/io says at "loaded" less what the imports before "start" had read: their time is not
    in the start-up's seconds either), and per phase (from its disk timeline) the seconds and the GiB read in it."""
    start, loaded = _event(events, "start"), _event(events, "loaded")
    read = loaded["disk_read_gib"] - (start.get("disk_read_gib") or 0.0) if loaded.get("disk_read_gib") else None
    over_rate = read * GIB / (cold_rate * 1e9) if read and cold_rate else None
    timeline = loaded.get("disk_timeline") or []

    def read_by(t: float) -> float | None:
        before = [gib for when, gib in timeline if when <= t]
        return before[-1] if before else None

    phases, t = {}, 0.0
    ends = [*(loaded.get(k) or 0.0 for k in PHASES), None]
    for name, length in zip([*PHASES, "rest_s"], ends):
        end = loaded["seconds"] if length is None else t + length
        first, last = read_by(t), read_by(end)
        phases[name.removesuffix("_s")] = {"s": round(end - t, 2), "read_gib": round(last - first, 2)
                                           if first is not None and last is not None else None}
        t = end
    return {"seconds": loaded.get("seconds"), "read_gib": read, "bytes_over_rate_s": over_rate,
            "ratio": loaded["seconds"] / over_rate if over_rate else None, "read_ahead_gib": loaded.get("read_ahead_gib"),
            "phases": phases}


def table(summary: dict) -> str:
    runs = summary["runs"]
    rows = ["| run | s/step | floor s | vs max(pinned, floor) | load s | anon max GiB | file max GiB | pinned GiB | "
            "cgroup peak GiB | oom |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        # Against the larger of the same card's pinned step and the transfer floor.
        pinned_step = runs.get(run.get("pinned_run", name), {}).get("s_per_step")
        bound = max([v for v in (pinned_step, run.get("floor_s")) if v is not None], default=None)
        ratio = run["s_per_step"] / bound if run.get("s_per_step") and bound else None
        rows.append(f"| {name} | {_fmt(run.get('s_per_step'))} | {_fmt(run.get('floor_s'))} | "
                    f"{_fmt(ratio, 2) if 'pinned_run' in run else '-'} | {_fmt(run.get('load_s'), 1)} | "
                    f"{_fmt(run.get('anon_max_gib', run.get('rss_anon_gib')), 2)} | {_fmt(run.get('file_max_gib'), 2)} | "
                    f"{_fmt(run.get('pinned_gib'), 2)} | {_fmt(run.get('cgroup_peak_gib'), 2)} | "
                    f"{_fmt(run.get('oom_kill'))} |")
    rows += ["", "| first cache build | s | DiT file GiB | T5 files GiB | written GiB | peak RSS GiB | anon max GiB | "
             "cgroup peak GiB | oom |", "|---|---|---|---|---|---|---|---|---|"]
    for label, build in summary["builds"].items():
        written = sum(build.get(m, {}).get("written_gib", 0) for m in ("dit", "t5")) if build else None
        rows.append(f"| {label} DiT file | {_fmt(build.get('total_s'), 1)} | "
                    f"{_fmt(build.get('dit', {}).get('source_gib'), 2)} | {_fmt(build.get('t5', {}).get('source_gib'), 2)} | "
                    f"{_fmt(written, 2)} | {_fmt(build.get('peak_rss_gib'), 2)} | {_fmt(build.get('anon_max_gib'), 2)} | "
                    f"{_fmt(build.get('cgroup_peak_gib'), 2)} | {_fmt(build.get('oom_kill'))} |")
    cold = summary["startup_cold"]
    rows += ["", f"read rates (cache file -> pinned staging -> GPU): warm {_fmt(summary['read_GBps']['warm'], 2)} GB/s, "
             f"dropped page cache {_fmt(summary['read_GBps']['cold'], 2)} GB/s (mapped "
             f"{_fmt(summary['read_GBps']['cold_mapped'], 2)}, O_DIRECT {_fmt(summary['read_GBps']['cold_direct'], 2)})",
             f"start-up from a cold page cache: {_fmt(cold['load_s'], 1)} s (calibration and compile included; "
             f"parts {', '.join(f'{k} {_fmt(v, 1)}' for k, v in cold['parts_s'].items())}) vs "
             f"{_fmt(cold['read_gib'], 2)} GiB read / cold rate = {_fmt(cold['bytes_over_cold_rate_s'], 1)} s"]
    if summary.get("startups"):
        rows += ["", "| start-up, dropped page cache | s | GiB read | read / disk rate s | ratio | read ahead GiB (runs 7, 8) | "
                 + " | ".join(f"{p.removesuffix('_s')} s (GiB read)" for p in (*PHASES, "rest")) + " |",
                 "|---" * (6 + len(PHASES) + 1) + "|"]
        for name, run in summary["startups"].items():
            rows.append(f"| {name} | {_fmt(run['seconds'], 1)} | {_fmt(run['read_gib'], 2)} | "
                        f"{_fmt(run['bytes_over_rate_s'], 1)} | {_fmt(run['ratio'], 2)} | "
                        f"{_fmt(run['read_ahead_gib'], 2)} | "
                        + " | ".join(f"{_fmt(p['s'], 1)} ({_fmt(p['read_gib'], 2)})" for p in run["phases"].values())
                        + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    summary = summarize(args.folder)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
