"""Retention of early-context facts: answer accuracy, and whether the facts' tokens stayed cached.

Accuracy: each passkey or fact probe request (the workload recorded in the trace says which
requests are probes, their answer and their facts' token spans) is correct when its generated
text contains the answer (`kvprof.workloads.answer_is_correct`). Accuracy is grouped by probe
kind, context length (prompt and follow-up tokens), depth and question mode, given with its 95 %
Wilson score interval, and divided by the accuracy of the `full` baseline on the same prompts: a
`full` trace is its own baseline; any other needs one (`baseline=`, `kvprof analyze --baseline
FULL_TRACE`), else the ratio is left out. The KV budget is what the strategy declared in the
run's metadata (`extra["kv_budget"]`: a fraction of the prompt and/or a count of tokens).

Token survival (`token_survival`): for each fact's span, the share of its tokens still cached, per
layer and KV head, in the cache each answer token was computed from. Fetched coverage
(`fetched_coverage`), for strategies that keep everything somewhere but fetch a selection to the
device (InfiniGen): the share of the span's tokens fetched for each answer token.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvprof.analysis.common import Events, ext_values, ints, ratio, require_events, take_rows
from kvprof.analysis.summary import finished_requests
from kvprof.errors import NotApplicable, UsageError
from kvprof.trace import Trace
from kvprof.workloads import answer_is_correct

WILSON_Z = 1.959964  # two-sided 95 %


def kv_budget(run: dict[str, Any]) -> float | None:
    """A run's KV budget as a fraction of the prompt, from what its strategy declared in the run
    metadata: `extra["kv_budget"] = {"fraction": f or None, "tokens": n or None}` gives f + n /
    the workload's prompt_len, at most 1. None when the strategy declared no budget (full keeps
    everything: it is the reference, not a point on a budget axis)."""
    declared = (run.get("extra") or {}).get("kv_budget")
    if not declared:
        return None
    fraction, tokens = declared.get("fraction"), declared.get("tokens")
    prompt_len = ((run.get("workload") or {}).get("params") or {}).get("prompt_len")
    if tokens is not None and not prompt_len:
        return None
    total = (fraction or 0.0) + (float(tokens) / float(prompt_len) if tokens is not None and prompt_len else 0.0)
    return min(1.0, total) if fraction is not None or tokens is not None else None


def wilson_interval(correct: int, judged: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """The Wilson score interval of a share `correct / judged` (95 % by default); None if none judged."""
    if judged <= 0:
        return None
    share = correct / judged
    spread = z * math.sqrt(share * (1 - share) / judged + z * z / (4 * judged * judged))
    centre = share + z * z / (2 * judged)
    scale = 1 + z * z / judged
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def probe_requests(trace: Trace) -> list[dict[str, Any]]:
    """The workload's requests that carry a retention probe, as recorded in the trace."""
    requests = ((trace.run or {}).get("workload") or {}).get("requests") or []
    return [request for request in requests if request.get("probe")]


def _require_probes(trace: Trace) -> list[dict[str, Any]]:
    probes = probe_requests(trace)
    if not probes:
        raise NotApplicable(
            f"{trace.path}: no retention probes in this trace (run the passkey or facts workload)"
        )
    return probes


def outcomes(trace: Trace) -> dict[str, dict[str, Any]]:
    """Per probe request: kind, context length, depth, answer, generated text and correctness
    (None when the request did not finish in the trace)."""
    probes = _require_probes(trace)
    finished = finished_requests(Events.of(trace))
    texts = dict(zip(finished.ids.tolist(), finished.texts.tolist()))
    result = {}
    for request in probes:
        probe, request_id = request["probe"], request["request_id"]
        text = texts.get(request_id)
        result[request_id] = {
            "request_id": request_id, "kind": probe["kind"],
            "context_tokens": request["prompt_tokens"] + request.get("followup_tokens", 0),
            "depth": probe.get("depth"), "answer": probe["answer"], "text": text,
            "correct": None if request_id not in texts else answer_is_correct(probe, text or ""),
        }
    return result


