"""Random damage to a real trace: how often does kvprof give a traceback, crash, or silently
report changed numbers? (kvprof.testing.corruption sorts each outcome.)

    python benchmarks/trace_fuzz.py [--mutations 1000] [--trace T.arrow] [--out results.json]

Without --trace it records one: H2O on the embedded SmolLM2-135M (real weights, CPU), a passkey
prompt of 256 tokens, batch of 2, 8 output tokens, evictions per layer, a record batch per event
(--flush-s 0: the most metadata and checksums to hit). Each mutation sets 1 to 8
random bytes to other values (--cut-share of them instead cut the file at a random byte, as a
killed run would). Mutations run in a worker process; a worker killed by a signal is a crash,
counted against the mutation it was judging, and a new worker goes on from the next one.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a refusal said, by the first of these phrases its message holds.
REASONS = ("metadata does not match its checksum", "does not match its checksum", "is inconsistent",
           "cannot be decoded", "truncated inside its header",
           "not an Arrow IPC", "not MAJOR.MINOR", "newer than", "older than", "not a kvprof trace",
           "not a readable kvprof", "not UTF-8", "is not JSON", "is not a JSON object", "has no requests",
           "holds no events")


def reason(detail: str) -> str:
    return next((phrase for phrase in REASONS if phrase in detail), detail[-80:])


def record_trace(path: Path) -> None:
    command = [sys.executable, "-m", "kvprof.cli", "trace", "--plugin", "h2o", "--model", "smollm2-135m",
               "--workload", "passkey", "--prompt-len", "256", "--output-len", "8", "--batch-size", "2",
               "--opt", "heavy_ratio=0.1", "--opt", "recent_ratio=0.1", "--flush-s", "0", "--no-result", "--quiet",
               "-o", str(path)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def mutation(data: bytes, seed: int, cut_share: float) -> tuple[str, bytes]:
    from kvprof.testing.corruption import flip_bytes

    rng = random.Random(seed)
    if rng.random() < cut_share:
        cut = rng.randrange(1, len(data))
        return f"cut at {cut}", data[:cut]
    return "flips", flip_bytes(data, rng)


def worker(trace: Path, start: int, stop: int, cut_share: float) -> None:
    """Judge mutations start..stop-1, one JSON line each, flushed before the next begins."""
    from kvprof.testing.corruption import judge_bytes, numbers

    data = trace.read_bytes()
    expected = numbers(trace)
    for seed in range(start, stop):
        kind, mutated = mutation(data, seed, cut_share)
        verdict = judge_bytes(mutated, expected)
        print(json.dumps({"seed": seed, "kind": kind, "outcome": verdict.outcome, "detail": verdict.detail[:2000]}),
              flush=True)


def run_all(trace: Path, mutations: int, cut_share: float) -> list[dict]:
    records: list[dict] = []
    next_seed = 0
    while next_seed < mutations:
        command = [sys.executable, __file__, "--worker", "--trace", str(trace), "--start", str(next_seed),
                   "--mutations", str(mutations), "--cut-share", str(cut_share)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None  # stdout=PIPE
        for line in process.stdout:
            records.append(json.loads(line))
            next_seed = records[-1]["seed"] + 1
            if len(records) % 100 == 0:
                print(f"{len(records)} mutations judged", file=sys.stderr)
        status = process.wait()
        if status != 0 and next_seed < mutations:  # the worker died judging next_seed
            records.append({"seed": next_seed, "kind": "?", "outcome": "crash", "detail": f"worker exit {status}"})
            next_seed += 1
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--trace", type=Path, help="the trace to damage (default: record one)")
    parser.add_argument("--cut-share", type=float, default=0.1, help="share of mutations that cut the file")
    parser.add_argument("--out", type=Path, help="write the counts and every non-refused outcome as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.trace, args.start, args.mutations, args.cut_share)
        return
    with tempfile.TemporaryDirectory(prefix="kvprof-fuzz-") as folder:
        trace = args.trace or Path(folder) / "h2o-smollm2.arrow"
        if args.trace is None:
            record_trace(trace)
        started = time.monotonic()
        records = run_all(trace, args.mutations, args.cut_share)
        seconds = time.monotonic() - started
        from kvprof.trace import read_trace

        source = read_trace(trace)
        default = "h2o on smollm2-135m, passkey 256 tokens, batch 2, 8 out, --flush-s 0"
        description = {"trace": str(args.trace or default),
                       "bytes": trace.stat().st_size, "events": len(source), "schema": source.schema_version}
    counts = Counter(record["outcome"] for record in records)
    summary = {"machine": "CPU", "source": description, "mutations": len(records), "seconds": round(seconds, 1),
               "counts": dict(sorted(counts.items())),
               "refused_by_reason": dict(Counter(reason(r["detail"]) for r in records
                                                 if r["outcome"] == "refused").most_common()),
               "by_kind": {kind: dict(Counter(r["outcome"] for r in records if r["kind"].startswith(kind)))
                           for kind in ("flips", "cut")}}
    print(json.dumps(summary, indent=1))
    for record in records:
        if record["outcome"] in ("traceback", "crash", "changed"):
            print(f"--- seed {record['seed']} ({record['kind']}): {record['outcome']}\n{record['detail']}")
    if args.out:
        args.out.write_text(json.dumps({**summary, "notable": [r for r in records if r["outcome"] != "refused"]},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
