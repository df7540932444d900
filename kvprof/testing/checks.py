"""The event contract of `kvprof.hookspecs`, as checks a recorded trace must pass.

Each check takes a `Trace` and returns a list of `Problem`s, empty when the trace conforms.
A problem names the event (its `seq`), says what is wrong and what was expected instead. The
checks read only the trace, so they apply to a strategy on any engine; `ALL_CHECKS` runs them
all. They walk the events in Python: they are meant for the small traces of a plugin's tests.

The rules, beyond the schema (`kvprof validate`):

* fields: every kind carries the required fields of its row in `kvprof.events` (an evict event its reason, tokens,
  bytes and tier, ...).
* units: timestamps are host monotonic nanoseconds inside the run, tiers are `Medium` values,
  byte counts are bytes.
* order: run_start first and run_end last, seq without gaps, a request's events between its
  prefill and its request_end, decode step indices counting up (or restarting at 0 for a new
  batch).
* timestamps: per process (ext["pid"], one process when absent), time runs forward step by
  step: prefill and decode_step events end in emission order, decode steps do not overlap, and
  every other event ends within the step it is emitted in. request_end (which carries the
  request's arrival and last token) and sample (taken on sampler threads) are exempt.
* accounting: an evict or offload moves `tokens` entries, as many as its positions list, and
  every entry of a layer has the same size; device KV never shrinks by more than the evict and
  offload events in between report, and evictions that were not freed show up as growth larger
  than new tokens can explain.
* positions: evicted positions existed in the request (0 <= p < prompt + generated tokens) and
  are not evicted twice from one tier (unless fetched back, or the request was prefilled anew).
* fetches: rows fetched from the host were offloaded there before.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvprof.events import Kind, Medium, required_fields
from kvprof.trace import Trace

MAX_REPEATS = 3  # problems of one sort reported in full; the rest are counted

# From the per-kind field table of kvprof.events (its Required fields).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    kind.value: required_fields(kind) for kind in Kind if required_fields(kind)
}

# Prefill ext keys of engines that measure device KV before and after the policy's post-prefill
# work (the transformers runner does): KV when the prompt's forward ended, and the work's duration,
# which ends at the prefill event's end_ns. `check_accounting` balances that work exactly.
FORWARD_KV_DEVICE_BYTES = "forward_kv_device_bytes"
POLICY_NS = "policy_ns"

# Kinds whose times are not the moment of emission (see the module docstring, "timestamps").
NOT_EMITTED_AT_END = {Kind.REQUEST_END.value, Kind.SAMPLE.value}
STEP_REPORTS = {Kind.PREFILL.value, Kind.DECODE_STEP.value}
DEVICE, HOST = Medium.DEVICE.value, Medium.HOST.value


@dataclass(frozen=True)
class Problem:
    """One way a trace breaks the contract: which check, which event, and what is wrong."""

    check: str
    message: str
    seq: int | None = None

    def __str__(self) -> str:
        where = f"seq {self.seq}: " if self.seq is not None else ""
        return f"[{self.check}] {where}{self.message}"


class _Problems:
    """Collects a check's problems, keeping the first MAX_REPEATS of each sort."""

    def __init__(self, check: str) -> None:
        self.check = check
        self.items: list[Problem] = []
        self.counts: Counter[str] = Counter()

    def add(self, seq: int | None, message: str, sort: str | None = None) -> None:
        sort = sort or message
        self.counts[sort] += 1
        if self.counts[sort] <= MAX_REPEATS:
            self.items.append(Problem(self.check, message, seq))

    def result(self) -> list[Problem]:
        for sort, count in self.counts.items():
            if count > MAX_REPEATS:
                self.items.append(Problem(self.check, f"... {count - MAX_REPEATS} more like: {sort}"))
        return self.items


def events(trace: Trace) -> list[dict[str, Any]]:
    """The trace's events as dicts in seq order, `ext` as a dict."""
    rows = trace.table.to_pylist()
    for row in rows:
        row["ext"] = dict(row["ext"]) if row["ext"] is not None else None
    return sorted(rows, key=lambda row: (row["seq"] is None, row["seq"] or 0))  # `kvprof validate` reports nulls


