"""A host-memory KV store with asynchronous copies to and from the device.

Shared by the `offload` baseline and by InfiniGen. Every layer's full K/V lives here, pinned when
the device is a GPU, token-major: ``[tokens, batch, kv_heads, head_dim]``. That layout makes a
layer's first n tokens one contiguous block (one DMA for a whole-layer fetch) and a gathered
token set a plain ``index_select`` of head_dim-long rows (InfiniGen's per-head selection).

Copies to the device land in a `DeviceRing`: two device slots per ring, one for the layer that is
computing and one for the layer in flight, so the device holds only the layers in flight. Copies
run on the store's own CUDA streams (one for host-to-device fetches, one for device-to-host
stores); the consumer makes the compute stream wait on the copy's CUDA event and never blocks
the host. Each copy is timed with `Clock.mark()` on its stream.

Row fetches whose positions are on the GPU gather there, without a host round trip: the pinned
store is mapped into the device's address space (CUDA unified addressing), so one `index_select`
on the fetch stream reads the selected rows straight over the link into the ring slot. Where that
mapping is not available, the rows are gathered on the host into a pinned staging buffer and
copied.

On a CPU device the same calls run as plain, synchronous copies (the "device" is then the
working set the model attends over), so the whole path is testable without a GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvprof import Clock


@dataclass
class Copy:
    """One copy between the host store and the device, and its timing marks.

    A fetch's `keys`/`values` are ``[batch, kv_heads, tokens, head_dim]`` views of a device ring
    slot; they are valid once the compute stream waited on `done` (`HostKVStore.wait`) and until
    the slot is released (`HostKVStore.release`).
    """

    layer: int
    to_device: bool                  # True: host -> device fetch; False: device -> host store
    tokens: int                      # tokens per (batch row, KV head)
    bytes: int
    first: int                       # store: the first token slot written (fetch: 0)
    start: Any                       # Clock.mark() before the copy, on the copy's stream
    end: Any                         # Clock.mark() after it
    done: Any = None                 # torch.cuda.Event recorded after the copy (CUDA only)
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    slot: _Slot | None = None
    rows: torch.Tensor | None = None  # a row fetch's positions [batch, kv_heads, tokens], if kept
    ext: dict[str, float] = field(default_factory=dict)


@dataclass
class _Slot:
    keys: torch.Tensor                 # device, [rows, batch, kv_heads, head_dim]
    values: torch.Tensor
    staging_keys: torch.Tensor | None  # host (pinned), same shape: where row gathers land
    staging_values: torch.Tensor | None
    consumed: Any = None               # CUDA event: the compute stream is done reading the slot
    fetched: Any = None                # CUDA event: the copy out of the staging buffer finished


class DeviceRing:
    """Two device buffers that fetched layers land in, alternating by layer index.

    With `staging`, each slot also has a pinned host buffer that row gathers are written to
    before their copy (a gathered set is not contiguous in the store).
    """

    SLOTS = 2

    def __init__(self, rows: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, staging: bool = False) -> None:
        self.shape = (batch, kv_heads, head_dim)
        self.dtype, self.device, self.staging = dtype, device, staging
        self.rows = 0
        self.slots: list[_Slot] = []
        self._allocate(max(rows, 1))

    def _allocate(self, rows: int) -> None:
        pin = self.device.type == "cuda"

        def device_buffer() -> torch.Tensor:
            return torch.empty((rows, *self.shape), dtype=self.dtype, device=self.device)

        def host_buffer() -> torch.Tensor | None:
            return torch.empty((rows, *self.shape), dtype=self.dtype, pin_memory=pin) if self.staging else None

        self.slots = [_Slot(device_buffer(), device_buffer(), host_buffer(), host_buffer())
                      for _ in range(self.SLOTS)]
        self.rows = rows

    def slot(self, layer: int, rows: int) -> _Slot:
        """The slot for `layer`, grown (by doubling) to hold `rows` tokens."""
        if rows > self.rows:
            _synchronize(self.device)  # nothing may still read or write the old buffers
            self._allocate(max(rows, 2 * self.rows))
        return self.slots[layer % self.SLOTS]

    @property
    def nbytes(self) -> int:
        """Device bytes of the ring (both slots, keys and values)."""
        return sum(s.keys.nbytes + s.values.nbytes for s in self.slots)


class HostKVStore:
    """Every layer's K/V in host memory, appended as tokens come, fetched whole or by rows.

    `capacity` is preallocated (tokens per layer); a longer sequence grows the store by doubling.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, clock: Clock, capacity: int) -> None:
        self.shape = (batch, kv_heads, head_dim)
        self.dtype, self.device, self.clock = dtype, device, clock
        self.cuda = device.type == "cuda"
        self.fetch_stream = torch.cuda.Stream(device) if self.cuda else None
        self.store_stream = torch.cuda.Stream(device) if self.cuda else None
        self.lengths = [0] * num_layers
        self._stored: list[Any] = [None] * num_layers  # last store's CUDA event, per layer
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._grow(num_layers, max(capacity, 1))
        self.gathers_on_device = self.cuda and _device_can_read_pinned(device)
        self._row_offsets: torch.Tensor | None = None  # device: b*H + h, per (batch row, head)

    # --- memory ------------------------------------------------------------------------------

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.empty((capacity, *self.shape), dtype=self.dtype, pin_memory=self.cuda)

    def _grow(self, num_layers: int, capacity: int) -> None:
        if self.keys:
            _synchronize(self.device)  # pending stores write into the old buffers
        old_keys, old_values = self.keys, self.values
        self.keys = [self._empty(capacity) for _ in range(num_layers)]
        self.values = [self._empty(capacity) for _ in range(num_layers)]
        for layer, length in enumerate(self.lengths if old_keys else []):
            self.keys[layer][:length].copy_(old_keys[layer][:length])
            self.values[layer][:length].copy_(old_values[layer][:length])
        self.capacity = capacity
        self._mapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> device views of the store

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V in one layer (all batch rows and KV heads)."""
        batch, heads, dim = self.shape
        return 2 * batch * heads * dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of KV held (tokens stored, not the preallocated capacity)."""
        return sum(self.lengths) * self.token_bytes

    # --- device -> host ----------------------------------------------------------------------

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Copy:
        """Store new tokens' K/V (``[batch, kv_heads, n, head_dim]`` on the device) after the
        layer's existing ones. On CUDA the copy runs on the store stream once the compute stream
        has produced them; the caller may drop its tensors right away."""
        count = keys.shape[-2]
        first = self.lengths[layer]
        if first + count > self.capacity:
            self._grow(len(self.lengths), max(first + count, 2 * self.capacity))
        host_keys = self.keys[layer][first:first + count]
        host_values = self.values[layer][first:first + count]
        stream = self.store_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            keys.record_stream(stream)  # keep their memory until the copy has read it
            values.record_stream(stream)
        with _on(stream):
            start = self.clock.mark(stream)
            host_keys.copy_(keys.permute(2, 0, 1, 3), non_blocking=True)
            host_values.copy_(values.permute(2, 0, 1, 3), non_blocking=True)
            end = self.clock.mark(stream)
            done = _record(stream)
        self._stored[layer] = done
        self.lengths[layer] = first + count
        return Copy(layer, False, count, count * self.token_bytes, first, start, end, done)

    # --- host -> device ----------------------------------------------------------------------

    def fetch_all(self, layer: int, ring: DeviceRing) -> Copy:
        """Copy the layer's whole K/V into its ring slot (one contiguous block each)."""
        count = self.lengths[layer]
        slot = ring.slot(layer, count)
        with self._fetching(layer, slot) as stream:
            start = self.clock.mark(stream)
            slot.keys[:count].copy_(self.keys[layer][:count], non_blocking=True)
            slot.values[:count].copy_(self.values[layer][:count], non_blocking=True)
            end = self.clock.mark(stream)
            done = _record(stream)
        return self._fetched(layer, slot, count, start, end, done)

    def fetch_rows(self, layer: int, rows: torch.Tensor, ring: DeviceRing, ready: Any = None) -> Copy:
        """Copy the given tokens of each (batch row, KV head) to the layer's ring slot. `rows` is
        an int64 tensor ``[batch, kv_heads, n]`` of positions below the layer's length, on the
        host or on the device; `ready` is a CUDA event after which device `rows` are valid.

        Device rows on a GPU that can read the pinned store: gathered by the device on the fetch
        stream. Otherwise: gathered on the host into the slot's pinned staging buffer, then copied.
        """
        if self.gathers_on_device and rows.is_cuda:
            return self._gather_on_device(layer, rows, ring, ready)
        return self._gather_on_host(layer, rows.cpu(), ring)

    def _gather_on_device(self, layer: int, rows: torch.Tensor, ring: DeviceRing, ready: Any) -> Copy:
        batch, heads, count = rows.shape
        slot = ring.slot(layer, count)
        stream = self.fetch_stream
        gather_start = time.perf_counter_ns()
        with self._fetching(layer, slot, ready):
            rows.record_stream(stream)  # made on the compute stream, read here
            if self._row_offsets is None:
                self._row_offsets = torch.arange(batch * heads, device=self.device).view(batch, heads)
            # Row r of the flattened store is (token r // (B*H), batch row, head) in that order.
            flat = torch.empty((count, batch, heads), dtype=torch.int64, device=self.device)
            torch.add(self._row_offsets, rows.permute(2, 0, 1), alpha=batch * heads, out=flat)
            keys, values = self._mapped_layer(layer)
            start = self.clock.mark(stream)
            torch.index_select(keys, 0, flat.view(-1), out=_as_rows(slot.keys[:count], keys.dtype))
            torch.index_select(values, 0, flat.view(-1), out=_as_rows(slot.values[:count], values.dtype))
            end = self.clock.mark(stream)
            done = _record(stream)
        copy = self._fetched(layer, slot, count, start, end, done)
        copy.ext["gather_ns"] = float(time.perf_counter_ns() - gather_start)  # host time to issue it
        return copy

    def _mapped_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pinned keys and values as device tensors of rows (one per token, batch row
        and head), the widest element that divides a row, for fewer, wider reads over the link."""
        if layer not in self._mapped:
            self._mapped[layer] = (_as_rows(_mapped(self.keys[layer], self.device)),
                                   _as_rows(_mapped(self.values[layer], self.device)))
        return self._mapped[layer]

    def _gather_on_host(self, layer: int, rows: torch.Tensor, ring: DeviceRing) -> Copy:
        batch, heads, count = rows.shape
        slot = ring.slot(layer, count)
        if slot.fetched is not None:
            slot.fetched.synchronize()  # the previous copy out of this staging buffer is done
        if self._stored[layer] is not None and self.cuda:
            self._stored[layer].synchronize()  # the rows we read have landed on the host
        gather_start = time.perf_counter_ns()
        # Row r of the flattened store is (token r // (B*H), batch row, head) in that order.
        flat = rows.permute(2, 0, 1) * (batch * heads) + torch.arange(batch * heads).view(batch, heads)
        flat = flat.reshape(-1)
        length, dim = self.lengths[layer], self.shape[-1]
        staged_keys, staged_values = slot.staging_keys[:count], slot.staging_values[:count]
        torch.index_select(self.keys[layer][:length].view(-1, dim), 0, flat, out=staged_keys.view(-1, dim))
        torch.index_select(self.values[layer][:length].view(-1, dim), 0, flat, out=staged_values.view(-1, dim))
        gather_ns = time.perf_counter_ns() - gather_start
        with self._fetching(layer, slot) as stream:
            start = self.clock.mark(stream)
            slot.keys[:count].copy_(staged_keys, non_blocking=True)
            slot.values[:count].copy_(staged_values, non_blocking=True)
            end = self.clock.mark(stream)
            done = _record(stream)
        slot.fetched = done
        copy = self._fetched(layer, slot, count, start, end, done)
        copy.ext["gather_ns"] = float(gather_ns)
        return copy

    def _fetching(self, layer: int, slot: _Slot, ready: Any = None) -> Any:
        """The context a fetch into `slot` runs in: on CUDA the fetch stream, after the slot's
        previous reader, the layer's last store and `ready` (an event the fetch's input needs)."""
        stream = self.fetch_stream
        if stream is not None:
            for event in (slot.consumed, self._stored[layer], ready):
                if event is not None:
                    stream.wait_event(event)
        return _on(stream)

    def _fetched(self, layer: int, slot: _Slot, count: int, start: Any, end: Any, done: Any) -> Copy:
        keys = slot.keys[:count].permute(1, 2, 0, 3)
        values = slot.values[:count].permute(1, 2, 0, 3)
        return Copy(layer, True, count, count * self.token_bytes, 0, start, end, done, keys, values, slot)

    # --- the consumer side ---------------------------------------------------------------------

    def wait(self, copy: Copy) -> Any:
        """Make the compute stream wait for a fetch; returns a mark of when it started waiting
        (on a CPU device the copy already happened: None)."""
        if copy.done is None:
            return None
        waiting_from = self.clock.mark()
        torch.cuda.current_stream(self.device).wait_event(copy.done)
        return waiting_from

    def release(self, copy: Copy) -> None:
        """The compute stream has read the fetched slot: a later fetch may overwrite it."""
        if self.cuda and copy.slot is not None:
            copy.slot.consumed = _record(torch.cuda.current_stream(self.device))


def _on(stream: Any) -> Any:
    """`torch.cuda.stream(stream)` on CUDA; a no-op context on the CPU."""
    if stream is None:
        import contextlib

        return contextlib.nullcontext(None)
    return _StreamContext(stream)


class _StreamContext:
    """Like torch.cuda.stream(s), but yields the stream (for marks inside the block)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._inner = torch.cuda.stream(stream)

    def __enter__(self) -> Any:
        self._inner.__enter__()
        return self.stream

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


