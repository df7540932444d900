"""The `offload` baseline: its host store, its tokens against `full`, and its events."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kvprof import Clock
from kvprof.models import resolve_model
from kvprof.testing import conformance
from kvprof_transformers.host_store import DeviceRing, HostKVStore
from kvprof_transformers.loading import LoadedModel, load_model
from kvprof_transformers.offload import HostOffloadPolicy, StaticOffloadPolicy
from kvprof_transformers.runner import FullCachePolicy
from transformers_runs import build_requests, offload_events, run_policy

# --- the host store ------------------------------------------------------------------------


def test_host_store_appends_grows_and_fetches_whole_layers_and_rows() -> None:
    batch, heads, dim = 2, 3, 4
    store = HostKVStore(2, batch, heads, dim, torch.float32, torch.device("cpu"), Clock(), capacity=4)
    keys, values = torch.randn(batch, heads, 7, dim), torch.randn(batch, heads, 7, dim)
    store.append(0, keys[:, :, :5], values[:, :, :5])  # past the preallocated 4 tokens: grows
    store.append(0, keys[:, :, 5:], values[:, :, 5:])
    assert store.lengths == [7, 0] and store.capacity >= 7
    assert store.nbytes == 7 * store.token_bytes == 7 * 2 * batch * heads * dim * 4

    whole = store.fetch_all(0, DeviceRing(7, batch, heads, dim, torch.float32, torch.device("cpu")))
    assert torch.equal(whole.keys, keys) and torch.equal(whole.values, values)
    assert (whole.tokens, whole.bytes) == (7, 7 * store.token_bytes)

    rows = torch.tensor([[[0, 6], [2, 3], [1, 5]], [[4, 5], [0, 1], [3, 6]]])  # per batch row and head
    ring = DeviceRing(2, batch, heads, dim, torch.float32, torch.device("cpu"), staging=True)
    fetched = store.fetch_rows(0, rows, ring)
    index = rows.unsqueeze(-1).expand(-1, -1, -1, dim)
    assert torch.equal(fetched.keys, keys.gather(2, index))
    assert torch.equal(fetched.values, values.gather(2, index))
    assert fetched.bytes == 2 * store.token_bytes


# --- against full --------------------------------------------------------------------------


@pytest.mark.slow
def test_offload_generates_what_full_generates_also_with_padding(smollm2: LoadedModel, tmp_path: Path) -> None:
    requests = build_requests(smollm2, "passkey", prompt_len=256, output_len=6, num_prompts=2, depth=0.3)
    # A shorter second prompt: the batch is left-padded, so the runner's 2-D mask is in play.
    requests[1] = dataclasses.replace(requests[1], prompt_token_ids=requests[1].prompt_token_ids[45:])
    full, _ = run_policy(smollm2, FullCachePolicy(), requests, tmp_path / "full.arrow")
    offload, trace = run_policy(smollm2, HostOffloadPolicy(), requests, tmp_path / "offload.arrow")
    assert offload == full
    assert len(full[0]) == 6
    prefill = trace.of_kind("prefill").to_pylist()[0]
    layers = smollm2.config.num_hidden_layers
    head_dim = smollm2.config.hidden_size // smollm2.config.num_attention_heads
    token_bytes = 2 * 2 * smollm2.config.num_key_value_heads * head_dim * 4  # K+V, 2 rows, fp32
    assert prefill["kv_host_bytes"] == layers * 256 * token_bytes  # padded width: 256 slots


# --- events --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(resolve_model("tiny-llama", "random"), "cpu")


def test_offload_events_account_for_every_copy(tiny: LoadedModel, tmp_path: Path) -> None:
    prompt, output = 48, 5
    requests = build_requests(tiny, "synthetic", prompt_len=prompt, output_len=output, num_prompts=2)
    full, _ = run_policy(tiny, FullCachePolicy(), requests, tmp_path / "full.arrow")
    outputs, trace = run_policy(tiny, HostOffloadPolicy(), requests, tmp_path / "offload.arrow")
    assert outputs == full

    config = tiny.config
    layers, steps = config.num_hidden_layers, output - 1
    token_bytes = 2 * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    events = offload_events(trace)
    stores = [e for e in events if e["src_medium"] == "device"]
    fetches = [e for e in events if e["dst_medium"] == "device"]

    prefill_stores = [e for e in stores if e["step"] is None]
    assert [(e["layer"], e["tokens"], e["bytes"]) for e in prefill_stores] == [
        (layer, prompt, prompt * token_bytes) for layer in range(layers)]
    assert [(e["step"], e["layer"], e["tokens"], e["bytes"]) for e in fetches] == [
        (step, layer, prompt + step, (prompt + step) * token_bytes) for step in range(steps) for layer in range(layers)]
    write_backs = [e for e in stores if e["step"] is not None]  # one per step, all layers together
    assert [(e["step"], e["tokens"], e["bytes"]) for e in write_backs] == [
        (step, layers, layers * token_bytes) for step in range(steps)]
    assert all(e["end_ns"] > e["start_ns"] and e["ext"] for e in fetches)

    decode = trace.of_kind("decode_step").to_pylist()
    assert [d["kv_host_bytes"] for d in decode] == [layers * (prompt + s + 1) * token_bytes for s in range(steps)]
    ring_bytes = 2 * (prompt + output) * token_bytes  # two layers in flight, preallocated
    assert {d["kv_device_bytes"] for d in decode} == {ring_bytes}
    # On a CPU device a fetch is a synchronous copy: every fetch is a stall of the compute.
    stalls = [p for p in trace.of_kind("phase").to_pylist() if p["phase"] == "kv_transfer"]
    assert [(p["step"], p["layer"]) for p in stalls] == [(e["step"], e["layer"]) for e in fetches]


@pytest.mark.parametrize("overlap", [True, False])
def test_the_fast_engine_generates_what_full_generates_also_with_padding(tiny: LoadedModel, overlap: bool,
                                                                         tmp_path: Path) -> None:
    requests = build_requests(tiny, "synthetic", prompt_len=48, output_len=5, num_prompts=3)
    requests[1] = dataclasses.replace(requests[1], prompt_token_ids=requests[1].prompt_token_ids[7:])
    full, _ = run_policy(tiny, FullCachePolicy(), requests, tmp_path / "full.arrow")
    outputs, trace = run_policy(tiny, StaticOffloadPolicy(overlap=overlap), requests, tmp_path / "offload.arrow")
    assert outputs == full


def test_the_fast_engine_accounts_for_every_copy(tiny: LoadedModel, tmp_path: Path) -> None:
    """Fixed-size whole-layer copies (every slot of the block) report the KV they carry (the held
    tokens) and the bytes they moved (ext copied_bytes); write-backs one event per step."""
    prompt, output = 48, 5
    requests = build_requests(tiny, "synthetic", prompt_len=prompt, output_len=output, num_prompts=2)
    policy = StaticOffloadPolicy()
    _, trace = run_policy(tiny, policy, requests, tmp_path / "offload.arrow")
    config = tiny.config
    layers, steps, slots = config.num_hidden_layers, output - 1, prompt + output
    token_bytes = 2 * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    events = offload_events(trace)
    fetches = [e for e in events if e["dst_medium"] == "device"]
    assert [(e["step"], e["layer"], e["tokens"], e["bytes"]) for e in fetches] == [
        (step, layer, prompt + step, (prompt + step) * token_bytes) for step in range(steps) for layer in range(layers)]
    assert {dict(e["ext"])["copied_bytes"] for e in fetches} == {slots * token_bytes}
    stores = [e for e in events if e["src_medium"] == "device"]
    assert [(e["step"], e["layer"], e["tokens"]) for e in stores if e["step"] is None] == [
        (None, layer, prompt) for layer in range(layers)]
    assert [(e["step"], e["tokens"], e["bytes"]) for e in stores if e["step"] is not None] == [
        (step, layers, layers * token_bytes) for step in range(steps)]
    decode = trace.of_kind("decode_step").to_pylist()
    assert [d["kv_host_bytes"] for d in decode] == [layers * (prompt + s + 1) * token_bytes for s in range(steps)]
    assert {d["kv_device_bytes"] for d in decode} == {2 * slots * token_bytes}  # two layers' blocks
    stalls = [p for p in trace.of_kind("phase").to_pylist() if p["phase"] == "kv_transfer"]
    assert [(p["step"], p["layer"]) for p in stalls] == [(e["step"], e["layer"]) for e in fetches]  # CPU: sync


@pytest.mark.parametrize("detail", ["step", "layer", "head"])
def test_offload_conforms_at_every_detail(detail: str, tmp_path: Path) -> None:
    report = conformance.check_strategy("offload", detail=detail, trace_dir=tmp_path)
    report.raise_for_problems()
    assert report.counts["offload"] > 0