def describe(event: dict[str, Any]) -> str:
    """'evict (layer 3, request req-0)': the event's kind and what it is about."""
    parts = [f"{name} {event[name]}" for name in ("step", "layer", "kv_head") if event.get(name) is not None]
    if event.get("request_id") is not None:
        parts.append(f"request {event['request_id']}")
    if event["kind"] == Kind.OFFLOAD.value:
        parts.insert(0, f"{event['src_medium']}->{event['dst_medium']}")
    return f"{event['kind']} ({', '.join(parts)})" if parts else event["kind"]


def _ext(event: dict[str, Any], key: str, default: float = 0.0) -> float:
    return (event["ext"] or {}).get(key, default)


def _simulated(event: dict[str, Any]) -> bool:
    return bool(_ext(event, "simulated"))


# --- fields and units ---------------------------------------------------------------------


def check_required_fields(trace: Trace) -> list[Problem]:
    """Each kind carries the required fields of its row in kvprof.events (REQUIRED_FIELDS)."""
    found = _Problems("fields")
    for event in events(trace):
        for name in REQUIRED_FIELDS.get(event["kind"], ()):
            if event[name] is None:
                found.add(event["seq"], f"{describe(event)} has no {name}; every {event['kind']} event needs one "
                          f"(see hook kvprof_{event['kind']})", sort=f"{event['kind']} without {name}")
    return found.result()


def check_units(trace: Trace) -> list[Problem]:
    """Timestamps are monotonic ns within the run; tiers are Medium values; bytes are bytes."""
    found = _Problems("units")
    rows = events(trace)
    starts = [e for e in rows if e["kind"] == Kind.RUN_START.value]
    ends = [e for e in rows if e["kind"] == Kind.RUN_END.value]
    first = starts[0]["start_ns"] if starts else None
    last = ends[-1]["end_ns"] if ends else None
    tiers = {m.value for m in Medium}
    for e in rows:
        if first is not None and e["start_ns"] < first:
            found.add(e["seq"], f"{describe(e)} starts at {e['start_ns']} ns, {first - e['start_ns']} ns before "
                      f"run_start ({first} ns): timestamps must be time.monotonic_ns() of this run",
                      sort="events before run_start")
        if last is not None and e["end_ns"] > last:
            found.add(e["seq"], f"{describe(e)} ends at {e['end_ns']} ns, {e['end_ns'] - last} ns after "
                      f"run_end ({last} ns): timestamps must be time.monotonic_ns() of this run",
                      sort="events after run_end")
        for column in ("src_medium", "dst_medium"):
            if e[column] is not None and e[column] not in tiers:
                found.add(e["seq"], f"{describe(e)}: {column} is {e[column]!r}, expected one of {sorted(tiers)}")
        if e["kind"] == Kind.OFFLOAD.value and e["src_medium"] is not None and e["src_medium"] == e["dst_medium"]:
            found.add(e["seq"], f"{describe(e)} moves bytes from {e['src_medium']} to itself")
        moved = e["kind"] in (Kind.EVICT.value, Kind.OFFLOAD.value) and not _simulated(e)
        if moved and (e["tokens"] or 0) > 0 and (e["bytes"] or 0) < e["tokens"]:
            found.add(e["seq"], f"{describe(e)}: {e['bytes']} bytes for {e['tokens']} tokens, less than one byte "
                      "per entry: `bytes` must count bytes (not KiB or MB)", sort="fewer bytes than tokens")
        if e["kind"] == Kind.DECODE_STEP.value and ((e["tokens"] or 0) < 1 or (e["batch_size"] or 0) < 1):
            found.add(e["seq"], f"{describe(e)}: tokens={e['tokens']}, batch_size={e['batch_size']}; "
                      "a step produces at least one token for at least one request", sort="empty decode steps")
    return found.result()


# --- order and time -----------------------------------------------------------------------


def check_order(trace: Trace) -> list[Problem]:
    """run_start first, run_end last, seq without gaps, each request's events in its lifetime."""
    found = _Problems("order")
    rows = events(trace)
    if not rows:
        return [Problem("order", "the trace has no events")]
    for kind, position, index in ((Kind.RUN_START.value, "first", 0), (Kind.RUN_END.value, "last", -1)):
        count = sum(e["kind"] == kind for e in rows)
        if count != 1:
            found.add(None, f"expected exactly one {kind} event, found {count}")
        elif rows[index]["kind"] != kind:
            found.add(rows[index]["seq"], f"{kind} must be the {position} event, but {describe(rows[index])} is")
    for expected, e in enumerate(rows):
        if e["seq"] != expected:
            found.add(e["seq"], f"expected seq {expected} here (seq counts events from 0 without gaps), "
                      f"found {e['seq']}: events were lost or renumbered", sort="seq gaps")
            break
    _check_request_lifetimes(rows, found)
    _check_step_indices(rows, found)
    return found.result()