def _check_same_prompts(trace: Trace, baseline: Trace) -> None:
    ours = {r["request_id"]: r for r in probe_requests(trace)}
    theirs = {r["request_id"]: r for r in _require_probes(baseline)}
    for request_id, request in ours.items():
        other = theirs.get(request_id)
        if other is None or (other["prompt_tokens"], other["probe"]["answer"], other["probe"]["spans"]) != (
                request["prompt_tokens"], request["probe"]["answer"], request["probe"]["spans"]):
            raise UsageError(
                f"baseline {baseline.path} did not run the same prompts as {trace.path} "
                f"(request {request_id} differs); trace both with the same workload and seed"
            )


def _accuracy(rows: list[dict[str, Any]], key: str) -> tuple[int, int, float | None]:
    judged = [row[key] for row in rows if row[key] is not None]
    return len(judged), sum(judged), (sum(judged) / len(judged) if judged else None)


def question_mode(trace: Trace) -> str:
    """How the probes asked their question: "in_prompt" or "after" (a follow-up turn)."""
    params = ((trace.run or {}).get("workload") or {}).get("params") or {}
    return params.get("question") or "in_prompt"


def retention(trace: Trace, baseline: Trace | None = None) -> dict[str, Any]:
    """Accuracy of the probes (95 % Wilson interval, ratio to the full baseline), token survival
    and, for fetch-based strategies, fetched coverage."""
    require_events(trace)
    own = outcomes(trace)
    budget = kv_budget(trace.run or {})
    question = question_mode(trace)
    if baseline is None and (trace.run or {}).get("strategy") == "full":
        baseline = trace
    reference: dict[str, dict[str, Any]] = {}
    if baseline is not None:
        _check_same_prompts(trace, baseline)
        reference = outcomes(baseline)
    for request_id, row in own.items():
        row["baseline_correct"] = reference.get(request_id, {}).get("correct")

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in own.values():
        groups[(row["kind"], row["context_tokens"], row["depth"])].append(row)
    table = []
    for (kind, context, depth), rows in sorted(groups.items(), key=lambda item: tuple(str(k) for k in item[0])):
        table.append({"kind": kind, "context_tokens": context, "depth": depth, "question": question,
                      "budget": budget, **_judged(rows)})
    return {
        "budget": budget,
        "question": question,
        "baseline": None if baseline is None else ("self" if baseline is trace else str(baseline.path)),
        "overall": _judged(list(own.values())),
        "accuracy": table,
        "requests": list(own.values()),
        "survival": token_survival(trace),
        "coverage": fetched_coverage(trace),
    }


def _judged(rows: list[dict[str, Any]]) -> dict[str, Any]:
    judged, correct, accuracy = _accuracy(rows, "correct")
    _, _, base = _accuracy(rows, "baseline_correct")
    return {"requests": judged, "correct": correct, "accuracy": accuracy,
            "interval_95": wilson_interval(correct, judged), "baseline_accuracy": base, "ratio": ratio(accuracy, base)}


# --- which forward produced which answer token --------------------------------------------


def model_shape(trace: Trace) -> tuple[int | None, int | None]:
    """(layers, KV heads) of the run's model, from its recorded config; None where unknown."""
    run = trace.run or {}
    config = (run.get("model") or {}).get("config") or {}
    config = config.get("text_config") or config
    layers = (run.get("extra") or {}).get("num_layers") or config.get("num_hidden_layers")
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    return layers, heads


@dataclass
class _Forwards:
    """Per probe request (aligned with `ids`): its prefill chunks and answer tokens.

    Forwards of a request are numbered in order: its prompt's prefill 0, a follow-up chunk 1,
    then decode step s is forward `chunks + s`. Answer token j comes out of forward
    `chunks - 1 + j`.
    """

    ids: list[str]
    chunks: np.ndarray           # prefill chunks (1, or 2 with a follow-up)
    followup_start: np.ndarray   # start_ns of the follow-up chunk (int64 max without one)
    tokens: np.ndarray           # answer tokens generated (0: the request did not finish)

    def index(self, request_ids: pa.Array) -> np.ndarray:
        """Each request id's index in `ids`, -1 for requests that are not probes."""
        found = pc.index_in(request_ids, value_set=pa.array(self.ids, pa.string()))
        return ints(pa.table({"owner": found}), "owner", fill=-1)

    def forward(self, owner: np.ndarray, step: np.ndarray, start_ns: np.ndarray) -> np.ndarray:
        """The forward an event of `owner` belongs to: by its step, or (step -1: prefill) by
        whether it started within the follow-up chunk."""
        prefill = (start_ns >= self.followup_start[owner]).astype(np.int64)
        return np.where(step >= 0, self.chunks[owner] + step, prefill)