def _record(stream: Any) -> Any:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_rows(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous ``[..., head_dim]`` tensor as a 2-D tensor of rows, each row reinterpreted
    as `dtype` (default: the widest of int64/int32/int16 whose size divides a row's bytes)."""
    row_bytes = tensor.shape[-1] * tensor.element_size()
    if dtype is None:
        dtype = next(d for d in (torch.int64, torch.int32, torch.int16, torch.uint8)
                     if row_bytes % torch.empty((), dtype=d).element_size() == 0)
    return tensor.view(-1, tensor.shape[-1]).view(dtype)


class _CudaArray:
    """A device-side description (``__cuda_array_interface__``) of a pinned host tensor's bytes."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # keeps the host memory alive as long as the device view
        self.__cuda_array_interface__ = {"shape": (tensor.numel() * tensor.element_size(),), "typestr": "|u1",
                                         "data": (tensor.data_ptr(), False), "version": 3, "strides": None}


def _mapped(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device tensor aliasing a contiguous pinned host tensor: with unified addressing, pinned
    memory has the same address on the device, and kernels reading it read over the link."""
    raw = torch.as_tensor(_CudaArray(tensor), device=device)
    if raw.data_ptr() != tensor.data_ptr():
        raise RuntimeError("the pinned tensor was copied, not mapped")
    return raw.view(tensor.dtype).view(tensor.shape)


_MAPPING_WORKS: dict[str, bool] = {}


def _device_can_read_pinned(device: torch.device) -> bool:
    """Whether kernels on `device` read pinned host memory through `_mapped` (checked once per
    device by reading back a known tensor)."""
    key = str(device)
    if key not in _MAPPING_WORKS:
        try:
            probe = torch.arange(1024, dtype=torch.int64).pin_memory()
            read = _mapped(probe, device).index_select(0, torch.arange(1023, -1, -1, device=device))
            _MAPPING_WORKS[key] = torch.equal(read.cpu(), probe.flip(0))
        except (RuntimeError, TypeError, ValueError):
            _MAPPING_WORKS[key] = False
    return _MAPPING_WORKS[key]


# --- the fast engine's host store: fixed shapes, graph-capturable copies -----------------------------


class PinnedLayers:
    """Every layer's K/V in host memory, ``[batch, kv_heads, slots, head_dim]`` per layer, for the
    fast engine (`offload` and `infinigen` on `StaticPolicy`): slot j holds what `StaticKV` would.

    On a GPU the buffers are pinned and mapped into the device's address space, so kernels write
    new tokens straight into them at a slot held in device memory (`store_at`, graph-safe) and
    gather rows from them (`gather_rows`); whole-layer fetches are one DMA of the layer's block
    (`fetch_into`). On a CPU device they are plain tensors and the same calls are plain copies.
    The pinned buffers are kept between runs of one geometry (`_HOST_POOL`): pinning tens of GB
    takes seconds, and a benchmark runs several strategies on one geometry.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.shape = (batch, kv_heads, slots, head_dim)
        self.dtype, self.device = dtype, device
        if self.cuda and not _device_can_read_pinned(device):
            raise RuntimeError("this GPU cannot read pinned host memory through unified addressing")
        buffers = _host_buffers(2 * num_layers, self.shape, dtype, self.cuda)
        self.keys, self.values = buffers[:num_layers], buffers[num_layers:]
        self.device_keys = [_mapped(t, device) if self.cuda else t for t in self.keys]
        self.device_values = [_mapped(t, device) if self.cuda else t for t in self.values]

    @property
    def token_bytes(self) -> int:
        """Bytes of one slot's K and V in one layer (all batch rows and KV heads)."""
        batch, heads, _, dim = self.shape
        return 2 * batch * heads * dim * self.dtype.itemsize

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's K and V block (every slot)."""
        return self.token_bytes * self.shape[2]

    def clear_from(self, first: int) -> None:
        """Slots from `first` on hold zeros (masked slots are still read: no NaN may hide there)."""
        for tensor in self.keys + self.values:
            tensor[:, :, first:].zero_()

    def store_chunk(self, layer: int, first: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Eager: a chunk's K/V ``[batch, kv_heads, n, head_dim]`` at slots [first, first + n)
        (on a GPU a copy kernel writes through the mapping, on the current stream)."""
        n = keys.shape[-2]
        self.device_keys[layer][:, :, first:first + n].copy_(keys)
        self.device_values[layer][:, :, first:first + n].copy_(values)

    def store_at(self, layer: int, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Graph-safe: one token per row at the slot in the device tensor `slot` (1,)."""
        self.device_keys[layer].index_copy_(2, slot, keys)
        self.device_values[layer].index_copy_(2, slot, values)

    def fetch_into(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The layer's whole block into device buffers of its shape: one DMA each, on the
        current stream (graph-capturable: fixed addresses and size). Where torch's pinned copy
        cannot be captured, the copy reads the mapped store instead."""
        if self.cuda and not _pinned_copy_capturable(self.device):
            keys.copy_(self.device_keys[layer])
            values.copy_(self.device_values[layer])
            return
        keys.copy_(self.keys[layer], non_blocking=self.cuda)
        values.copy_(self.values[layer], non_blocking=self.cuda)


_PINNED_COPY_CAPTURABLE: dict[str, bool] = {}


def _pinned_copy_capturable(device: torch.device) -> bool:
    """Whether a non-blocking pinned-host-to-device copy can be captured in a CUDA graph (checked
    once per device, on a small copy)."""
    key = str(device)
    if key not in _PINNED_COPY_CAPTURABLE:
        host = torch.arange(4096, dtype=torch.int64).pin_memory()
        target = torch.zeros(4096, dtype=torch.int64, device=device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
                target.copy_(host, non_blocking=True)
            graph.replay()
            torch.cuda.synchronize(device)
            _PINNED_COPY_CAPTURABLE[key] = torch.equal(target.cpu(), host)
        except RuntimeError:
            torch.cuda.synchronize(device)
            _PINNED_COPY_CAPTURABLE[key] = False
    return _PINNED_COPY_CAPTURABLE[key]


_HOST_POOL: dict[tuple[Any, ...], list[torch.Tensor]] = {}
_HOST_HOLDERS: list[Any] = []  # what keeps the pooled memory registered


def _host_buffers(count: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> list[torch.Tensor]:
    """`count` host tensors of `shape`; pinned ones are reused from the last call of that geometry.

    Pinned memory is one plain allocation registered with CUDA (cudaHostRegister): exactly the
    bytes needed, where torch's pinned allocator would round each tensor up to a power of two
    (a 32K-token batch of 8 would pin 64 GiB for 34 GB of KV) and keep it cached after use.
    Where registering is not available, torch's pinned tensors are used.
    """
    key = (count, shape, dtype, pin)
    if pin and key in _HOST_POOL:
        return _HOST_POOL[key]
    _HOST_POOL.clear()  # one geometry at a time: free the old pinned memory first
    _HOST_HOLDERS.clear()
    if pin and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # torch's cached pinned blocks (earlier geometries) back to the system
    if not pin:
        return [torch.zeros(shape, dtype=dtype) for _ in range(count)]
    numel = math.prod(shape)
    holder = _RegisteredHost.create(count * numel, dtype)
    if holder is not None:
        buffers = [holder.tensor[i * numel:(i + 1) * numel].view(shape) for i in range(count)]
        _HOST_HOLDERS.append(holder)
    else:
        buffers = [torch.zeros(shape, dtype=dtype, pin_memory=True) for _ in range(count)]
    _HOST_POOL[key] = buffers
    return buffers


class _RegisteredHost:
    """A plain host tensor page-locked and mapped with cudaHostRegister, unregistered when dropped."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.registered = False

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype) -> _RegisteredHost | None:
        try:
            cudart = torch.cuda.cudart()
            holder = cls(torch.zeros(numel, dtype=dtype))
            error = cudart.cudaHostRegister(holder.tensor.data_ptr(), holder.tensor.nbytes, 0)
            if int(getattr(error, "value", error)) != 0:
                return None
            holder.registered = True
            probe = holder.tensor[:64]
            probe.copy_(torch.arange(64).to(dtype))
            device = torch.device("cuda", torch.cuda.current_device())
            read = _mapped(probe, device).index_select(0, torch.arange(64, device=device)).cpu()  # a kernel reads it
            if not torch.equal(read, probe) or not probe.is_pinned():
                return None
            probe.zero_()
            return holder
        except Exception:  # noqa: BLE001 - no cudart binding or registering refused: torch's pinned memory
            return None

    def __del__(self) -> None:
        if self.registered:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
            self.registered = False


def gather_rows(src_keys: torch.Tensor, src_values: torch.Tensor, positions: torch.Tensor, count: torch.Tensor,
                dst_keys: torch.Tensor, dst_values: torch.Tensor) -> None:
    """Copy, per (batch row, KV head), the first `count` selected slots into the first `count` rows.

    src_*: ``[batch, kv_heads, slots, head_dim]`` (on a GPU: the mapped pinned store, so the reads
    go over the link); positions: ``[batch, kv_heads, cap]`` int64; count: (1,) or 0-d int64 on
    the device, the same for every head; dst_*: ``[batch, kv_heads, rows >= cap, head_dim]``.
    Rows from `count` on are left as they were (attention masks them). On CUDA one Triton
    kernel reads only the selected rows (programs past `count` return at once): graph-safe, no
    host wait. Elsewhere: a plain gather of the whole cap.
    """
    if src_keys.is_cuda and _triton_available() and _TRITON.get("gather_ok", True):
        try:
            _gather_rows_triton(src_keys, src_values, positions, count, dst_keys, dst_values)
            _TRITON["gather_ok"] = True
            return
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build here: the plain gather
            _TRITON["gather_ok"] = False
            _TRITON["gather_error"] = f"{type(exc).__name__}: {exc}"
    cap = positions.shape[-1]
    index = positions.unsqueeze(-1).expand(-1, -1, -1, src_keys.shape[-1])
    dst_keys[:, :, :cap].copy_(src_keys.gather(2, index))
    dst_values[:, :, :cap].copy_(src_values.gather(2, index))


_TRITON: dict[str, Any] = {}


def _triton_available() -> bool:
    if "ok" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON["ok"] = True
            _define_kernels()
        except Exception:  # noqa: BLE001 - any import or definition problem: fall back
            _TRITON["ok"] = False
    return _TRITON["ok"]


def _define_kernels() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(src_k, src_v, pos, count_ptr, dst_k, dst_v, slots, cap, dst_rows,
                      DIM: tl.constexpr, BLOCK: tl.constexpr):
        block = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)          # batch row * kv_heads + head
        count = tl.load(count_ptr)
        first = block * BLOCK
        if first < count:
            rows = first + tl.arange(0, BLOCK)
            ok = rows < count
            where = tl.load(pos + head * cap + rows, mask=ok, other=0).to(tl.int64)
            cols = tl.arange(0, DIM)[None, :]
            source = (head * slots + where)[:, None] * DIM + cols
            target = (head * dst_rows + rows)[:, None] * DIM + cols
            tl.store(dst_k + target, tl.load(src_k + source, mask=ok[:, None]), mask=ok[:, None])
            tl.store(dst_v + target, tl.load(src_v + source, mask=ok[:, None]), mask=ok[:, None])

    @triton.jit
    def stamp_kernel(out, step_ptr, index, width):
        step = tl.load(step_ptr)
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                        pack=1)
        tl.store(out + step * width + index, now)

    @triton.jit
    def value_kernel(out, step_ptr, index, width, value_ptr):
        step = tl.load(step_ptr)
        tl.store(out + step * width + index, tl.load(value_ptr).to(tl.int64))

    _TRITON.update(gather=gather_kernel, stamp=stamp_kernel, value=value_kernel)


GATHER_BLOCK = 32


def _gather_rows_triton(src_keys: torch.Tensor, src_values: torch.Tensor, positions: torch.Tensor,
                        count: torch.Tensor, dst_keys: torch.Tensor, dst_values: torch.Tensor) -> None:
    batch, heads, slots, dim = src_keys.shape
    cap = positions.shape[-1]
    grid = (-(-cap // GATHER_BLOCK), batch * heads)
    _TRITON["gather"][grid](src_keys, src_values, positions, count, dst_keys, dst_values, slots, cap,
                            dst_keys.shape[2], DIM=dim, BLOCK=GATHER_BLOCK, num_warps=4)


class StepLog:
    """Per decode step, a row of int64 slots that device work fills in without host waits:
    timestamps (`stamp`: the GPU's global timer, ns) and values (`value`: a device scalar such as
    a selected-token count), at the row of the step in the device tensor `step` (1,).

    On a GPU the rows are pinned host memory written by tiny kernels through the mapping, so the
    host reads a finished step's row with no copy and no stream wait; recorded inside a CUDA
    graph, each replay fills its own row. On a CPU device the calls run eagerly: timestamps are
    the host monotonic clock, values are read at once.
    """

    def __init__(self, steps: int, width: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.width = width
        self.rows = torch.zeros((max(steps, 1), width), dtype=torch.int64, pin_memory=self.cuda)
        self.device_rows = _mapped(self.rows, device) if self.cuda else self.rows
        self.timer = not self.cuda or _timer_works(device)

    def stamp(self, step: torch.Tensor, index: int) -> None:
        if not self.cuda:
            self.rows[int(step), index] = time.monotonic_ns()
        elif self.timer:  # (without a GPU timer the row keeps zeros: phases then have no length)
            _TRITON["stamp"][(1,)](self.device_rows, step, index, self.width, num_warps=1)

    def value(self, step: torch.Tensor, index: int, value: torch.Tensor) -> None:
        if not self.cuda:
            self.rows[int(step), index] = int(value)
        elif self.timer:
            _TRITON["value"][(1,)](self.device_rows, step, index, self.width, value, num_warps=1)
        else:
            self.device_rows.view(-1).index_copy_(0, step * self.width + index, value.view(1).to(torch.int64))

    def row(self, step: int) -> list[int]:
        """A finished step's row (the caller knows the step is over)."""
        return self.rows[step].tolist()


_TIMER_WORKS: dict[str, bool] = {}


def _timer_works(device: torch.device) -> bool:
    """Whether the Triton kernels that stamp the GPU timer build and run here (checked once)."""
    key = str(device)
    if key not in _TIMER_WORKS:
        try:
            if not _triton_available():
                raise RuntimeError("no Triton")
            probe = torch.zeros((1, 2), dtype=torch.int64, device=device)
            step = torch.zeros(1, dtype=torch.long, device=device)
            _TRITON["stamp"][(1,)](probe, step, 0, 2, num_warps=1)
            _TRITON["stamp"][(1,)](probe, step, 1, 2, num_warps=1)
            first, second = probe[0].tolist()
            _TIMER_WORKS[key] = 0 < first <= second
        except Exception as exc:  # noqa: BLE001
            _TRITON["timer_error"] = f"{type(exc).__name__}: {exc}"
            _TIMER_WORKS[key] = False
    return _TIMER_WORKS[key]


def side_streams(device: torch.device) -> tuple[Any, Any]:
    """(copy stream, high-priority speculation stream) on CUDA; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    # A priority beyond the device's range maps to its highest (torch.cuda.Stream's contract).
    return torch.cuda.Stream(device), torch.cuda.Stream(device, priority=-100)