def _check_request_lifetimes(rows: list[dict[str, Any]], found: _Problems) -> None:
    prefill_start: dict[str, int] = {}
    ended: dict[str, int] = {}
    for e in rows:
        request = e["request_id"]
        if request is None:
            continue
        if e["kind"] == Kind.PREFILL.value:
            prefill_start.setdefault(request, e["start_ns"])
        elif e["kind"] == Kind.REQUEST_END.value:
            if request in ended:
                found.add(e["seq"], f"request {request} ended twice (first at seq {ended[request]})")
            ended[request] = e["seq"]
    for e in rows:
        request = e["request_id"]
        if request is None or e["kind"] == Kind.PREFILL.value:
            continue
        if request not in prefill_start:
            found.add(e["seq"], f"{describe(e)} is about request {request}, which has no prefill event",
                      sort="events of requests never prefilled")
        elif e["kind"] != Kind.REQUEST_END.value and e["start_ns"] < prefill_start[request]:
            found.add(e["seq"], f"{describe(e)} starts at {e['start_ns']} ns, before its request's prefill "
                      f"started ({prefill_start[request]} ns)", sort="events before their request's prefill")
        if request in ended and e["seq"] > ended[request]:
            found.add(e["seq"], f"{describe(e)} comes after request {request} ended (request_end at seq "
                      f"{ended[request]})", sort="events after their request ended")


def _check_step_indices(rows: list[dict[str, Any]], found: _Problems) -> None:
    previous: dict[str, Any] | None = None
    for e in rows:
        if e["kind"] != Kind.DECODE_STEP.value or e["step"] is None:
            continue
        if previous is not None and e["step"] not in (previous["step"] + 1, 0):
            found.add(e["seq"], f"decode step {e['step']} follows step {previous['step']} (seq {previous['seq']}); "
                      f"expected step {previous['step'] + 1}, or 0 for a new batch", sort="decode steps out of order")
        previous = e


def check_timestamps(trace: Trace) -> list[Problem]:
    """Per process, time runs forward step by step.

    The step reports (prefill and decode_step events) end in the order they are emitted, and
    decode steps do not overlap. Every other event ends within the step it is emitted in: after
    the report emitted before it, no later than the report emitted after it. (Its start may lie
    in an earlier step: a prefetch issued during the previous step. Inside a step, events may
    come in any order: CUDA-timed spans are resolved when the step ends.) request_end and
    sample events are exempt; run_start and run_end are `check_units`'.
    """
    found = _Problems("timestamps")
    by_process: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for e in events(trace):
        if e["kind"] not in NOT_EMITTED_AT_END | {Kind.RUN_START.value, Kind.RUN_END.value}:
            by_process[_ext(e, "pid", -1.0)].append(e)
    for rows in by_process.values():
        _check_steps_in_time(rows, found)
    return found.result()


def _check_steps_in_time(rows: list[dict[str, Any]], found: _Problems) -> None:
    report: dict[str, Any] | None = None      # the last step report emitted
    last_step: dict[str, Any] | None = None   # the last decode step
    within: list[dict[str, Any]] = []         # events emitted since that report
    for e in rows:
        if e["kind"] not in STEP_REPORTS:
            if report is not None and e["end_ns"] < report["end_ns"]:
                found.add(e["seq"], f"{describe(e)} ends at {e['end_ns']} ns, before {describe(report)} (seq "
                          f"{report['seq']}) ended at {report['end_ns']} ns, yet is emitted after it: emit a step's "
                          "events before the step's own event", sort=f"{e['kind']} emitted after its step")
            within.append(e)
            continue
        if report is not None and e["end_ns"] < report["end_ns"]:
            found.add(e["seq"], f"{describe(e)} ends at {e['end_ns']} ns, before {describe(report)} (seq "
                      f"{report['seq']}) ended at {report['end_ns']} ns, yet is emitted after it",
                      sort="step reports out of time order")
        if e["kind"] == Kind.DECODE_STEP.value and last_step is not None and e["start_ns"] < last_step["end_ns"]:
            found.add(e["seq"], f"{describe(e)} starts at {e['start_ns']} ns, before the previous decode step "
                      f"(seq {last_step['seq']}) ended at {last_step['end_ns']} ns", sort="overlapping decode steps")
        for inner in within:
            if inner["end_ns"] > e["end_ns"]:
                found.add(inner["seq"], f"{describe(inner)} ends at {inner['end_ns']} ns, after {describe(e)} (seq "
                          f"{e['seq']}) ended at {e['end_ns']} ns, yet is emitted before it",
                          sort=f"{inner['kind']} ending after the next step")
        report, within = e, []
        if e["kind"] == Kind.DECODE_STEP.value:
            last_step = e


