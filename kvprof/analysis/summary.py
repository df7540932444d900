"""The run summary: latency, throughput, memory, KV per tier, evictions and offload.

Tools disagree on what TTFT, TPOT and ITL mean, so kvprof states its formulas (`FORMULAS`,
printed by `kvprof analyze` and included in its JSON). All times come from the trace's
host-monotonic nanosecond timestamps; "arrival" is request_end.start_ns.

* TTFT  = end of the request's last prefill chunk - arrival. Queueing is included: a batch
          runner's requests all arrive when the run starts, so a request of the third batch
          counts the two batches before it (as a client sending them all at once would see)
          A request that got its first token but never finished (an interrupted or killed run)
          has no request_end: its arrival is its prefill's start_ns - ext["queued_ns"]
* queue = start of the request's first prefill chunk - arrival (waiting for a batch slot)
* E2E   = request_end.end_ns - arrival
* TPOT  = (E2E - TTFT) / (output tokens - 1), per request with at least 2 output tokens
* request decode time = E2E - TTFT
* ITL   = gaps between a request's consecutive token times: its first token, then the end of
          every decode step that ended within (first token, last token]. On the batch runner,
          whose steps follow each other, these are the decode step durations.
* decode throughput = sum(decode tokens) / sum(durations of the decode steps that had any), where
          a step's decode tokens are decode_step.tokens less ext["prefill_tokens"] (engines that
          schedule prefill chunks into a step, as vLLM does, report them; the batch runner does not)
* total throughput  = sum(output tokens) / (last request end - first arrival)
* KV bytes per token = median over decode steps of (KV bytes on device + host after the step)
          / context tokens in flight (prompt + tokens fed so far, of every request in the step)
* memory efficiency = median over decode steps of context tokens in flight / GB (1e9 bytes) of
          KV on the device: how many tokens of context each GB of device KV serves; and the same
          per GB of total KV (device + host), so strategies that park KV on the host do not look free
* transfer bandwidth = bytes copied / time the copies took, per direction (offload events time
          the copy itself)

Warm-up: `warmup_steps=N` leaves the run's first N decode steps (in time order, across batches)
out of the decode throughput, ITL and the per-token KV figures; TTFT and E2E are per request and
keep them. Latency distributions report count, mean, std (population), median, the chosen
percentiles (`--percentiles`, default 90 and 99), min and max.

Goodput (`--slo ttft=MS,tpot=MS,e2e=MS`, any subset): the finished requests that met every
given bound, as a count, a share of the finished requests, and requests per second over the run
(first arrival to last request end), as vLLM's benchmark defines it. A request with one output
token has no TPOT and meets a TPOT bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvprof.analysis.common import (
    DEFAULT_PERCENTILES,
    NS_PER_MS,
    NS_PER_S,
    Events,
    distribution,
    ext_values,
    floats,
    ints,
    maybe,
    require_events,
    run_bounds,
    strings,
)
from kvprof.errors import UsageError
from kvprof.trace import Trace

FORMULAS: dict[str, str] = {
    "ttft": "TTFT = end of the request's last prefill chunk - arrival (request_end.start_ns); queueing "
            "included (a batch runner's requests all arrive at the run's start); requests that never finished "
            "count with arrival = prefill start_ns - ext queued_ns",
    "queue": "queue = start of the request's first prefill chunk - arrival",
    "e2e": "E2E = request_end.end_ns - arrival",
    "tpot": "TPOT = (E2E - TTFT) / (output tokens - 1), requests with >= 2 output tokens",
    "decode": "request decode time = E2E - TTFT",
    "itl": "ITL = gaps between a request's token times: first token, then each decode step end "
           "within (first token, last token] (batch runner: the step durations)",
    "decode_throughput": "decode throughput = sum(decode_step.tokens - ext prefill_tokens) / sum(durations "
                         "of those steps)",
    "total_throughput": "total throughput = sum(output tokens) / (last request end - first arrival)",
    "kv_bytes_per_token": "KV bytes per token = median over decode steps of KV bytes (device + host) "
                          "/ context tokens in flight",
    "memory_efficiency": "memory efficiency = median over decode steps of context tokens in flight "
                         "/ GB (1e9 B) of device KV; total: / GB of device + host KV",
    "bandwidth": "transfer bandwidth = bytes copied / time of the copies, per direction",
    "goodput": "goodput = finished requests meeting every --slo bound (TTFT, TPOT, E2E in ms) / (last request "
               "end - first arrival)",
    "warmup": "--warmup-steps N drops the run's first N decode steps from decode throughput, ITL, "
              "KV per token and memory efficiency",
}


@dataclass
class Requests:
    """The finished requests of a run (one request_end each), as aligned arrays."""

    ids: np.ndarray              # request ids (object)
    arrival_ns: np.ndarray       # int64
    prefill_start_ns: np.ndarray  # float64: start of the first prefill chunk, NaN when none
    first_token_ns: np.ndarray   # float64, NaN when the trace has no prefill for the request
    end_ns: np.ndarray           # int64
    output_tokens: np.ndarray    # int64
    prompt_tokens: np.ndarray    # int64
    texts: np.ndarray            # generated text (object)

    def __len__(self) -> int:
        return len(self.ids)


def finished_requests(events: Events) -> Requests:
    """Join each request_end with its prefill events (first token = last chunk's end)."""
    ends = events.of_kind("request_end", ["request_id", "start_ns", "end_ns", "tokens", "ext", "text"])
    prefills = events.of_kind("prefill", ["request_id", "start_ns", "end_ns", "tokens", "ext"])
    # A recompute after a preemption (ext["recompute"]=1, vLLM) comes after the first token.
    recompute = pc.fill_null(pc.map_lookup(prefills["ext"], "recompute", "first"), 0.0)
    prefills = prefills.filter(pc.not_equal(recompute, 1.0))
    per_request = pa.table({
        "request_id": prefills["request_id"],
        "prefill_start_ns": prefills["start_ns"],
        "first_token_ns": prefills["end_ns"],
        "prefill_prompt_tokens": pc.map_lookup(prefills["ext"], "prompt_tokens", "first"),
        "prefill_tokens": prefills["tokens"],
    }).group_by("request_id").aggregate([
        ("prefill_start_ns", "min"), ("first_token_ns", "max"), ("prefill_prompt_tokens", "max"),
        ("prefill_tokens", "sum"),
    ])
    finished = pa.table({
        "request_id": ends["request_id"], "arrival_ns": ends["start_ns"], "end_ns": ends["end_ns"],
        "output_tokens": ends["tokens"], "text": ends["text"],
        "end_prompt_tokens": pc.map_lookup(ends["ext"], "prompt_tokens", "first"),
    }).join(per_request, "request_id", join_type="left outer").sort_by("arrival_ns")
    prompt = floats(finished, "end_prompt_tokens")
    for fallback in ("prefill_prompt_tokens_max", "prefill_tokens_sum"):
        prompt = np.where(np.isnan(prompt), floats(finished, fallback), prompt)
    return Requests(
        ids=strings(finished, "request_id"),
        arrival_ns=ints(finished, "arrival_ns"),
        prefill_start_ns=floats(finished, "prefill_start_ns_min"),
        first_token_ns=floats(finished, "first_token_ns_max"),
        end_ns=ints(finished, "end_ns"),
        output_tokens=ints(finished, "output_tokens"),
        prompt_tokens=np.nan_to_num(prompt).astype(np.int64),
        texts=strings(finished, "text"),
    )


@dataclass
class DecodeSteps:
    """Decode steps in time order; `counted` is False for warm-up steps."""

    start_ns: np.ndarray
    end_ns: np.ndarray
    tokens: np.ndarray            # decode tokens: tokens scheduled less prefill tokens in the step
    kv_device_bytes: np.ndarray   # float64, NaN where not reported
    kv_host_bytes: np.ndarray
    counted: np.ndarray

    @property
    def duration_ns(self) -> np.ndarray:
        return self.end_ns - self.start_ns


def decode_steps(events: Events, warmup_steps: int = 0) -> DecodeSteps:
    steps = events.of_kind("decode_step", ["start_ns", "end_ns", "tokens", "kv_device_bytes", "kv_host_bytes", "ext"])
    order = np.argsort(ints(steps, "end_ns"), kind="stable")
    counted = np.ones(len(order), bool)
    counted[:warmup_steps] = False
    prefill_tokens = np.nan_to_num(ext_values(steps, "prefill_tokens")).astype(np.int64)
    return DecodeSteps(
        start_ns=ints(steps, "start_ns")[order], end_ns=ints(steps, "end_ns")[order],
        tokens=(ints(steps, "tokens") - prefill_tokens)[order], kv_device_bytes=floats(steps, "kv_device_bytes")[order],
        kv_host_bytes=floats(steps, "kv_host_bytes")[order], counted=counted,
    )


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated index ranges lo[i]..hi[i]-1 and, for each index, which range it is in."""
    lengths = np.maximum(hi - lo, 0)
    owner = np.repeat(np.arange(len(lo)), lengths)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(lengths.sum()), owner


def inter_token_latencies_ns(requests: Requests, steps: DecodeSteps) -> np.ndarray:
    """ITL gaps of all requests (see the module docstring), warm-up steps left out."""
    has_first = ~np.isnan(requests.first_token_ns)
    first = requests.first_token_ns[has_first].astype(np.int64)
    lo = np.searchsorted(steps.end_ns, first, side="right")
    hi = np.searchsorted(steps.end_ns, requests.end_ns[has_first], side="right")
    index, owner = _ranges(lo, hi)
    previous = np.where(index == lo[owner], first[owner], steps.end_ns[np.maximum(index - 1, 0)])
    gaps = steps.end_ns[index] - previous
    return gaps[steps.counted[index]]


def context_tokens_in_flight(requests: Requests, steps: DecodeSteps) -> np.ndarray:
    """Per decode step: the tokens of context its requests hold after it (prompt + tokens fed).

    A request is in a step when its first token came before the step's end and its last token
    not before it. After its j-th step a request holds prompt + j tokens. Computed with prefix
    sums over requests sorted by first-token and by end time, so no loop over steps.
    """
    ok = ~np.isnan(requests.first_token_ns)
    first, end = requests.first_token_ns[ok].astype(np.int64), requests.end_ns[ok]
    prompt = requests.prompt_tokens[ok]
    steps_before_first = np.searchsorted(steps.end_ns, first, side="right")
    by_first, by_end = np.argsort(first), np.argsort(end)

    def prefix(values: np.ndarray, order: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(values[order])])

    started = np.searchsorted(first[by_first], steps.end_ns, side="left")   # first < step end
    ended = np.searchsorted(end[by_end], steps.end_ns, side="left")         # end < step end
    active = started - ended
    prompt_sum = prefix(prompt, by_first)[started] - prefix(prompt, by_end)[ended]
    before_sum = prefix(steps_before_first, by_first)[started] - prefix(steps_before_first, by_end)[ended]
    steps_so_far = np.searchsorted(steps.end_ns, steps.end_ns, side="right")
    return prompt_sum + active * steps_so_far - before_sum


def summary(trace: Trace, warmup_steps: int = 0, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
            slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The summary of one run; see the module docstring for every formula."""
    require_events(trace)
    if warmup_steps < 0:
        raise UsageError(f"--warmup-steps {warmup_steps}: must not be negative")
    events = Events.of(trace)
    requests = finished_requests(events)
    unfinished_ttft = unfinished_first_tokens(events, requests)
    steps = decode_steps(events, warmup_steps)
    if len(requests) == 0 and len(steps.end_ns) == 0 and events.count("prefill") == 0:
        raise UsageError(f"{trace.path}: the trace has no requests (no prefill, decode_step or request_end events)")
    result = {
        "formulas": FORMULAS,
        "warmup_steps": warmup_steps,
        "percentiles": list(percentiles),
        "requests": _request_counts(trace, requests, unfinished_ttft),
        "latency_ms": _latencies(requests, steps, percentiles, unfinished_ttft),
        "throughput_tokens_per_s": _throughput(requests, steps),
        "decode": _decode_totals(steps),
        "memory_peak_bytes": _memory_peaks(events),
        "kv_bytes": _kv_tiers(events),
        "kv_per_token": _kv_per_token(requests, steps),
        "evictions": _evictions(events),
        "transfers": _transfers(events),
        "run": _run_totals(events),
    }
    if slo:
        result["goodput"] = _goodput(requests, slo)
    return result


def unfinished_first_tokens(events: Events, finished: Requests) -> np.ndarray:
    """TTFT (ns) of each request with a first token but no request_end (the run was interrupted
    or killed), where its prefill says how long it queued; NaN where it does not."""
    prefills = events.of_kind("prefill", ["request_id", "start_ns", "end_ns", "ext"])
    recompute = pc.fill_null(pc.map_lookup(prefills["ext"], "recompute", "first"), 0.0)
    unfinished = pc.invert(pc.is_in(prefills["request_id"], pa.array(finished.ids, pa.string())))
    prefills = prefills.filter(pc.and_(pc.not_equal(recompute, 1.0), unfinished))
    if prefills.num_rows == 0:
        return np.array([], dtype=np.float64)
    arrival = pc.subtract(pc.cast(prefills["start_ns"], pa.float64()),
                          pc.map_lookup(prefills["ext"], "queued_ns", "first"))
    per_request = pa.table({"request_id": prefills["request_id"], "arrival_ns": arrival,
                            "first_token_ns": pc.cast(prefills["end_ns"], pa.float64())})
    per_request = per_request.group_by("request_id").aggregate([("arrival_ns", "min"), ("first_token_ns", "max")])
    return floats(per_request, "first_token_ns_max") - floats(per_request, "arrival_ns_min")


def _request_counts(trace: Trace, requests: Requests, unfinished_ttft: np.ndarray) -> dict[str, int | None]:
    planned = len(((trace.run or {}).get("workload") or {}).get("requests") or []) or None
    return {
        "finished": len(requests), "planned": planned,
        "failed": planned - len(requests) if planned is not None else None,  # planned but never finished
        "unfinished_with_first_token": len(unfinished_ttft),  # an interrupted or killed run's
        "prompt_tokens": int(requests.prompt_tokens.sum()), "output_tokens": int(requests.output_tokens.sum()),
    }


@dataclass
class RequestLatencies:
    """Per finished request, in ns (float64, NaN where it does not apply)."""

    queue: np.ndarray
    ttft: np.ndarray
    e2e: np.ndarray
    tpot: np.ndarray

    @classmethod
    def of(cls, requests: Requests) -> RequestLatencies:
        ttft = requests.first_token_ns - requests.arrival_ns
        e2e = (requests.end_ns - requests.arrival_ns).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(requests.output_tokens >= 2, (e2e - ttft) / (requests.output_tokens - 1), np.nan)
        return cls(queue=requests.prefill_start_ns - requests.arrival_ns, ttft=ttft, e2e=e2e, tpot=tpot)


def _latencies(requests: Requests, steps: DecodeSteps, percentiles: tuple[float, ...],
               unfinished_ttft: np.ndarray) -> dict[str, dict]:
    latency = RequestLatencies.of(requests)
    return {
        "ttft": distribution(np.concatenate([latency.ttft, unfinished_ttft]), NS_PER_MS, percentiles),
        "queue": distribution(latency.queue, NS_PER_MS, percentiles),
        "tpot": distribution(latency.tpot, NS_PER_MS, percentiles),
        "itl": distribution(inter_token_latencies_ns(requests, steps), NS_PER_MS, percentiles),
        "e2e": distribution(latency.e2e, NS_PER_MS, percentiles),
        "decode": distribution(latency.e2e - latency.ttft, NS_PER_MS, percentiles),
    }


SLO_METRICS = ("ttft", "tpot", "e2e")


def parse_slo(text: str) -> dict[str, float]:
    """`--slo ttft=500,tpot=50` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    bounds = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or name not in SLO_METRICS:
            raise UsageError(f"--slo {text!r}: expected NAME=MS pairs, NAME one of {', '.join(SLO_METRICS)}")
        try:
            bounds[name] = float(value)
        except ValueError:
            raise UsageError(f"--slo {part!r}: {value!r} is not a number of milliseconds") from None
        if not bounds[name] > 0:
            raise UsageError(f"--slo {part!r}: the bound must be positive")
    if not bounds:
        raise UsageError(f"--slo {text!r}: give at least one bound, e.g. ttft=500,tpot=50")
    return bounds


def _goodput(requests: Requests, slo: dict[str, float]) -> dict[str, Any]:
    latency = RequestLatencies.of(requests)
    good = np.ones(len(requests), bool)
    for name, bound_ms in slo.items():
        values = getattr(latency, name) / NS_PER_MS
        within = values <= bound_ms
        good &= (within | np.isnan(values)) if name == "tpot" else within
    count = int(good.sum())
    span_ns = requests.end_ns.max() - requests.arrival_ns.min() if len(requests) else 0
    return {"slo_ms": dict(slo), "good_requests": count,
            "share": count / len(requests) if len(requests) else None,
            "requests_per_s": count / (span_ns / NS_PER_S) if span_ns > 0 else None}


def request_records(trace: Trace) -> list[dict[str, Any]]:
    """One record per planned request (vLLM bench's per-request lists, as rows): arrival in ms
    after the first request's, latencies in ms, token counts, the output text; unfinished ones
    say so."""
    events = Events.of(trace)
    requests = finished_requests(events)
    latency = RequestLatencies.of(requests)
    first_arrival = int(requests.arrival_ns.min()) if len(requests) else 0
    records: dict[str, dict[str, Any]] = {}
    for i, request_id in enumerate(requests.ids):
        records[str(request_id)] = {
            "request_id": str(request_id), "finished": True,
            "arrival_ms": float((requests.arrival_ns[i] - first_arrival) / NS_PER_MS),
            "queue_ms": maybe(latency.queue[i] / NS_PER_MS), "ttft_ms": maybe(latency.ttft[i] / NS_PER_MS),
            "tpot_ms": maybe(latency.tpot[i] / NS_PER_MS), "e2e_ms": float(latency.e2e[i] / NS_PER_MS),
            "prompt_tokens": int(requests.prompt_tokens[i]), "output_tokens": int(requests.output_tokens[i]),
            "text": requests.texts[i],
        }
    planned = ((trace.run or {}).get("workload") or {}).get("requests") or []
    missing = [{"request_id": r["request_id"], "finished": False, "prompt_tokens": r.get("prompt_tokens")}
               for r in planned if r.get("request_id") not in records]
    return list(records.values()) + missing


def _throughput(requests: Requests, steps: DecodeSteps) -> dict[str, float | None]:
    decoding = steps.counted & (steps.tokens > 0)
    decode_ns = steps.duration_ns[decoding].sum()
    decode = steps.tokens[decoding].sum() / (decode_ns / NS_PER_S) if decode_ns > 0 else None
    total = None
    if len(requests):
        span_ns = requests.end_ns.max() - requests.arrival_ns.min()
        total = requests.output_tokens.sum() / (span_ns / NS_PER_S) if span_ns > 0 else None
    return {"decode": maybe(decode), "total": maybe(total)}


def _decode_totals(steps: DecodeSteps) -> dict[str, float | int]:
    return {
        "steps": int(len(steps.end_ns)), "steps_counted": int(steps.counted.sum()),
        "tokens": int(steps.tokens[steps.counted].sum()),
        "seconds": float(steps.duration_ns[steps.counted].sum() / NS_PER_S),
    }


def _column_max(table: pa.Table, *columns: str) -> float | None:
    peaks = [pc.max(table[name]).as_py() for name in columns]
    peaks = [value for value in peaks if value is not None]
    return float(max(peaks)) if peaks else None


def _memory_peaks(events: Events) -> dict[str, float | None]:
    """Peaks of the device allocator (allocated, reserved), NVML and, on CPU runs, host RSS."""
    samples = events.of_kind("sample", [
        "mem_allocated_bytes", "mem_reserved_bytes", "mem_peak_allocated_bytes",
        "mem_peak_reserved_bytes", "nvml_used_bytes", "ext",
    ])
    rss = ext_values(samples, "rss_bytes")
    return {
        "allocated": _column_max(samples, "mem_allocated_bytes", "mem_peak_allocated_bytes"),
        "reserved": _column_max(samples, "mem_reserved_bytes", "mem_peak_reserved_bytes"),
        "nvml_used": _column_max(samples, "nvml_used_bytes"),
        "host_rss": maybe(np.nanmax(rss)) if rss.size and not np.isnan(rss).all() else None,
    }


# A prefill event's ext: device KV when the prompt's forward ended, before the strategy's
# post-prefill work (a compressor's cut) shrank it. It is the prefill's peak.
FORWARD_KV_DEVICE_BYTES = "forward_kv_device_bytes"


def _kv_tiers(events: Events) -> dict[str, dict[str, float | None]]:
    """Peak and last reported KV bytes per tier (and strategy structures on the device), over
    every event that reports them; the device peak includes each prompt's KV before the
    strategy's post-prefill work (`ext["forward_kv_device_bytes"]` of prefill events)."""
    tiers = {}
    for tier, values in events.kv.values.items():
        values = values[~np.isnan(values)]
        tiers[tier] = {"peak": float(values.max()) if values.size else None,
                       "final": float(values[-1]) if values.size else None}
    forward = ext_values(events.of_kind("prefill", ["ext"]), FORWARD_KV_DEVICE_BYTES)
    forward = forward[~np.isnan(forward)]
    if forward.size and "device" in tiers:
        tiers["device"]["peak"] = max(tiers["device"]["peak"] or 0.0, float(forward.max()))
    return tiers


def _kv_per_token(requests: Requests, steps: DecodeSteps) -> dict[str, float | None]:
    context = context_tokens_in_flight(requests, steps).astype(np.float64)
    kv_total = np.nan_to_num(steps.kv_device_bytes) + np.nan_to_num(steps.kv_host_bytes)
    usable = steps.counted & (context > 0) & ~np.isnan(steps.kv_device_bytes)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_token = kv_total[usable] / context[usable]
        on_device = steps.kv_device_bytes[usable]
        efficiency = np.where(on_device > 0, context[usable] / (on_device / 1e9), np.nan)
        total_efficiency = np.where(kv_total[usable] > 0, context[usable] / (kv_total[usable] / 1e9), np.nan)
    return {
        "kv_bytes_per_token": maybe(np.median(per_token)) if per_token.size else None,
        "memory_efficiency_tokens_per_gb": _nan_median(efficiency),
        "memory_efficiency_total_tokens_per_gb": _nan_median(total_efficiency),
    }


def _nan_median(values: np.ndarray) -> float | None:
    return maybe(np.nanmedian(values)) if values.size and not np.isnan(values).all() else None


def _evictions(events: Events) -> dict[str, Any]:
    """Evict events, tokens and bytes, in total and per reason. Evict events can be most of a
    trace, so they are summed record batch by record batch."""
    by_reason: dict[str, dict[str, int]] = {}
    simulated = 0
    for batch in events.batches("evict", ["reason", "tokens", "bytes", "ext"]):
        simulated += pc.sum(pc.equal(pc.map_lookup(batch["ext"], "simulated", "first"), 1.0)).as_py() or 0
        reasons = batch["reason"]  # dictionary-encoded: sum per dictionary index, the last one for nulls
        names = reasons.dictionary.to_pylist() + ["unspecified"]
        codes = reasons.indices.fill_null(len(names) - 1).to_numpy()
        counts = np.bincount(codes, minlength=len(names))
        tokens = np.bincount(codes, pc.fill_null(batch["tokens"], 0).to_numpy(), minlength=len(names))
        nbytes = np.bincount(codes, pc.fill_null(batch["bytes"], 0).to_numpy(), minlength=len(names))
        for code in np.flatnonzero(counts):
            totals = by_reason.setdefault(names[code], {"events": 0, "tokens": 0, "bytes": 0})
            totals["events"] += int(counts[code])
            totals["tokens"] += int(tokens[code])
            totals["bytes"] += int(nbytes[code])
    return {
        "events": sum(totals["events"] for totals in by_reason.values()),
        "tokens": sum(totals["tokens"] for totals in by_reason.values()),
        "bytes": sum(totals["bytes"] for totals in by_reason.values()),
        "simulated_events": int(simulated), "by_reason": by_reason,
    }


def transfer_direction(src: str | None, dst: str | None) -> str:
    """store = device->host, fetch = host->device, else `src->dst`."""
    if (src, dst) == ("device", "host"):
        return "store"
    if (src, dst) == ("host", "device"):
        return "fetch"
    return f"{src}->{dst}"


def _transfers(events: Events) -> dict[str, dict[str, float | int | None]]:
    """Offload volume and achieved bandwidth per direction; prefetches are also counted apart."""
    copies = events.of_kind("offload", ["start_ns", "end_ns", "tokens", "bytes", "src_medium", "dst_medium", "ext"])
    if copies.num_rows == 0:
        return {}
    table = pa.table({
        "src": copies["src_medium"].cast(pa.string()), "dst": copies["dst_medium"].cast(pa.string()),
        "bytes": copies["bytes"], "tokens": copies["tokens"],
        "ns": pc.subtract(copies["end_ns"], copies["start_ns"]),
        "prefetch": pc.equal(pc.map_lookup(copies["ext"], "prefetch", "first"), 1.0),
    })
    sums = [([], "count_all"), ("bytes", "sum"), ("tokens", "sum"), ("ns", "sum")]
    groups = {transfer_direction(row["src"], row["dst"]): row
              for row in table.group_by(["src", "dst"]).aggregate(sums).to_pylist()}
    prefetches = table.filter(pc.fill_null(table["prefetch"], False))
    if prefetches.num_rows:
        groups["prefetch"] = prefetches.group_by([]).aggregate(sums).to_pylist()[0]
    result = {}
    for name, row in groups.items():
        nbytes, seconds = int(row["bytes_sum"] or 0), (row["ns_sum"] or 0) / NS_PER_S
        result[name] = {
            "events": row["count_all"], "bytes": nbytes, "tokens": int(row["tokens_sum"] or 0),
            "seconds": float(seconds), "bandwidth_bytes_per_s": nbytes / seconds if seconds > 0 else None,
        }
    return result


def _run_totals(events: Events) -> dict[str, float | int | None]:
    """Run duration (run_start to run_end, else first to last event) and the profiler's own cost."""
    ends = events.of_kind("run_end", ["ext"])
    first, last = run_bounds(events)
    duration_s = (last - first) / NS_PER_S
    hook_ns = ext_values(ends, "profiler_hook_ns")
    cost_s = float(hook_ns[-1] / NS_PER_S) if hook_ns.size and not np.isnan(hook_ns[-1]) else None
    return {
        "duration_s": float(duration_s),
        "events": len(events),
        "finished": bool(ends.num_rows) and not bool(np.nan_to_num(ext_values(ends, "failed")).any()),
        "profiler_cost_s": cost_s,
        "profiler_cost_share": cost_s / duration_s if cost_s is not None and duration_s > 0 else None,
    }
