"""Retention of early-context facts: answer accuracy, and whether the facts' tokens stayed cached.

Accuracy: each passkey or fact probe request (the workload recorded in the trace says which
requests are probes, their answer and their facts' token spans) is correct when its generated
text contains the answer (`kvprof.workloads.answer_is_correct`). Accuracy is grouped by probe
kind, context length (prompt tokens), depth and KV budget, and divided by the accuracy of the
`full` baseline on the same prompts: a `full` trace is its own baseline; any other needs one
(`baseline=`, `kvprof analyze --baseline FULL_TRACE`), else the ratio is left out.

Token survival: for each fact's span [start, end) of a probe request, the share of its tokens
still cached, per layer and KV head, at the moment the question was asked. That moment is the
request's first token (end of its last prefill chunk): the question closes the prompt, and what
the strategy evicted by then (including its eviction right after prefill) is what the answer is
generated from. A token counts as gone once an evict event of that request names its position
for that layer and head (an evict without a layer applies to all layers; one position list, or
one without `kv_head`, to all heads). Simulated evictions (masked, ext simulated=1) count as gone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvprof.analysis.common import Events, NotApplicable, ints, ratio, require_events, take_rows
from kvprof.analysis.summary import finished_requests
from kvprof.strategy import UsageError
from kvprof.trace import Trace
from kvprof.workloads import answer_is_correct

KEEPS_ALL_KV = ("full", "offload", "vllm")


def kv_budget(run: dict[str, Any]) -> float | None:
    """A run's KV budget as a fraction of the prompt (for accuracy against budget).

    The first rule that applies, reading the strategy's options:
    1. max_num_kv > 0: max_num_kv / the workload's prompt_len, at most 1 (InfiniGen's token cap);
    2. budget: taken as it is, a fraction (InfiniGen's, or any plugin's that names it so);
    3. heavy + recent (H2O): each heavy_tokens / prompt_len if set, else heavy_ratio (same for recent);
    4. strategies that keep all KV (full, offload, vllm): 1.0;
    otherwise None (unknown).
    """
    options = run.get("options") or {}
    prompt_len = ((run.get("workload") or {}).get("params") or {}).get("prompt_len")
    if options.get("max_num_kv") and prompt_len:
        return min(1.0, float(options["max_num_kv"]) / float(prompt_len))
    if options.get("budget") is not None:
        return float(options["budget"])
    parts = []
    for part in ("heavy", "recent"):
        tokens, fraction = options.get(f"{part}_tokens"), options.get(f"{part}_ratio")
        parts.append(float(tokens) / float(prompt_len) if tokens is not None and prompt_len
                     else None if fraction is None else float(fraction))
    if None not in parts:
        return sum(parts)
    if run.get("plugin") in KEEPS_ALL_KV:
        return 1.0
    return None


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
            "request_id": request_id, "kind": probe["kind"], "context_tokens": request["prompt_tokens"],
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


def retention(trace: Trace, baseline: Trace | None = None) -> dict[str, Any]:
    """Accuracy of the probes (with its ratio to the full baseline) and token survival."""
    require_events(trace)
    own = outcomes(trace)
    budget = kv_budget(trace.run or {})
    if baseline is None and (trace.run or {}).get("plugin") == "full":
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
        judged, correct, accuracy = _accuracy(rows, "correct")
        _, _, base = _accuracy(rows, "baseline_correct")
        table.append({"kind": kind, "context_tokens": context, "depth": depth, "budget": budget,
                      "requests": judged, "correct": correct, "accuracy": accuracy,
                      "baseline_accuracy": base, "ratio": ratio(accuracy, base)})
    judged, correct, accuracy = _accuracy(list(own.values()), "correct")
    _, _, base = _accuracy(list(own.values()), "baseline_correct")
    return {
        "budget": budget,
        "baseline": None if baseline is None else ("self" if baseline is trace else str(baseline.path)),
        "overall": {"requests": judged, "correct": correct, "accuracy": accuracy,
                    "baseline_accuracy": base, "ratio": ratio(accuracy, base)},
        "accuracy": table,
        "requests": list(own.values()),
        "survival": token_survival(trace),
    }


# --- token survival -----------------------------------------------------------------------


def model_shape(trace: Trace) -> tuple[int | None, int | None]:
    """(layers, KV heads) of the run's model, from its recorded config; None where unknown."""
    run = trace.run or {}
    config = (run.get("model") or {}).get("config") or {}
    config = config.get("text_config") or config
    layers = (run.get("extra") or {}).get("num_layers") or config.get("num_hidden_layers")
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    return layers, heads