# --- bytes and tokens ---------------------------------------------------------------------


def check_accounting(trace: Trace) -> list[Problem]:
    """Evict/offload tokens match their positions, a layer's entries all have one size, and
    device KV changes only as the evict and offload events say."""
    found = _Problems("accounting")
    rows = events(trace)
    _check_entry_sizes(rows, found)
    unreported = _check_post_prefill_frees(rows, found)
    _check_device_balance(rows, found, _block_bytes(trace), unreported)
    return found.result()


def _block_bytes(trace: Trace) -> int:
    """KV allocation granularity: engines that allocate KV in blocks (vLLM) state the bytes of one
    block in the run metadata as extra["kv_block_bytes"]; token-granular engines state nothing."""
    return int((trace.run.get("extra") or {}).get("kv_block_bytes") or 0)


def _check_entry_sizes(rows: list[dict[str, Any]], found: _Problems) -> None:
    first_of_size: dict[tuple, dict[str, Any]] = {}
    for e in rows:
        if e["kind"] not in (Kind.EVICT.value, Kind.OFFLOAD.value) or e["tokens"] is None:
            continue
        if e["tokens"] <= 0:
            found.add(e["seq"], f"{describe(e)} moves {e['tokens']} tokens; emit only events that move something",
                      sort=f"{e['kind']} of no tokens")
            continue
        if e["positions"] is not None:
            listed = sum(len(head) for head in e["positions"])
            if listed != e["tokens"]:
                found.add(e["seq"], f"{describe(e)}: tokens={e['tokens']}, but its positions list {listed} entries; "
                          "tokens counts the entries named in positions (all heads' lists together)",
                          sort="tokens that do not match positions")
        if e["bytes"] is None or _simulated(e):
            continue
        key = (e["kind"], e["layer"], e["kv_head"], e["src_medium"], e["dst_medium"])
        first = first_of_size.setdefault(key, e)
        if e["bytes"] * first["tokens"] != first["bytes"] * e["tokens"]:
            found.add(e["seq"], f"{describe(e)}: {e['bytes']} bytes for {e['tokens']} tokens "
                      f"= {e['bytes'] / e['tokens']:.1f} bytes per entry, but {describe(first)} at seq {first['seq']} "
                      f"moved {first['bytes'] / first['tokens']:.1f} bytes per entry; every KV entry of a layer has "
                      "the same size", sort=f"{e['kind']} bytes per entry that change")


def _check_post_prefill_frees(rows: list[dict[str, Any]], found: _Problems) -> dict[int, int]:
    """The work a policy does once the prompt is cached (a compressor's cut), checked exactly.

    A prefill event that carries ext[FORWARD_KV_DEVICE_BYTES] (device KV when the prompt's
    forward ended) and ext[POLICY_NS] (how long the policy's post-prefill work took, ending at
    the event's end_ns) brackets that work: the evict and offload events timed inside it must
    account for the change from that figure to the event's kv_device_bytes, byte for byte in
    both directions. Returns, per checked prefill's seq, the bytes freed but not reported
    (negative: reported but not freed), for the balance of the interval it ends.
    """
    unreported: dict[int, int] = {}
    since = 0  # index of the first event after the previous step report
    for index, e in enumerate(rows):
        if e["kind"] not in STEP_REPORTS:
            continue
        first_of_group = since < index or index == 0 or rows[index - 1]["kind"] != Kind.PREFILL.value
        if e["kind"] == Kind.PREFILL.value and first_of_group and FORWARD_KV_DEVICE_BYTES in (e["ext"] or {}):
            unreported[e["seq"]] = _check_policy_window(rows[since:index], e, found)
        since = index + 1
    return unreported


