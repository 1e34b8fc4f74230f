"""Kill campaign: `kill -9` a real `eive-audit run` at random moments, rerun it, and compare every table.

Renders a small synthetic val split (`eive-audit synth`), audits it once uninterrupted with the shipped model
(findings on), then N times: starts the same command on a fresh store, kills it with SIGKILL at a random
moment spread over the uninterrupted run's duration (kill i falls in the i-th of N equal slices, in a
random order of slices; a run that ends before its kill is started again, at most three times, with the
slices rescaled to the length it took), alternating the whole process group and the CLI process alone (as the OOM killer
does), checks that no process it had started (Prefect's uvicorn server, anything else) outlives it, and
reruns the same command to completion. Each resumed store is compared with the uninterrupted one through
DuckDB (the store's catalog): per table, the rows of the run as a multiset of their contents, timing
columns left out (and the store's own path, which only `runs.config_json` holds, written as <store>).
Prints JSON:
  {"kills", "kills_by_target", "landed_mid_run", "reruns_failed", "lost_rows", "duplicate_rows",
   "unexpected_rows", "mismatched_tables", "orphans", "runs": [...]}
where lost rows are rows of the uninterrupted run that the resumed one lacks, duplicates are extra copies
of its rows, unexpected rows are rows it never had, and orphans count processes alive 10 s after a kill.

    python benchmarks/kill_campaign.py --n 10 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from eive_audit.storage.catalog import query
from eive_audit.storage.schema import SCHEMAS

CLI = [sys.executable, "-m", "eive_audit"]
TIMING_COLUMNS = {"forward_ms", "explain_ms", "seconds", "created_at", "finished_at"}
ORPHAN_WAIT_S = 10.0
ATTEMPTS = 3  # starts per kill at most, when a run ends before its kill moment


def _run_args(data: Path, store: Path) -> list[str]:
    """The audited command: the shipped model, findings on (their verification kept small), shards of 4."""
    return [*CLI, "run", "--coco", str(data / "annotations" / "val.json"), "--images", str(data / "images" / "val"),
            "--model", "default", "--out", str(store), "--device", "cpu", "--shard-size", "4",
            "--findings-verify-budget", "2", "--no-report"]


def _run_to_end(args: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run a command to its end; (exit code, seconds)."""
    started = time.monotonic()
    with log.open("ab") as out:
        code = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True).returncode
    return code, time.monotonic() - started


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _kill_at(args: list[str], env: dict[str, str], log: Path, store: Path, at: float, group: bool) -> dict[str, Any]:
    """Start `args`, SIGKILL it (its group, or the CLI process alone) `at` seconds later; what happened, with
    the done-markers the store held at the kill (how far the run had come) and the seconds it ran."""
    started = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[psutil.Process] = set()
    while time.monotonic() - started < at and proc.poll() is None:
        seen.update(_descendants(proc.pid))  # every process it starts, however briefly, so none escapes the count
        time.sleep(0.05)
    landed = proc.poll() is None
    seen.update(_descendants(proc.pid))
    if landed:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ran = time.monotonic() - started
    markers = len(list((store / "_done").glob("*/[!.]*")))
    wait_until = time.monotonic() + ORPHAN_WAIT_S
    while _alive(list(seen)) and time.monotonic() < wait_until:
        time.sleep(0.1)
    orphans = _alive(list(seen))
    names = sorted(" ".join(p.cmdline()[:4]) for p in orphans if p.is_running())
    for orphan in orphans:  # the campaign goes on clean
        orphan.kill()
    return {"at_s": round(at, 1), "target": "group" if group else "cli", "landed_mid_run": landed,
            "ran_s": round(ran, 1), "done_markers_at_kill": markers, "orphans": len(orphans),
            "orphan_commands": names}


def _normalise(value: Any, store: str) -> Any:
    return value.replace(store, "<store>") if isinstance(value, str) else value


def table_rows(store: Path, table: str) -> Counter:
    """A table's rows (every run of the store) as a multiset of content digests, timing columns left out."""
    columns = [name for name in SCHEMAS[table].names if name not in TIMING_COLUMNS] + ["run_id"]
    listed = ", ".join(f'"{name}"' for name in columns)
    rows = query(store, f"SELECT {listed} FROM {table}").to_pylist()
    resolved = str(store.resolve())
    return Counter(hashlib.sha256(repr([_normalise(row[c], resolved) for c in columns]).encode()).hexdigest()
                   for row in rows)


def compare(reference: dict[str, Counter], store: Path) -> dict[str, Any]:
    """Per table: rows lost, duplicated and unexpected against the reference store's multisets."""
    result: dict[str, Any] = {"lost_rows": 0, "duplicate_rows": 0, "unexpected_rows": 0, "mismatched_tables": []}
    for table, expected in reference.items():
        got = table_rows(store, table)
        lost = expected - got
        extra = got - expected
        result["lost_rows"] += sum(lost.values())
        result["duplicate_rows"] += sum(n for key, n in extra.items() if key in expected)
        result["unexpected_rows"] += sum(n for key, n in extra.items() if key not in expected)
        if lost or extra:
            result["mismatched_tables"].append(table)
    return result


def campaign(n: int, seed: int, n_val: int, work: Path) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": str(work / "prefect")}
    data = work / "data"
    subprocess.run([*CLI, "synth", "--out", str(data), "--n-train", "0", "--n-val", str(n_val), "--seed", "1234"],
                   env=env, check=True, capture_output=True)
    log = work / "runs.log"
    _run_to_end(_run_args(data, work / "warm-up"), env, log)  # migrates the Prefect database; not timed
    code, duration = _run_to_end(_run_args(data, work / "reference"), env, log)
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {code}); see {log}")
    reference = {table: table_rows(work / "reference", table) for table in SCHEMAS}
    rng = random.Random(seed)
    slices = rng.sample(range(n), n)
    runs = []
    for i, part in enumerate(slices):
        store = work / f"killed-{i}"
        for _ in range(ATTEMPTS):  # the machine's load changes a run's length: one that ends first is redone
            shutil.rmtree(store, ignore_errors=True)
            kill = _kill_at(_run_args(data, store), env, log, store, duration * (part + rng.random()) / n,
                            group=i % 2 == 0)
            if kill["landed_mid_run"]:
                break
            duration = kill["ran_s"]  # the latest whole run's length, for the next attempt
        code, seconds = _run_to_end(_run_args(data, store), env, log)
        kill |= {"rerun_exit": code, "rerun_s": round(seconds, 1)}
        if code == 0:
            kill |= compare(reference, store)
        runs.append(kill)
    resumed = [r for r in runs if r["rerun_exit"] == 0]
    return {
        "kills": n, "seed": seed, "images": n_val, "uninterrupted_s": round(duration, 1),
        "kills_by_target": dict(Counter(r["target"] for r in runs)),
        "landed_mid_run": sum(r["landed_mid_run"] for r in runs),
        "reruns_failed": n - len(resumed),
        "lost_rows": sum(r["lost_rows"] for r in resumed),
        "duplicate_rows": sum(r["duplicate_rows"] for r in resumed),
        "unexpected_rows": sum(r["unexpected_rows"] for r in resumed),
        "mismatched_tables": sorted({t for r in resumed for t in r["mismatched_tables"]}),
        "orphans": sum(r["orphans"] for r in runs),
        "rows_compared": {table: sum(rows.values()) for table, rows in reference.items()},
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="kills (each followed by a rerun)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--n-val", type=int, default=24, help="synthetic val images audited")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = campaign(args.n, args.seed, args.n_val, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = campaign(args.n, args.seed, args.n_val, Path(tmp))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
