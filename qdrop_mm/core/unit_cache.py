"""Cached FP inputs, quantized inputs and FP targets of one reconstruction unit, under a memory budget.

Entries (one per calibration batch) are stored in ``CachePolicy.dtype``
(float32 keeps them exact; float16/bfloat16 halve the bytes) on the unit's
device while the device budget lasts, then in host memory while the host
budget lasts, then spilled to files in ``spill_dir`` and memory-mapped back
with a one-entry prefetch. A cache is freed (files included) by ``close``,
so peak memory does not grow from unit to unit.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .capture import NO_ARGS, CallArgs

GiB = 2 ** 30
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


@dataclass(frozen=True)
class CachePolicy:
    """Where and how unit inputs/targets are kept. Budgets are bytes for the whole cache."""

    dtype: str = 'float32'
    device_budget: int = 0
    host_budget: int = 16 * GiB
    spill_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f'cache dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}')
        if self.device_budget < 0 or self.host_budget < 0:
            raise ValueError('cache budgets must be >= 0 bytes')


class CacheBudgetError(MemoryError):
    """The cache needs more memory than the budgets allow and no spill_dir is set."""


class _Tiers:
    """Shared byte counters deciding where the next entry goes."""

    def __init__(self, policy: CachePolicy, device: torch.device) -> None:
        self.policy = policy
        self.device = device
        self.used = {'device': 0, 'host': 0, 'disk': 0}
        self.peak_in_memory = 0
        self._spill_dir: Optional[str] = None

    def place(self, nbytes: int) -> str:
        p = self.policy
        if self.device.type != 'cpu' and self.used['device'] + nbytes <= p.device_budget:
            tier = 'device'
        elif self.used['host'] + nbytes <= p.host_budget:
            tier = 'host'
        elif p.spill_dir is not None:
            tier = 'disk'
        else:
            raise CacheBudgetError(f'unit cache needs more than {p.host_budget / GiB:.2f} GiB of host memory; '
                                   'raise the host budget or set a spill directory')
        self.used[tier] += nbytes
        self.peak_in_memory = max(self.peak_in_memory, self.used['device'] + self.used['host'])
        return tier

    def spill_path(self, name: str) -> str:
        if self._spill_dir is None:
            os.makedirs(self.policy.spill_dir, exist_ok=True)
            self._spill_dir = tempfile.mkdtemp(prefix='unit-cache-', dir=self.policy.spill_dir)
        return os.path.join(self._spill_dir, name)

    def cleanup(self) -> None:
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None


class TensorStore:
    """An append-only list of tensors kept on device, host or disk as the budget allows."""

    def __init__(self, name: str, tiers: _Tiers) -> None:
        self.name = name
        self.tiers = tiers
        self._items: List[Tuple[str, object]] = []  # (tier, tensor or spill path)

    def __len__(self) -> int:
        return len(self._items)

    def append(self, t: Tensor) -> None:
        dtype = DTYPES[self.tiers.policy.dtype] if t.is_floating_point() else t.dtype
        t = t.detach().to(dtype)
        tier = self.tiers.place(t.numel() * t.element_size())
        if tier == 'device':
            item: object = t.to(self.tiers.device)
        elif tier == 'host':
            item = t.cpu()
            if self.tiers.device.type == 'cuda':
                item = item.pin_memory()  # host-to-device copies then run asynchronously
        else:
            path = self.tiers.spill_path(f'{self.name}-{len(self._items)}.pt')
            torch.save(t.cpu().contiguous(), path)
            item = path
        self._items.append((tier, item))

    def load(self, i: int) -> Tensor:
        tier, item = self._items[i]
        if tier == 'disk':
            return torch.load(item, map_location='cpu', weights_only=True, mmap=True)
        return item

    def get(self, i: int, device: torch.device) -> Tensor:
        return self.load(i).to(device, torch.float32, non_blocking=True)

    def in_memory(self) -> bool:
        return all(tier != 'disk' for tier, _ in self._items)

    def on_device(self) -> bool:
        return all(tier == 'device' for tier, _ in self._items)

    def stack(self) -> Tensor:
        """All entries as one tensor along dim 0; the entries become views of it, so memory is not doubled."""
        stacked = torch.cat([item for _, item in self._items])
        views = stacked.split([item.shape[0] for _, item in self._items])
        self._items = [(tier, view) for (tier, _), view in zip(self._items, views)]
        return stacked

    def shapes(self) -> set:
        return {tuple(self.load(i).shape) for i in range(len(self))} if self.in_memory() else {None}


class Entry(NamedTuple):
    """One cached batch of a unit: FP input, quantized-path input, FP target, and the unit's other call
    arguments (``call(unit, x)`` runs the unit as the network did)."""

    x_fp: Tensor
    x_q: Tensor
    target: Tensor
    call: CallArgs = NO_ARGS


class UnitCache:
    """Per calibration batch: x_fp, x_q, target and the call's other arguments (see the module docstring
    for storage).

    When every entry has the same shape and sits where training runs (on the
    device, or anywhere in memory on a CPU run), the cache is sampled row-wise
    with replacement (classification protocol, any batch size); otherwise one
    whole entry is drawn per iteration (detection: images of different sizes,
    or a cache that spills off the device). The next index is drawn one call
    ahead, so the next entry is already being copied (pinned host memory, on a
    side CUDA stream) or read from disk while the current one trains.
    """

    def __init__(self, policy: Optional[CachePolicy] = None, device: torch.device = torch.device('cpu')) -> None:
        self.policy = policy or CachePolicy()
        self.tiers = _Tiers(self.policy, device)
        self.x_fp = TensorStore('x_fp', self.tiers)
        self.x_q = TensorStore('x_q', self.tiers)
        self.target = TensorStore('target', self.tiers)
        self.call_args: List[CallArgs] = []
        self._stacked: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._next: Optional[Tuple[int, Future]] = None
        self._pending: Optional[int] = None
        self._copy_stream = None
        self._next_copy: Optional[Tuple[int, Entry, object]] = None

    @classmethod
    def from_tensors(cls, x_fp: List[Tensor], x_q: List[Tensor], target: List[Tensor],
                     policy: Optional[CachePolicy] = None) -> 'UnitCache':
        cache = cls(policy)
        for a, b, c in zip(x_fp, x_q, target):
            cache.x_fp.append(a)
            cache.x_q.append(b)
            cache.target.append(c)
            cache.call_args.append(NO_ARGS)
        cache.finalize()
        return cache

    def finalize(self) -> None:
        """Check consistency and prepare sampling; call once all entries are added."""
        if not (len(self.x_fp) == len(self.x_q) == len(self.target) == len(self.call_args)) or not len(self.x_fp):
            raise ValueError('x_fp, x_q, target and call_args must be non-empty and of equal length')
        stores = (self.x_fp, self.x_q, self.target)
        local = all(s.on_device() for s in stores) or (
            self.tiers.device.type == 'cpu' and all(s.in_memory() for s in stores))
        same_call = all(c == self.call_args[0] for c in self.call_args)
        if local and same_call and len(self.x_fp.shapes()) == 1 and len(self.target.shapes()) == 1:
            self._stacked = tuple(s.stack() for s in stores)

    def __len__(self) -> int:
        return len(self.x_fp)

    def num_bytes(self) -> int:
        return sum(self.tiers.used.values())

    def usage(self) -> Dict[str, int]:
        return dict(self.tiers.used, peak_in_memory=self.tiers.peak_in_memory)

    def entry(self, i: int, device: torch.device) -> Entry:
        return Entry(self.x_fp.get(i, device), self.x_q.get(i, device), self.target.get(i, device), self.call_args[i])

    def sample(self, batch_size: Optional[int], device: torch.device) -> Entry:
        """One training batch on ``device``, tensors always float32."""
        if self._stacked is not None and batch_size is not None:
            rows = self._stacked[0]
            idx = torch.randint(0, rows.shape[0], (batch_size,), device=rows.device)
            # index_select: one copy of the rows (t[idx] takes the slower advanced-indexing path, 8x on CPU)
            return Entry(*(t.index_select(0, idx).to(device, torch.float32, non_blocking=True)
                           for t in self._stacked), self.call_args[0])
        if self._pending is None:
            self._pending = self._draw()
        i, self._pending = self._pending, self._draw()
        if self.x_fp.in_memory():
            if device.type == 'cuda' and not self.x_fp.on_device():
                return self._copied_ahead(i, device)
            return self.entry(i, device)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1)
        current = self._next if self._next is not None and self._next[0] == i else \
            (i, self._pool.submit(self.entry, i, torch.device('cpu')))
        self._next = (self._pending, self._pool.submit(self.entry, self._pending, torch.device('cpu')))
        got = current[1].result()
        return Entry(got.x_fp.to(device), got.x_q.to(device), got.target.to(device), got.call)

    def _copied_ahead(self, i: int, device: torch.device) -> Entry:
        """Entry i from pinned host memory, copied on a side stream; the next entry's copy starts now."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        current = self._next_copy if self._next_copy is not None and self._next_copy[0] == i else \
            self._start_copy(i, device)
        self._next_copy = self._start_copy(self._pending, device)
        compute = torch.cuda.current_stream(device)
        compute.wait_event(current[2])
        for t in current[1][:3]:
            t.record_stream(compute)
        return current[1]

    def _start_copy(self, i: int, device: torch.device) -> Tuple[int, Entry, object]:
        with torch.cuda.stream(self._copy_stream):
            tensors = self.entry(i, device)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return i, tensors, event

    def _draw(self) -> int:
        return int(torch.randint(0, len(self), ()).item())

    def close(self) -> None:
        """Free memory and delete spilled files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._next = self._next_copy = self._stacked = None
        for s in (self.x_fp, self.x_q, self.target):
            s._items.clear()
        self.call_args.clear()
        self.tiers.cleanup()