def _check_policy_window(between: list[dict[str, Any]], prefill: dict[str, Any], found: _Problems) -> int:
    end = prefill["end_ns"]
    start = end - int(_ext(prefill, POLICY_NS))
    inside = [e for e in between if e["kind"] in (Kind.EVICT.value, Kind.OFFLOAD.value)
              and start <= e["start_ns"] and e["end_ns"] <= end]
    freed_events = [e for e in inside if e["kind"] == Kind.EVICT.value and not _simulated(e)
                    and (e["src_medium"] or DEVICE) == DEVICE]
    freed = sum(e["bytes"] or 0 for e in freed_events)
    stored = sum(e["bytes"] or 0 for e in inside if e["kind"] == Kind.OFFLOAD.value and e["src_medium"] == DEVICE)
    fetched = sum(e["bytes"] or 0 for e in inside if e["kind"] == Kind.OFFLOAD.value and e["dst_medium"] == DEVICE)
    before, after = int(_ext(prefill, FORWARD_KV_DEVICE_BYTES)), prefill["kv_device_bytes"] or 0
    drop = before - after
    measured = (f"device KV was {before} bytes when the prompt's forward ended and {after} bytes after the "
                f"policy's post-prefill work ({describe(prefill)}, seq {prefill['seq']}): {before} - {after} = "
                f"{drop} bytes left the device")
    if fetched:
        measured += f", while {fetched} bytes were fetched to it"
    if freed > drop + fetched:
        seqs = _seq_range(freed_events)
        found.add(freed_events[0]["seq"],
                  f"the evict events at seq {seqs} report {freed} bytes freed from the device after prefill, but "
                  f"{measured}: {freed - drop - fetched} bytes reported as freed are still resident. Either the "
                  "strategy only masks those entries (free them: replace the cache tensors with smaller ones; or "
                  "mark evictions that only mask ext['simulated']=1), or its evict events over-count bytes "
                  "(bytes = entries x the bytes of one token's key and value in one KV head, measured from the "
                  "tensors)", sort="bytes reported freed after prefill still resident")
    elif drop > freed + stored:
        reported = (f"the evict and offload events there (seq {_seq_range(inside)}) account for {freed + stored}"
                    if inside else "no evict or offload event reports it")
        found.add(prefill["seq"],
                  f"{measured}, but {reported}: {drop - freed - stored} bytes left the device unreported. Either "
                  "the strategy dropped entries without an evict event (padding slots too: report them with "
                  "reason='padding'), or its evict events under-count bytes (count keys and values, and every KV "
                  "head and layer an event covers)", sort="bytes freed after prefill not reported")
    if freed > drop + fetched:
        return drop + fetched - freed  # negative: what was reported but not freed
    return max(0, drop - freed - stored)


def _seq_range(rows: list[dict[str, Any]]) -> str:
    first, last = rows[0]["seq"], rows[-1]["seq"]
    return str(first) if first == last else f"{first}..{last}"


def _check_device_balance(rows: list[dict[str, Any]], found: _Problems, block_bytes: int = 0,
                          unreported: dict[int, int] | None = None) -> None:
    """Between two reports of device KV (prefill and decode_step events), the drop must be
    explained by evictions and transfers, and the rest of the change by new tokens.

    A request's KV may be released without an event once the request ended, so intervals with
    a request_end are not checked. New tokens can add at most `bytes_per_token` each: the most
    bytes any group of prefill events wrote per prompt token (an upper bound, padding included),
    plus, where KV is allocated in blocks of `block_bytes`, one fresh block per request in flight.
    """
    intervals = _residency_intervals(rows)
    for i in intervals:  # what the post-prefill check measured, so the KV per token is the true one
        i.freed += (unreported or {}).get(i.first_seq, 0)
    bytes_per_token = max((i.written / i.tokens for i in intervals if i.prefill and i.tokens > 0), default=None)
    for i in intervals:
        if i.requests_ended:
            continue
        drop = i.before - i.after
        explained = i.freed + i.stored + i.fetched  # fetched copies may be dropped after use
        if drop > explained:
            found.add(i.report["seq"], f"device KV fell from {i.before} to {i.after} bytes since seq {i.since} "
                      f"(-{drop}), but the evict and offload events in between account for {explained} "
                      f"bytes: report all freed memory in evict events", sort="device KV freed without an event")
        if i.prefill or bytes_per_token is None:
            continue
        limit = max(i.report["tokens"] or 0, i.in_flight) * bytes_per_token + i.in_flight * block_bytes
        if i.written > limit:
            found.add(i.report["seq"], f"device KV went from {i.before} to {i.after} bytes since seq {i.since} while "
                      f"evict events report {i.freed} bytes freed: that leaves "
                      f"{i.written} bytes of new KV, more than {max(i.report['tokens'] or 0, i.in_flight)} tokens can "
                      f"hold (at most {bytes_per_token:.0f} bytes each, as written by prefill). Either bytes reported "
                      "as freed are still resident (an eviction that only masks must set ext['simulated']=1), or the "
                      "evict events over-count the bytes they freed", sort="evicted bytes still resident")