def _question_windows(events: Events, request_ids: set[str]) -> dict[str, tuple[int, int]]:
    """Per probe request: (start of its first prefill, its question time = end of its last
    prefill chunk). Only evictions inside this window can count for its survival."""
    prefills = events.of_kind("prefill", ["request_id", "start_ns", "end_ns"])
    grouped = prefills.group_by("request_id").aggregate([("start_ns", "min"), ("end_ns", "max")])
    return {rid: (start, end) for rid, start, end in zip(grouped["request_id"].to_pylist(),
                                                         grouped["start_ns_min"].to_pylist(),
                                                         grouped["end_ns_max"].to_pylist()) if rid in request_ids}


def _evict_rows(events: Events, windows: dict[str, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(trace rows, index of the owning request in `windows`) of the evict events that count:
    the request's own, within its window. Times are checked first, so the request ids of the
    (many) evictions outside every window are never read."""
    starts, ends = (np.array([w[i] for w in windows.values()], dtype=np.int64) for i in (0, 1))
    order = np.argsort(starts)
    reach = np.maximum.accumulate(ends[order])  # latest window end among windows started so far
    candidates = [np.empty(0, np.int64)]
    for batch in events.batches("evict", ["end_ns"]):
        at = batch["end_ns"].to_numpy()
        latest = np.searchsorted(starts[order], at, side="right") - 1
        candidates.append(batch["row"].to_numpy()[(latest >= 0) & (reach[np.maximum(latest, 0)] >= at)])
    rows = np.concatenate(candidates)
    keys = take_rows(events.table, rows, ["request_id", "end_ns"])
    owner = pc.index_in(keys["request_id"], value_set=pa.array(list(windows), pa.string()))
    owner = ints(pa.table({"owner": owner}), "owner", fill=-1)
    at = ints(keys, "end_ns")
    known = owner >= 0
    inside = known & (at >= starts[np.maximum(owner, 0)]) & (at <= ends[np.maximum(owner, 0)])
    return rows[inside], owner[inside]


def _evicted_positions(table: pa.Table, rows: np.ndarray, owner: np.ndarray, low: np.ndarray,
                       high: np.ndarray, slice_rows: int = 2048) -> np.ndarray:
    """(owner, layer, head, position) for the positions named by the evict events at `rows` that
    fall in [low, high) of their owner (its facts' spans). -1 as layer or head means "all" (no
    layer given; one position list shared by the heads). Read `slice_rows` events at a time,
    so a trace with long position lists never sits in memory whole."""
    found = [np.empty((0, 4), np.int64)]
    for first in range(0, len(rows), slice_rows):
        part, part_owner = rows[first:first + slice_rows], owner[first:first + slice_rows]
        chosen = take_rows(table, part, ["layer", "kv_head", "positions"]).combine_chunks()
        positions = chosen["positions"].chunk(0) if chosen.num_rows else pa.array([], chosen["positions"].type)
        lists_per_event = ints(pa.table({"n": pc.list_value_length(positions)}), "n")
        head_lists = pc.list_flatten(positions)
        list_event = pc.list_parent_indices(positions).to_numpy()
        list_rank = np.arange(len(list_event)) - np.repeat(np.cumsum(lists_per_event) - lists_per_event,
                                                           lists_per_event)
        flat = pc.list_flatten(head_lists).to_numpy().astype(np.int64)
        flat_list = pc.list_parent_indices(head_lists).to_numpy()
        event = list_event[flat_list]
        keep = (flat >= low[part_owner[event]]) & (flat < high[part_owner[event]])
        flat, flat_list, event = flat[keep], flat_list[keep], event[keep]
        kv_head = ints(chosen, "kv_head", fill=-1)[event]
        shared = lists_per_event[event] == 1
        head = np.where(kv_head >= 0, kv_head, np.where(shared, -1, list_rank[flat_list]))
        found.append(np.stack([part_owner[event], ints(chosen, "layer", fill=-1)[event], head, flat], axis=1))
    return np.concatenate(found)


def _expand(evicted: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """Replace "all layers" / "all heads" (-1) by one row per layer / head."""
    for column, count in ((0, layers), (1, heads)):
        every = evicted[:, column] == -1
        if every.any():
            repeated = np.repeat(evicted[every], count, axis=0)
            repeated[:, column] = np.tile(np.arange(count), int(every.sum()))
            evicted = np.concatenate([evicted[~every], repeated])
    return evicted


def token_survival(trace: Trace) -> dict[str, Any]:
    """Share of each fact span's tokens still cached per layer and KV head at question time."""
    events = Events.of(trace)
    probes = _require_probes(trace)
    windows = _question_windows(events, {r["request_id"] for r in probes})
    probes = [r for r in probes if r["request_id"] in windows]  # the others never prefilled here
    spans = [r["probe"]["spans"] for r in probes]
    low = np.array([min(start for start, _ in s) for s in spans], dtype=np.int64)
    high = np.array([max(end for _, end in s) for s in spans], dtype=np.int64)
    windows = {r["request_id"]: windows[r["request_id"]] for r in probes}
    rows, owner = _evict_rows(events, windows) if probes else (np.empty(0, np.int64),) * 2
    evicted = _evicted_positions(events.table, rows, owner, low, high)
    layers, heads = model_shape(trace)  # when not recorded: the largest the evictions name
    layers = layers or int(max(evicted[:, 1].max(initial=0), 0)) + 1
    heads = heads or int(max(evicted[:, 2].max(initial=0), 0)) + 1

    by_owner = np.argsort(evicted[:, 0], kind="stable")
    bounds = np.searchsorted(evicted[by_owner, 0], np.arange(len(probes) + 1))
    spans_out = []
    for index, request in enumerate(probes):
        mine = _expand(evicted[by_owner[bounds[index]:bounds[index + 1]], 1:], layers, heads)
        mine = mine[(mine[:, 0] < layers) & (mine[:, 1] < heads)]
        for span_index, (start, end) in enumerate(request["probe"]["spans"]):
            size = end - start
            inside = mine[(mine[:, 2] >= start) & (mine[:, 2] < end)]
            cells = np.unique((inside[:, 0] * heads + inside[:, 1]) * size + inside[:, 2] - start)
            gone = np.bincount(cells // size, minlength=layers * heads).reshape(layers, heads)
            share = 1.0 - gone / size
            spans_out.append({
                "request_id": request["request_id"], "span": span_index,
                "asked": span_index == request["probe"].get("asked", 0), "tokens": size,
                "mean": float(share.mean()), "min": float(share.min()),
                "per_layer": share.mean(axis=1).tolist(), "per_layer_head": share.tolist(),
            })
    asked_spans = [s for s in spans_out if s["asked"]]
    return {
        "moment": "first token of the request (end of its last prefill chunk)",
        "layers": layers, "kv_heads": heads,
        "asked_mean": float(np.mean([s["mean"] for s in asked_spans])) if asked_spans else None,
        "asked_mean_per_layer": np.mean([s["per_layer"] for s in asked_spans], axis=0).tolist() if asked_spans else [],
        "spans": spans_out,
    }