def _forwards(events: Events, probes: list[dict[str, Any]]) -> _Forwards:
    ids = [r["request_id"] for r in probes]
    forwards = _Forwards(ids, np.zeros(len(ids), np.int64), np.full(len(ids), np.iinfo(np.int64).max),
                         np.zeros(len(ids), np.int64))
    prefills = events.of_kind("prefill", ["request_id", "start_ns", "ext"])
    owner = forwards.index(prefills["request_id"])
    followup = np.nan_to_num(ext_values(prefills, "followup")) == 1.0
    starts = ints(prefills, "start_ns")
    known = owner >= 0
    np.add.at(forwards.chunks, owner[known], 1)
    forwards.followup_start[owner[known & followup]] = starts[known & followup]
    ends = events.of_kind("request_end", ["request_id", "tokens"])
    owner = forwards.index(ends["request_id"])
    forwards.tokens[owner[owner >= 0]] = ints(ends, "tokens")[owner >= 0]
    forwards.tokens[forwards.chunks == 0] = 0  # never prefilled in this trace
    return forwards


# --- positions named by events -------------------------------------------------------------


def _named_positions(table: pa.Table, rows: np.ndarray, tag: np.ndarray, layers: int, heads: int,
                     slice_rows: int = 2048) -> np.ndarray:
    """(tag, layer, head, position) for every position named by the events at `rows` (`tag`
    is carried per event: the columns of its key). Position lists are read per event as:
    one per KV head (a layer's event), one for the head in `kv_head`, one for every head and
    layer (layer -1 / head -1: "all"), or, on an event without a layer, layers x heads lists,
    layer-major. Read `slice_rows` events at a time, so long position lists never sit in
    memory whole."""
    found = [np.empty((0, tag.shape[1] + 3), np.int64)]
    for first in range(0, len(rows), slice_rows):
        part, part_tag = rows[first:first + slice_rows], tag[first:first + slice_rows]
        chosen = take_rows(table, part, ["layer", "kv_head", "positions"]).combine_chunks()
        positions = chosen["positions"].chunk(0) if chosen.num_rows else pa.array([], chosen["positions"].type)
        lists_per_event = ints(pa.table({"n": pc.list_value_length(positions)}), "n")
        head_lists = pc.list_flatten(positions)
        list_event = pc.list_parent_indices(positions).to_numpy()
        list_rank = np.arange(len(list_event)) - np.repeat(np.cumsum(lists_per_event) - lists_per_event,
                                                           lists_per_event)
        flat = pc.list_flatten(head_lists).to_numpy().astype(np.int64)
        event = list_event[pc.list_parent_indices(head_lists).to_numpy()]
        rank = list_rank[pc.list_parent_indices(head_lists).to_numpy()]
        layer = ints(chosen, "layer", fill=-1)[event]
        kv_head = ints(chosen, "kv_head", fill=-1)[event]
        count = lists_per_event[event]
        every_layer = (layer < 0) & (count == layers * heads) & (count > 1)
        head = np.where(kv_head >= 0, kv_head, np.where(count == 1, -1, rank % heads))
        layer = np.where(every_layer, rank // heads, layer)
        found.append(np.column_stack([part_tag[event], layer, head, flat]))
    return np.concatenate(found)


def _expand(named: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """Replace "all layers" / "all heads" (-1, in columns -3 and -2) by one row per layer / head;
    drop rows outside the model's shape."""
    for column, count in ((-3, layers), (-2, heads)):
        every = named[:, column] == -1
        if every.any():
            repeated = np.repeat(named[every], count, axis=0)
            repeated[:, column] = np.tile(np.arange(count), int(every.sum()))
            named = np.concatenate([named[~every], repeated])
    return named[(named[:, -3] < layers) & (named[:, -2] < heads)]


def _event_rows(events: Events, kind: str, forwards: _Forwards, keep: Any = None) -> tuple[np.ndarray, ...]:
    """(trace rows, owner, forward) of the `kind` events of probe requests that name positions;
    `keep(batch) -> mask` narrows them further."""
    rows, owners, forward = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    columns = ["request_id", "step", "start_ns", "positions", "dst_medium", "ext"]
    for batch in events.batches(kind, columns):
        table = pa.Table.from_batches([batch])
        owner = forwards.index(table["request_id"])
        wanted = (owner >= 0) & ~pc.is_null(table["positions"]).to_numpy(zero_copy_only=False)
        if keep is not None:
            wanted &= keep(table)
        owner = owner[wanted]
        rows.append(batch["row"].to_numpy()[wanted])
        owners.append(owner)
        forward.append(forwards.forward(owner, ints(table, "step", fill=-1)[wanted], ints(table, "start_ns")[wanted]))
    return np.concatenate(rows), np.concatenate(owners), np.concatenate(forward)


def _fetches(table: pa.Table) -> np.ndarray:
    return pc.fill_null(pc.equal(table["dst_medium"], "device"), False).to_numpy(zero_copy_only=False)


# --- token survival and fetched coverage ----------------------------------------------------


def token_survival(trace: Trace) -> dict[str, Any]:
    """Share of each fact span's tokens still cached, per layer and KV head, at each answer token.

    A strategy's evictions in a forward take effect after that forward's attention (every
    kvprof strategy evicts after attending), so answer token j was computed from the cache
    less what forwards before its own evicted: the prompt's prefill, a follow-up chunk, the
    decode steps before it. Read from evict events that name positions, whatever the detail
    level (a layer's event: one list per KV head; one list: every head; no layer: every layer,
    or layers x heads lists, layer-major), so every detail level gives the same figures.
    Simulated evictions (masked, ext simulated=1) count as gone.
    """
    events = Events.of(trace)
    probes = _require_probes(trace)
    forwards = _forwards(events, probes)
    layers, heads = _shape(trace)
    rows, owner, forward = _event_rows(events, "evict", forwards)
    named = _expand(_named_positions(events.table, rows, np.column_stack([owner, forward]), layers, heads),
                    layers, heads)
    spans_out = []
    for index, request in enumerate(probes):
        if forwards.tokens[index] == 0:
            continue
        mine = named[named[:, 0] == index]
        produced_by = forwards.chunks[index] - 1 + np.arange(forwards.tokens[index])  # forward of answer token j
        for span_index, (start, end) in enumerate(request["probe"]["spans"]):
            first_gone = _first_forward(mine[:, 1:], start, end, layers, heads)   # (L, H, span)
            cached = first_gone[None] >= produced_by[:, None, None, None]            # (tokens, L, H, span)
            share = cached.mean(axis=-1)                                             # (tokens, L, H)
            spans_out.append(_span_record(request, span_index, end - start, share))
    return _summary(spans_out, layers, heads, "as each answer token was computed (the cache it was computed from)")


def _first_forward(named: np.ndarray, start: int, end: int, layers: int, heads: int) -> np.ndarray:
    """(layers, heads, end - start): the first forward that evicted each position of the span
    from each layer and head (int64 max: never). `named` rows: forward, layer, head, position."""
    size = end - start
    inside = named[(named[:, 3] >= start) & (named[:, 3] < end)]
    first = np.full(layers * heads * size, np.iinfo(np.int64).max)
    np.minimum.at(first, (inside[:, 1] * heads + inside[:, 2]) * size + inside[:, 3] - start, inside[:, 0])
    return first.reshape(layers, heads, size)


def fetched_coverage(trace: Trace) -> dict[str, Any] | None:
    """For strategies that fetch KV to the device: share of each fact span's tokens, per layer and
    KV head, that were fetched for the forward that produced each answer token.

    A decode step's fetch events (offload to the device, with request_id and positions, as
    InfiniGen's at --detail head) name what each layer and head attended over; a layer whose
    fetch names no positions fetched its whole KV, and a prefill chunk attends over everything:
    both count as fully covered. None for runs without fetches; "available": False when the
    fetches are speculated selections whose positions were not traced.
    """
    events = Events.of(trace)
    fetches = events.of_kind("offload", ["dst_medium", "positions", "ext"])
    fetches = fetches.filter(pc.fill_null(pc.equal(fetches["dst_medium"], "device"), False))
    if fetches.num_rows == 0:
        return None
    probes = _require_probes(trace)
    forwards = _forwards(events, probes)
    layers, heads = _shape(trace)
    rows, owner, forward = _event_rows(events, "offload", forwards, keep=_fetches)
    if not len(rows):
        selective = (np.nan_to_num(ext_values(fetches, "speculated")) == 1.0).any()
        if selective:
            return {"available": False, "reason": "the speculated fetches name no positions: trace at --detail head"}
    token = forward - (forwards.chunks[owner] - 1)
    named = _expand(_named_positions(events.table, rows, np.column_stack([owner, token]), layers, heads),
                    layers, heads)
    fetched_lists = _expand(_list_keys(events.table, rows, np.column_stack([owner, token]), layers, heads),
                            layers, heads)
    spans_out = []
    for index, request in enumerate(probes):
        count = forwards.tokens[index]
        if count == 0:
            continue
        mine, listed = named[named[:, 0] == index], fetched_lists[fetched_lists[:, 0] == index]
        for span_index, (start, end) in enumerate(request["probe"]["spans"]):
            size = end - start
            share = np.ones((count, layers, heads))
            listed_here = listed[(listed[:, 1] >= 0) & (listed[:, 1] < count)][:, :4]
            share[listed_here[:, 1], listed_here[:, 2], listed_here[:, 3]] = 0.0
            inside = mine[(mine[:, 4] >= start) & (mine[:, 4] < end) & (mine[:, 1] >= 0) & (mine[:, 1] < count)]
            cells = np.unique(inside[:, 1:5], axis=0)
            np.add.at(share, (cells[:, 0], cells[:, 1], cells[:, 2]), 1.0 / size)
            spans_out.append(_span_record(request, span_index, size, share))
    return {"available": True, **_summary(spans_out, layers, heads,
                                          "as each answer token was computed (the positions fetched for its forward)")}


def _list_keys(table: pa.Table, rows: np.ndarray, tag: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """(tag, layer, head, 0) for every position list of the events at `rows` (-1: all), read as
    in `_named_positions`: an empty list still says its layer and head fetched none of a span."""
    if not len(rows):
        return np.empty((0, tag.shape[1] + 3), np.int64)
    chosen = take_rows(table, rows, ["layer", "kv_head", "positions"]).combine_chunks()
    positions = chosen["positions"].chunk(0)
    count = ints(pa.table({"n": pc.list_value_length(positions)}), "n")
    event = pc.list_parent_indices(positions).to_numpy()
    rank = np.arange(len(event)) - np.repeat(np.cumsum(count) - count, count)
    layer, kv_head = ints(chosen, "layer", fill=-1)[event], ints(chosen, "kv_head", fill=-1)[event]
    lists = count[event]
    every_layer = (layer < 0) & (lists == layers * heads) & (lists > 1)
    head = np.where(kv_head >= 0, kv_head, np.where(lists == 1, -1, rank % heads))
    layer = np.where(every_layer, rank // heads, layer)
    return np.column_stack([tag[event], layer, head, np.zeros(len(event), np.int64)])


def _shape(trace: Trace) -> tuple[int, int]:
    layers, heads = model_shape(trace)
    if not layers or not heads:
        raise NotApplicable(f"{trace.path}: the run's model config does not say its layers and KV heads")
    return int(layers), int(heads)


def _span_record(request: dict[str, Any], span_index: int, size: int, share: np.ndarray) -> dict[str, Any]:
    """One fact span's figures from `share` (answer tokens, layers, heads)."""
    per_token = share.mean(axis=(1, 2))
    return {
        "request_id": request["request_id"], "span": span_index,
        "asked": span_index == request["probe"].get("asked", 0), "tokens": size, "answer_tokens": len(share),
        "mean": float(share.mean()), "min": float(share.min()), "first_token": float(per_token[0]),
        "last_token": float(per_token[-1]), "per_answer_token": per_token.tolist(),
        "per_layer": share.mean(axis=(0, 2)).tolist(), "per_layer_head": share.mean(axis=0).tolist(),
    }


def _summary(spans: list[dict[str, Any]], layers: int, heads: int, moment: str) -> dict[str, Any]:
    asked = [s for s in spans if s["asked"]]

    def mean_of(key: str) -> float | None:
        return float(np.mean([s[key] for s in asked])) if asked else None

    return {
        "moment": moment, "layers": layers, "kv_heads": heads,
        "asked_mean": mean_of("mean"), "asked_first_token": mean_of("first_token"),
        "asked_last_token": mean_of("last_token"),
        "asked_mean_per_layer": np.mean([s["per_layer"] for s in asked], axis=0).tolist() if asked else [],
        "spans": spans,
    }