@dataclass
class _Interval:
    """What happened to device KV between two residency reports."""

    report: dict[str, Any]   # the prefill or decode_step event that ends the interval
    since: int | None        # seq of the previous report
    before: int
    after: int
    freed: int = 0           # evicted from the device
    stored: int = 0          # offloaded device -> host
    fetched: int = 0         # fetched host -> device
    requests_ended: bool = False
    in_flight: int = 0       # requests prefilled and not ended
    tokens: int = 0          # prompt tokens computed, for prefill groups
    first_seq: int = -1      # seq of the first report of the interval (of a prefill group)

    @property
    def prefill(self) -> bool:
        return self.report["kind"] == Kind.PREFILL.value

    def extend(self, later: _Interval) -> None:
        """Absorb the interval that follows this one."""
        self.report, self.after, self.in_flight = later.report, later.after, later.in_flight
        self.freed += later.freed
        self.stored += later.stored
        self.fetched += later.fetched
        self.tokens += later.tokens
        self.requests_ended |= later.requests_ended

    @property
    def written(self) -> int:
        """Bytes of KV that new tokens must have added for `after` to be right. Stored bytes
        are left out (a store may keep its device copy), so this is never an overestimate."""
        return self.after - self.before + self.freed - self.fetched


def _residency_intervals(rows: list[dict[str, Any]]) -> list[_Interval]:
    intervals: list[_Interval] = []
    current = _Interval(report={}, since=None, before=0, after=0)
    prefilled: set[str] = set()
    ended: set[str] = set()
    for e in rows:
        kind = e["kind"]
        if kind == Kind.EVICT.value and not _simulated(e) and (e["src_medium"] or DEVICE) == DEVICE:
            current.freed += e["bytes"] or 0
        elif kind == Kind.OFFLOAD.value and e["src_medium"] == DEVICE:
            current.stored += e["bytes"] or 0
        elif kind == Kind.OFFLOAD.value and e["dst_medium"] == DEVICE:
            current.fetched += e["bytes"] or 0
        elif kind == Kind.REQUEST_END.value:
            current.requests_ended = True
            ended.add(e["request_id"])
        elif kind in (Kind.PREFILL.value, Kind.DECODE_STEP.value) and e["kv_device_bytes"] is not None:
            if kind == Kind.PREFILL.value:
                prefilled.add(e["request_id"])
                current.tokens = e["tokens"] or 0
            current.report, current.after = e, e["kv_device_bytes"]
            current.in_flight = len(prefilled - ended)
            if current.prefill and intervals and intervals[-1].prefill:
                intervals[-1].extend(current)  # the prefills of one batch write one cache together
            else:
                current.first_seq = e["seq"]
                intervals.append(current)
            current = _Interval(report={}, since=e["seq"], before=e["kv_device_bytes"], after=0)
    return intervals


# --- positions ----------------------------------------------------------------------------


def check_positions(trace: Trace) -> list[Problem]:
    """Evicted positions existed in the request and are not evicted twice from one tier."""
    found = _Problems("positions")
    rows = events(trace)
    prompt = {e["request_id"]: _prompt_tokens(e) for e in rows if e["kind"] == Kind.PREFILL.value}
    output = {e["request_id"]: e["tokens"] or 0 for e in rows if e["kind"] == Kind.REQUEST_END.value}
    steps_since: dict[str, int] = defaultdict(int)   # decode steps since the request's prefill
    gone: dict[tuple, int] = {}                     # (request, layer, head, tier, position) -> seq
    for e in rows:
        request = e["request_id"]
        if e["kind"] == Kind.PREFILL.value:
            steps_since[request] = 0
            _forget(gone, partial(_of_request, request))  # prefilled anew (recompute): all back
        elif e["kind"] == Kind.DECODE_STEP.value:
            for known in steps_since:
                steps_since[known] += 1
        elif e["kind"] == Kind.OFFLOAD.value and e["dst_medium"] == DEVICE:
            for key in _entries(e, DEVICE):
                gone.pop(key, None)  # fetched back: it may be evicted again
        if e["kind"] != Kind.EVICT.value or request is None or e["positions"] is None:
            continue
        limit = prompt.get(request, 0) + min(steps_since.get(request, 0) + 1, output.get(request, 1 << 62))
        tier = e["src_medium"] or DEVICE
        for key in _entries(e, tier):
            position = key[-1]
            if not 0 <= position < limit:
                found.add(e["seq"], f"{describe(e)} evicts position {position}, which request {request} does not have "
                          f"(expected 0 <= position < {limit}: its prompt and the tokens generated so far)",
                          sort="evicted positions out of range")
            elif (earlier := gone.get(key, gone.get(_all_heads(key)))) is not None:
                found.add(e["seq"], f"{describe(e)} evicts position {position} again: it was already evicted from "
                          f"{tier} at seq {earlier}", sort="positions evicted twice")
            else:
                gone[key] = e["seq"]
    return found.result()


def _prompt_tokens(prefill: dict[str, Any]) -> int:
    return int(_ext(prefill, "prompt_tokens", (prefill["tokens"] or 0) + _ext(prefill, "cached_tokens")))


def _entries(event: dict[str, Any], tier: str) -> Iterable[tuple]:
    """(request, layer, head, tier, position) for each position an event names; head is None
    when one list stands for all heads."""
    lists = event["positions"] or []
    for index, positions in enumerate(lists):
        head = event["kv_head"] if event["kv_head"] is not None else (index if len(lists) > 1 else None)
        for position in positions:
            yield (event["request_id"], event["layer"], head, tier, position)


def _all_heads(entry: tuple) -> tuple:
    """The same entry, named by an event whose one position list stands for all heads."""
    request, layer, _, tier, position = entry
    return (request, layer, None, tier, position)


def _of_request(request: str, key: tuple) -> bool:
    return bool(key[0] == request)


def _forget(entries: dict[tuple, Any], which: Callable[[tuple], bool]) -> None:
    for key in [key for key in entries if which(key)]:
        del entries[key]


# --- fetches ------------------------------------------------------------------------------


def check_fetches(trace: Trace) -> list[Problem]:
    """Rows fetched host -> device were offloaded device -> host before."""
    found = _Problems("fetches")
    stored_positions: set[tuple] = set()
    stored_layers: set[tuple] = set()   # (request or None, layer) with anything stored
    for e in events(trace):
        if e["kind"] != Kind.OFFLOAD.value:
            continue
        if e["src_medium"] == DEVICE and e["dst_medium"] == HOST:
            stored_positions.update(_entries(e, HOST))
            stored_layers.update({(e["request_id"], e["layer"]), (None, e["layer"])})
        elif e["src_medium"] == HOST and e["dst_medium"] == DEVICE:
            if e["positions"] is None:
                if (e["request_id"], e["layer"]) not in stored_layers:
                    found.add(e["seq"], f"{describe(e)} fetches rows, but nothing of layer {e['layer']} was offloaded "
                              "to the host before", sort="fetches of layers never offloaded")
                continue
            missing = [key[-1] for key in _entries(e, HOST)
                       if key not in stored_positions and _all_heads(key) not in stored_positions]
            if missing:
                shown = f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
                found.add(e["seq"], f"{describe(e)} fetches positions {shown} that were never offloaded to the host",
                          sort="fetches of rows never offloaded")
    return found.result()


ALL_CHECKS: tuple[Callable[[Trace], list[Problem]], ...] = (
    check_required_fields, check_units, check_order, check_timestamps, check_accounting, check_positions,
    check_fetches,
)


def run_checks(trace: Trace) -> list[Problem]:
    """Every check's problems, in the order of ALL_CHECKS. A check that cannot handle the trace
    (a kvprof bug, or a trace the schema check already rejects) is reported as a problem too."""
    problems = []
    for check in ALL_CHECKS:
        try:
            problems += check(trace)
        except Exception as exc:
            problems.append(Problem("kit", f"{check.__name__} could not check this trace: "
                                           f"{type(exc).__name__}: {exc}"))
    return problems
