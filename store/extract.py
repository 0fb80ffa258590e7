"""Activation extraction: a model's layer outputs over a dataset, into a zarr activation store, resumable and DDP-ready.

    >>> from store.extract import extract, ExtractConfig
    >>> m = training.load_model("models:/conceptlens-demo@champion", settings=settings)
    >>> r = extract(m.module, meta=m.meta, manifest=settings.manifest_path("demo"), url=settings.store_url("demo"))
    >>> r.blocks_written, r.reused                     # a complete store for the same model and data is reused

    $ python -m store extract --model models:/conceptlens-demo@champion --data demo --out demo [--devices 2]

Lightning's predict loop drives the forward passes (its progress bar shows them; `devices=2` runs DDP on gloo). Images
are handed out in blocks of `block` consecutive images (the chunk length of every per-image array): each rank gets a
contiguous run of whole blocks, so two writers never touch the same chunk. Batches never straddle a block, so the
same image always sees the same batch, whatever the number of ranks or restarts: stores are identical array by
array. On a CPU each process runs one forward worker per core (`ExtractConfig.workers`): whole batches side by side,
each single-threaded, and the worker that finishes a block writes it (its chunks compressed, checksummed and stored,
its maps counted for the quantiles) while the others compute; the next patches are read in a background thread.
With one forward worker (an accelerator, or `workers=1`) a finished block is written between forward passes, or,
with `background_writes` (the default on accelerators), by writer threads while the next batches are computed. A
finished block is then recorded in the store's `progress` array; a killed run skips recorded blocks when it is run
again. When every block is recorded, rank 0 computes the per-unit quantiles and top-k and marks the store complete —
from the histograms and top-k fed with each block as it was written (summed over the DDP ranks), so that only blocks
written by an earlier, killed run are read back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from explain.hooks import resolve_layers

from .activations import (
    FORMAT_VERSION,
    QUANTILE_LEVELS,
    ActivationStore,
    StoreLayout,
    create_store,
    open_store,
    store_exists,
)
from .errors import ActivationStoreError, ImageError, StoreMismatchError
from .manifest import Manifest, read_manifest
from .stats import Float16Histogram, TopK

__all__ = ["ExtractConfig", "ExtractResult", "extract", "main", "load_patch", "layer_shapes", "rank_blocks"]


_BACKGROUND_WRITERS = 4  # most blocks written at once by background writes (at most one per core)
_STRIPE_UNITS = 64  # units counted together in a histogram (one lock each)


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract. A store being resumed keeps its own block, k, levels and batch size."""

    layers: tuple[str, ...] | None = None  # dotted layer names; None → meta["layers"]
    batch_size: int = 32
    block: int = 32  # images per aligned write block; batches never straddle a block
    k: int = 16
    levels: tuple[float, ...] = QUANTILE_LEVELS
    devices: int = 1  # > 1: DDP, one process per device (gloo on CPU)
    accelerator: str = "cpu"  # Lightning accelerator: "cpu", "gpu" or "auto"
    num_workers: int = 0  # DataLoader workers reading patches
    progress_bar: bool = True
    replace: bool = False  # delete an existing store made from another model or dataset instead of refusing
    workers: int | None = None  # forward workers per process, each running whole batches with its own share of the
    #                             torch threads and writing the blocks it finishes; None: one per core on a CPU (a
    #                             small model keeps the cores busier that way than with intra-op threads), 1 otherwise
    threads: int | None = None  # torch intra-op threads per process; None: the process's cores ÷ workers
    background_writes: bool | None = None  # with one forward worker, write finished blocks on writer threads while
    #                                        the next batches are computed; None: on for accelerators (a GPU would
    #                                        wait for every block's compression otherwise), off on a CPU (writing
    #                                        between forward passes gives it every core)
    ddp_timeout_s: float = 600.0  # a rank waits at most this long for the others (their shares differ by <= 1 block)
    histogram_mb: int = 512  # memory for counting quantiles while writing (units × 256 KiB per layer); the rest of
    #                          the layers are read back from the store after extraction
    tf32: bool = False  # let an NVIDIA GPU run convolutions and matrix products in TF32 (torch's default for
    #                     convolutions): maps then differ from float32 by up to 1e-3 of their range and 3–7 % of the
    #                     top-k swap at ties (lent H100), for faster forward passes that extraction does not need — it
    #                     is bound by storing. Off: a GPU store equals the CPU's within float16 rounding
    storage_options: dict = field(default_factory=dict)  # fsspec options for s3:// etc. (endpoint_url, key, …)


@dataclass(frozen=True)
class ExtractResult:
    url: str
    n_images: int
    blocks_total: int
    blocks_written: int  # by this process (rank 0 in DDP reports its own)
    reused: bool  # the store was already complete for this model and dataset
    seconds: float


# -- data -------------------------------------------------------------------------------------------------------------
def load_patch(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """uint8 (y, x) network-input patch, read exactly as training reads it (training.datamodule.load_patch).

    A patch of another size than the model's input is refused (ImageError naming the file): nothing is resized
    behind the user's back.
    """
    from training.datamodule import load_patch as read_training_patch

    arr = read_training_patch(Path(path))
    if arr.shape != tuple(size):
        raise ImageError(path, f"patch is {arr.shape[0]}×{arr.shape[1]} px, the model's input is {size[0]}×{size[1]}")
    return arr


class _PatchBatches(torch.utils.data.Dataset):
    """dataset[batch] → (image indices int64 (batch,), patches uint8 (batch, y, x)) for a list of image indices.

    With `order` (the batches in the order they will be asked for), patches are read `ahead` batches at a time:
    by one background thread that keeps them in flight while the forward passes run (PNG decoding releases the GIL),
    or, given an `executor`, all at once on its threads when the first of them is asked for — between forward passes,
    so that reading never competes with them for the cores.
    """

    def __init__(self, paths: list[Path], size: tuple[int, int], *, order: list[list[int]] | None = None,
                 ahead: int = 2, executor: ThreadPoolExecutor | None = None):
        self.paths, self.size = paths, size
        self.order = [tuple(b) for b in order] if order is not None else None
        self.ahead, self.next = max(1, ahead), 0
        self.pending: dict[tuple[int, ...], Future] = {}
        self.executor = executor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patch-reader") \
            if order and executor is None else None

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, batch: tuple[int, ...]):
        images = np.stack([load_patch(self.paths[i], self.size) for i in batch])  # (batch, y, x)
        return torch.as_tensor(batch, dtype=torch.int64), torch.from_numpy(images)

    def prefetch(self) -> None:
        """With an executor: queue the reads of the next `ahead` batches on it (extraction calls this just before
        writing a block, so that reading the next block and writing this one share the cores between forward passes)."""
        if self.executor is not None and self.order is not None and not self.pending:
            for batch in self.order[self.next:self.next + self.ahead]:
                self.pending[batch] = self.executor.submit(self._read, batch)
                self.next += 1

    def _fill(self) -> None:
        if self.executor is not None:
            self.prefetch()
            return
        while self.next < len(self.order) and len(self.pending) < self.ahead:
            batch = self.order[self.next]
            self.pending[batch] = self.pool.submit(self._read, batch)
            self.next += 1

    def __getitem__(self, batch):
        key = tuple(int(i) for i in batch)
        if self.order is None:
            return self._read(key)
        self._fill()
        future = self.pending.pop(key, None)
        self._fill()
        return future.result() if future is not None else self._read(key)

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class _BlockBatches(torch.utils.data.Sampler):
    """Batches of image indices that cover the given blocks in order and never straddle a block boundary."""

    def __init__(self, blocks: list[int], *, block: int, n_images: int, batch_size: int):
        self.batches = []
        for b in blocks:
            start, stop = b * block, min((b + 1) * block, n_images)
            self.batches += [list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rank_blocks(todo: list[int], rank: int, world: int) -> list[int]:
    """The contiguous share of the blocks still to do that one rank writes (ranks 0 … world-1 cover all of them)."""
    n = len(todo)
    return todo[rank * n // world:(rank + 1) * n // world]


def layer_shapes(net: nn.Module, layers: list[str], input_size: tuple[int, int],
                 transform: dict) -> tuple[dict[str, tuple[int, int, int]], int]:
    """(unit, y, x) of each layer's output and the number of model outputs, from one forward pass of a blank patch."""
    from explain.hooks import Trace
    from training.transforms import preprocess

    x = preprocess(np.zeros((1, *input_size), np.uint8), transform)  # (1, 1, y, x)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    with torch.inference_mode(), Trace(net, layers) as t:
        x = x.to(device)
        out = net(x)
    shapes = {}
    for name in layers:
        a = t.outputs[name]
        if a.ndim == 2:
            a = a[:, :, None, None]
        if a.ndim != 4:
            raise ValueError(f"layer {name!r} outputs shape {tuple(a.shape)}; expected (batch, unit, y, x) or "
                             f"(batch, unit)")
        shapes[name] = tuple(int(s) for s in a.shape[1:])
    return shapes, int(out.shape[1])


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """(batch, class) probabilities: softmax, or [1-p, p] for a single-logit model."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return logits.softmax(dim=1)


def _copy(source: torch.Tensor, target: np.ndarray, *, queue: bool = False) -> None:
    """source → the numpy array `target` (same shape; a float32 source into float16 is rounded as Tensor.half()
    rounds). `queue` (a CUDA source, `target` page-locked): the copy is only queued, and whoever reads `target` first
    waits for an event recorded after it (`_Job._write`)."""
    torch.from_numpy(target).copy_(source, non_blocking=queue)


def _layer_to_block(a: torch.Tensor, out: dict, rows: slice, *, on_device: bool | None = None,
                    queue: bool = False) -> None:
    """One layer's output for a batch, (batch, unit, y, x) or (batch, unit), into its block's buffers at `rows`: the
    maps as float16, each unit's max and mean as float32.

    On the CPU they are written straight into the buffers (row slices of C-contiguous arrays), no temporaries. An
    output on an accelerator (`on_device`, by default where the tensor is) is rounded to float16 (the same rounding) and
    pooled there, so that half the bytes cross to the host and the host has no conversion to do (on a lent H100 the
    copy of float32 maps and their conversion took 60 % of the predict loop's time at VGG16 scale); `queue`: see
    `_copy`."""
    a = (a[:, :, None, None] if a.ndim == 2 else a).float()
    if on_device is None:
        on_device = a.device.type != "cpu"
    if on_device:
        _copy(a.half(), out["maps"][rows], queue=queue)
        _copy(torch.amax(a, dim=(2, 3)), out["max"][rows], queue=queue)
        _copy(torch.mean(a, dim=(2, 3)), out["mean"][rows], queue=queue)
        return
    torch.from_numpy(out["maps"][rows]).copy_(a)  # float32 → float16, rounded as Tensor.half() rounds
    torch.amax(a, dim=(2, 3), out=torch.from_numpy(out["max"][rows]))
    torch.mean(a, dim=(2, 3), out=torch.from_numpy(out["mean"][rows]))


# -- the job each process runs --------------------------------------------------------------------------------------
class _BlockWriter:
    """Writes finished blocks: compresses, checksums and stores their chunks, counts their maps in the histograms and
    their pooled maxima in the top-k (so that finalizing reads neither back).

    Called by whichever thread finished a block (the predict loop's, or a forward worker's); two blocks may be written
    at once. Each layer's top-k takes one block at a time (a lock per layer), its histogram one block per stripe of
    `_STRIPE_UNITS` units (a lock per stripe: with a lock per layer, every writer of a GPU host waited for the others
    to count the largest layer). A block's chunks land before its completion flag. `workers` > 1 lets a write spread
    one block's compression and counting over that many threads (all GIL-free C code) — when the process's cores are
    otherwise idle while it writes: with one forward worker, and with several for a block completed when no other
    batch is being computed (the end of a run: the VGG16-scale bench, one block written after all its forward passes,
    went 0.84× → 0.90× of the forward passes' throughput in the same run; before the end, the other workers' forward
    passes keep the cores busy and helpers only competed with them: 0.58× instead of 0.62× for the demo model).
    """

    def __init__(self, store: ActivationStore, histograms: dict[str, Float16Histogram], *, workers: int = 1):
        self.store = store
        self.histograms = histograms
        k = int(store.attrs["k"])
        self.tops = {name: TopK(store.layer_shape(name)[0], k) for name in store.layers}
        self.locks = {name: threading.Lock() for name in self.tops}
        # the histograms are counted in stripes of units, each with its lock: blocks written at once count the same
        # layer side by side, and a block spread over the helpers counts its largest layer on several of them
        self.stripes = {name: [(slice(lo, lo + _STRIPE_UNITS), threading.Lock())
                               for lo in range(0, h.units, _STRIPE_UNITS)] for name, h in histograms.items()}
        self.covered: set[int] = set()  # blocks counted in the histograms and top-k
        self.helpers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-encode") \
            if workers > 1 else None
        self.written = 0
        self._count = threading.Lock()

    def _top(self, name: str, start: int, layer: dict) -> None:
        with self.locks[name]:
            self.tops[name].add(layer["max"], start=start)  # (image, unit) float32, as stored

    def _histogram(self, name: str, units: slice, lock: threading.Lock, layer: dict) -> None:
        with lock:
            self.histograms[name].add(layer["maps"], units)  # (image, unit, y, x) float16, as stored

    def write(self, block: int, data: dict, *, spread: bool = True) -> None:
        """Write one block; `spread`: over the helper threads (when the process's other cores would be idle)."""
        start = self.store.block_range(block)[0]
        helpers = self.helpers if spread else None
        layers = data["layers"]
        work = [(self._histogram, name, units, lock, layers[name]) for name, stripes in self.stripes.items()
                for units, lock in stripes]
        work += [(self._top, name, start, layers[name]) for name in self.tops]
        counting = [helpers.submit(*w) for w in work] if helpers else []
        self.store.write_block(block, **data, executor=helpers)
        if helpers is None:
            for fn, *args in work:
                fn(*args)
        for job in counting:
            job.result()
        with self._count:
            self.covered.add(block)
            self.written += 1

    def close(self) -> None:
        if self.helpers is not None:
            self.helpers.shutdown(wait=True)


class _Workers:
    """`workers` threads running `work(item)` on the items the predict loop's thread submits. Two uses: the forward
    workers (each item a batch, run single-threaded, filling the block buffers and writing the blocks they finish),
    and the background writer of a one-worker process (one thread, each item a finished block to write).

    On a CPU, a small model's convolutions split over the cores (torch's intra-op threads) wait for each other at
    every layer; whole batches side by side keep every core busy, and a block written by one worker overlaps the
    forward passes of the others. At most `workers + 1` items are in flight, so memory stays bounded. A failure in
    a worker is raised by the next `submit` (or by `close`) in the predict loop's thread.
    """

    def __init__(self, workers: int, work, *, name: str = "forward"):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self.slots = threading.Semaphore(workers + 1)
        self.work = work
        self.futures: list[Future] = []
        self.failed = threading.Event()  # after a failure no new batch starts: no block completes after the error

    def _check(self) -> None:
        for f in [f for f in self.futures if f.done()]:
            self.futures.remove(f)
            f.result()

    def submit(self, batch) -> None:
        self._check()
        self.slots.acquire()

        def run():
            try:
                if self.failed.is_set():
                    return
                with torch.inference_mode():  # grad mode is per thread: the predict loop's does not reach here
                    self.work(batch)
            except BaseException:
                self.failed.set()
                raise
            finally:
                self.slots.release()

        self.futures.append(self.pool.submit(run))

    def close(self) -> None:
        """Wait for every batch handed out (its block lands when it was the last of it), then raise the first error."""
        try:
            for f in self.futures:
                f.result()
        finally:
            self.futures.clear()
            self.pool.shutdown(wait=True)


class _Job:
    """Everything one process needs: the Lightning module calls prepare / dataloader / step, `_predict` finish."""

    def __init__(self, *, url: str, attrs: dict, layout: StoreLayout, paths: list[Path], labels: list[int],
                 transform: dict, config: ExtractConfig, new: bool = False):
        self.url, self.attrs, self.layout, self.paths, self.labels = url, attrs, layout, paths, labels
        self.transform, self.config = transform, config
        self.new = new  # no store was there when this run began: no block is done, none need be read
        self.layers = list(layout.layers)
        self.batch_size = int(attrs["batch_size"])
        self.store: ActivationStore | None = None
        self.writer: _BlockWriter | None = None
        self.patches: _PatchBatches | None = None
        self.forwards: _Workers | None = None
        self.writes: _Workers | None = None  # the background writer (one forward worker, background_writes)
        self.trace = None
        self.mine: list[int] = []
        self.todo: list[int] = []
        self.buffers: dict[int, dict] = {}
        self.filled: dict[int, int] = {}
        self.spare: list[dict] = []  # whole-block buffers whose block was written, for the next blocks
        self.owner: dict[int, dict] = {}  # block → the whole-block buffer its (possibly shorter) buffer is a view of
        self.pinned = False  # new block buffers page-locked: maps copied from a CUDA device without waiting
        self.buffer_lock = threading.Lock()
        self.computing = 0  # batches handed to the forward workers whose forward pass has not finished
        self.rank, self.world = 0, 1

    def prepare(self, net: nn.Module, rank: int, world: int, barrier) -> None:
        from explain.hooks import Trace

        self.rank, self.world = rank, world
        # here, not earlier: Lightning's DDP launcher sets its own thread count when it starts the processes
        cores = _cores_per_process(world)
        accelerator = self.config.accelerator
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                          and not torch.backends.mps.is_available())
        workers = self.config.workers or (cores if on_cpu else 1)
        self.pinned = not on_cpu and torch.cuda.is_available()
        torch.set_num_threads(self.config.threads or max(1, cores // workers))
        opts = self.config.storage_options
        if rank == 0:
            self.store = create_store(self.url, attrs=self.attrs, layout=self.layout, exist_ok=True,
                                      storage_options=opts)
        barrier("conceptlens-store-created")
        if rank != 0:
            self.store = open_store(self.url, read_only=False, allow_incomplete=True, storage_options=opts)
        done = np.zeros(self.layout.n_blocks, bool) if self.new else self.store.completed_blocks()
        todo = [int(b) for b in np.flatnonzero(~done)]
        self.todo = todo
        self.mine = rank_blocks(todo, rank, world)
        budget, histograms = self.config.histogram_mb << 20, {}
        for name, (units, _, _) in self.layout.layers.items():
            if Float16Histogram.nbytes_for(units) <= budget:  # the same choice on every rank
                histograms[name] = Float16Histogram(units)
                budget -= Float16Histogram.nbytes_for(units)
        # one worker: the process's cores compress and count each block between forward passes; several: each
        # worker writes its own blocks while the others compute, over every core once nothing else is computed
        self.writer = _BlockWriter(self.store, histograms, workers=cores)
        self.trace = Trace(net, self.layers, clone=False, per_thread=workers > 1).__enter__()  # left in finish/abort
        if workers > 1:
            self.forwards = _Workers(workers, self._forward)
        elif self.config.background_writes or (self.config.background_writes is None and not on_cpu):
            # several blocks at once: one block's largest shard is compressed by one thread, so a single writer
            # thread left most of an accelerator host's cores idle; at most writers + 1 blocks wait
            writers = max(1, min(_BACKGROUND_WRITERS, cores))
            self.writes = _Workers(writers, lambda item: self._write(*item), name="store-writer")

    def dataloader(self) -> torch.utils.data.DataLoader:
        sampler = _BlockBatches(self.mine, block=self.layout.block, n_images=self.layout.n_images,
                                batch_size=self.batch_size)
        threaded = self.config.num_workers == 0  # worker processes read ahead by themselves
        per_block = -(-self.layout.block // self.batch_size)
        # one forward worker: read between forward passes, in parallel; several: a background thread reads ahead
        helpers = self.writer.helpers if self.forwards is None else None
        self.patches = _PatchBatches(self.paths, self.layout.image_size, order=sampler.batches if threaded else None,
                                     ahead=per_block if helpers else 2 * per_block, executor=helpers)
        # batch_size=None: each sampler item is a whole batch of indices, read by one dataset call (no collation)
        return torch.utils.data.DataLoader(self.patches, sampler=sampler, batch_size=None,
                                           num_workers=self.config.num_workers, persistent_workers=False)

    def _allocate(self) -> dict:
        """Buffers for one whole block, uninitialized: every row is written before the block is. Page-locked when
        the maps come from a CUDA device: copies into them run at full speed and need not be waited for (ordinary
        memory, with a warning, on a host that cannot page-lock that much)."""
        n, (h, w) = self.layout.block, self.layout.image_size

        def arrays(empty) -> dict:
            return {"pinned": self.pinned,
                    "images": empty((n, h, w), np.uint8),  # (image, y, x)
                    "probs": empty((n, len(self.layout.classes)), np.float32),  # (image, class)
                    "layers": {name: {"maps": empty((n, u, y, x), np.float16),  # (image, unit, y, x)
                                      "max": empty((n, u), np.float32),  # (image, unit)
                                      "mean": empty((n, u), np.float32)}
                               for name, (u, y, x) in self.layout.layers.items()}}

        if self.pinned:
            try:
                return arrays(lambda shape, dtype: torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name),
                                                               pin_memory=True).numpy())
            except RuntimeError as e:
                warnings.warn(f"extraction: block buffers in ordinary memory, page-locking failed ({e})", stacklevel=2)
                self.pinned = False
        return arrays(np.empty)

    def _buffer(self, block: int) -> dict:
        """The buffers of a block being computed (called under buffer_lock). They are views of a whole-block buffer
        taken from the written blocks' spares, so memory is touched (and on a GPU host, page-locked) once per run
        rather than once per block."""
        if block not in self.buffers:
            start, stop = block * self.layout.block, min((block + 1) * self.layout.block, self.layout.n_images)
            n = stop - start
            whole = self.spare.pop() if self.spare else self._allocate()
            self.owner[block] = whole
            self.buffers[block] = {
                "images": whole["images"][:n],
                "labels": np.asarray(self.labels[start:stop], np.int64),  # (image,)
                "probs": whole["probs"][:n],
                "layers": {name: {key: a[:n] for key, a in arrays.items()} for name, arrays in whole["layers"].items()},
            }
            self.filled[block] = 0
        return self.buffers[block]

    def _write(self, block: int, buf: dict, ready=None, *, spread: bool = True) -> None:
        """Write a finished block (after `ready`, the CUDA event of its last copies, has passed); its buffer is then
        free for a later block."""
        if ready is not None:
            ready.synchronize()
        self.writer.write(block, buf, spread=spread)
        with self.buffer_lock:
            self.spare.append(self.owner.pop(block))

    def step(self, net: nn.Module, batch) -> None:
        """One batch from the predict loop: computed here (one worker) or handed to the forward workers."""
        if self.forwards is not None:
            with self.buffer_lock:
                self.computing += 1
            self.forwards.submit((net, batch))
        else:
            self._forward((net, batch))

    def _forward(self, item) -> None:
        from training.transforms import preprocess

        net, (index, images) = item  # (batch,), uint8 (batch, y, x)
        index = index.cpu().numpy()
        block = int(index[0]) // self.layout.block
        start = block * self.layout.block
        rows = slice(int(index[0]) - start, int(index[-1]) - start + 1)
        x = preprocess(images, self.transform)  # (batch, 1, y, x)
        logits = net(x)  # (batch, class); the trace keeps this thread's layer outputs
        outputs = self.trace.outputs
        with self.buffer_lock:
            buf = self._buffer(block)
            queue = self.owner[block]["pinned"]  # copies from the device into it are queued, not waited for
        buf["images"][rows] = images.cpu().numpy()
        _copy(_probs(logits), buf["probs"][rows], queue=queue)
        for name in self.layers:
            _layer_to_block(outputs[name], buf["layers"][name], rows, queue=queue)
        with self.buffer_lock:  # the batch that completes its block writes it
            self.filled[block] += len(index)
            complete = self.filled[block] == buf["images"].shape[0]
            if complete:
                del self.buffers[block], self.filled[block]
            if self.forwards is not None:
                self.computing -= 1
            idle = self.computing == 0  # no other batch is being computed or waits for a worker
        if complete:
            ready = None
            if queue:  # the writer waits for the copies, this thread goes on
                ready = torch.cuda.Event()
                ready.record()
            if self.patches is not None:
                self.patches.prefetch()
            if self.writes is not None:
                self.writes.submit((block, buf, ready))
            else:  # a forward worker spreads the block over the cores only when no forward pass would use them
                self._write(block, buf, ready, spread=idle)

    def _stop_workers(self) -> None:
        try:
            if self.forwards is not None:
                self.forwards.close()
        finally:
            self.forwards = None
            try:
                if self.writes is not None:  # the blocks handed to the background writer land (or fail) here
                    self.writes.close()
            finally:
                self.writes = None
                if self.trace is not None:
                    self.trace.close()

    def abort(self, error: BaseException) -> None:
        """After a failure: let the blocks already computed land (they are whole and correct)."""
        try:
            self._stop_workers()
        except Exception as w:  # noqa: BLE001 — reported on the error that is propagating
            error.add_note(f"also, a forward worker failed: {type(w).__name__}: {w}")
        if self.patches is not None:
            self.patches.close()
        if self.writer is not None:
            self.writer.close()

    def finish(self, barrier) -> None:
        try:
            self._stop_workers()  # the last batches' errors surface here
        except BaseException as e:
            self.abort(e)
            raise
        if self.buffers:
            raise ActivationStoreError(f"{self.url}: blocks {sorted(self.buffers)} were only partly computed")
        if self.patches is not None:
            self.patches.close()
        self.writer.close()
        barrier("conceptlens-blocks-written")
        histograms, tops, covered = self.writer.histograms, self.writer.tops, self.writer.covered
        if self.world > 1:
            covered = self._gather_counts(histograms, tops)
        if self.rank == 0:
            progress = None
            if self.config.progress_bar:
                from tqdm import tqdm

                bar = tqdm(total=1, desc="quantiles and top-k", unit="block", leave=False)

                def progress(done, total):
                    bar.total = total
                    bar.update(done - bar.n)
            try:
                self.store.finalize(histograms=histograms, tops=tops, covered=covered, progress=progress)
            finally:
                if progress:
                    bar.close()

    def _gather_counts(self, histograms: dict[str, Float16Histogram], tops: dict[str, TopK]) -> set[int]:
        """Sum every rank's histograms and merge their top-k on rank 0 (gloo reduce and gather); they then cover every
        block written in this run."""
        import torch.distributed as dist

        for top in tops.values():
            gathered = []
            for part in (top.indices, top.values):  # (unit, k) of every rank
                mine = torch.from_numpy(np.ascontiguousarray(part))
                every = [torch.empty_like(mine) for _ in range(self.world)]
                dist.all_gather(every, mine)
                gathered.append([t.numpy() for t in every])
            if self.rank == 0:
                merged = TopK(top.units, top.k)
                for indices, values in zip(*gathered):
                    merged.merge(TopK.of(indices, values))
                top.load_state_dict(merged.state_dict())

        for hist in histograms.values():
            counts = torch.from_numpy(hist.counts.astype(np.int64))  # (unit, key)
            n = torch.from_numpy(hist.n.copy())  # (unit,)
            dist.reduce(counts, dst=0, op=dist.ReduceOp.SUM)
            dist.reduce(n, dst=0, op=dist.ReduceOp.SUM)
            if self.rank == 0:
                hist.counts = counts.numpy().astype(np.uint32)
                hist.n = n.numpy()
        return set(self.todo)


def _lightning_module(net: nn.Module, job: _Job):
    import lightning as L

    class ExtractionModule(L.LightningModule):
        """Wraps the network for Trainer.predict: no outputs are returned, each batch goes to the store."""

        def __init__(self):
            super().__init__()
            self.net = net
            self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank whose blocks are all done

        def setup(self, stage: str) -> None:
            job.prepare(self.net, self.global_rank, self.trainer.world_size, self.trainer.strategy.barrier)

        def predict_dataloader(self):
            return job.dataloader()

        def predict_step(self, batch, batch_idx):
            job.step(self.net, batch)

    return ExtractionModule()


# -- the entry point --------------------------------------------------------------------------------------------------
def _cores_per_process(devices: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, devices))


def _meta_model(meta: dict) -> dict:
    return {k: (None if meta.get(k) is None else str(meta.get(k))) for k in ("model_uri", "run_id", "name", "version")}


def _delete_store(url: str, storage_options: dict) -> None:
    if "://" in url and not url.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        fs.rm(path, recursive=True)
    else:
        shutil.rmtree(url.removeprefix("file://"))


def extract(module: nn.Module, *, meta: dict, manifest: Manifest | str | Path, url: str,
            config: ExtractConfig | None = None) -> ExtractResult:
    """Extract `module`'s layer outputs for every image of `manifest` into the store at `url` (path or fsspec URL).

    meta: the LoadedModel meta (input_size, transform, layers, classes, model_uri, run_id, name, version).
    A complete store for the same model and dataset is reused as it is; an incomplete one is resumed; one made from
    another model or dataset raises StoreMismatchError unless config.replace.
    """
    config = config or ExtractConfig()
    threads_before = torch.get_num_threads()
    tf32_before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(config.tf32)
    try:
        return _extract(module, meta=meta, manifest=manifest, url=url, config=config)
    finally:  # the caller's process keeps its own settings
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32_before


def _extract(module: nn.Module, *, meta: dict, manifest, url: str, config: ExtractConfig) -> ExtractResult:
    t0 = time.perf_counter()
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    url = str(url)
    layers = list(config.layers or meta.get("layers") or [])
    if not layers:
        raise ValueError("extract: no layers given and meta has no 'layers'")
    resolve_layers(module, layers)  # an unknown layer name fails here, before any store is touched
    input_size = tuple(int(s) for s in meta["input_size"])
    transform = dict(meta["transform"])
    opts = dict(config.storage_options)
    block, k, levels, batch_size = config.block, config.k, tuple(config.levels), config.batch_size
    model_attrs = _meta_model(meta)

    new = not store_exists(url, storage_options=opts)
    if not new:
        try:
            existing = open_store(url, allow_incomplete=True, expect_model=model_attrs, expect_dataset=manifest,
                                  storage_options=opts)
            if existing.layers != layers:
                raise StoreMismatchError(f"{url}: store has layers {existing.layers}, not {layers}")
            version = existing.attrs.get("format_version")
            if not existing.complete and version != FORMAT_VERSION:  # complete ones are still read as they are
                raise StoreMismatchError(f"{url}: an unfinished store of format version {version} cannot be resumed "
                                         f"by this version ({FORMAT_VERSION}); add --replace to extract it anew")
        except StoreMismatchError:
            if not config.replace:
                raise
            _delete_store(url, opts)
            new = True
        else:
            if existing.complete:
                return ExtractResult(url, existing.n_images, existing.n_blocks, 0, True, time.perf_counter() - t0)
            a = existing.attrs  # resume with the store's own block structure and batches
            block, k, levels, batch_size = int(a["block"]), int(a["k"]), tuple(a["quantile_levels"]), int(
                a["batch_size"])

    module.eval()
    shapes, n_out = layer_shapes(module, layers, input_size, transform)
    classes = tuple(meta.get("classes") or (["negative", "positive"] if n_out == 1 else
                                            [str(i) for i in range(n_out)]))
    if len(classes) != max(n_out, 2):
        raise ValueError(f"meta classes {classes} do not match the model's {n_out} output(s)")
    layout = StoreLayout(image_ids=tuple(manifest.ids), image_size=input_size, classes=classes, layers=shapes,
                         block=block, k=k, levels=levels)
    attrs = {
        "model": model_attrs,
        "dataset": {"manifest": str(manifest.path), "sha256": manifest.sha256, "n_images": len(manifest)},
        "transform": transform,
        "batch_size": batch_size,
        "splits": [r.split for r in manifest.records],
    }
    job = _Job(url=url, attrs=attrs, layout=layout, paths=[r.image for r in manifest.records],
               labels=[int(r.label) for r in manifest.records], transform=transform,
               config=config, new=new)
    _predict(module, job, config)
    written = job.writer.written if job.writer else 0
    return ExtractResult(url, layout.n_images, layout.n_blocks, written, False, time.perf_counter() - t0)


def _predict(module: nn.Module, job: _Job, config: ExtractConfig) -> None:
    import datetime
    import logging

    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if config.devices > 1:
        backend = "gloo" if config.accelerator == "cpu" else None  # None: Lightning picks nccl for GPUs
        strategy: Any = DDPStrategy(process_group_backend=backend,
                                    timeout=datetime.timedelta(seconds=config.ddp_timeout_s))
    else:
        strategy = "auto"
    trainer = L.Trainer(accelerator=config.accelerator, devices=config.devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=config.progress_bar, use_distributed_sampler=False, num_nodes=1)
    with warnings.catch_warnings():
        # our batch sampler hands out whole blocks on purpose, and predict_step returns nothing on purpose
        warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        try:
            trainer.predict(_lightning_module(module, job), return_predictions=False)
        except BaseException as e:
            job.abort(e)
            raise
    # after predict, not in a hook: Lightning skips the predict hooks of a rank with no batches (all its blocks done)
    job.finish(trainer.strategy.barrier)


def main(argv: list[str] | None = None) -> int:
    """`python -m store extract`: resolve the model, the dataset and the store from the workspace, then extract."""
    from .settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m store extract", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, runs:/… "
                                                   "or a model directory")
    ap.add_argument("--data", default="demo", help="dataset name (demo) or manifest CSV path")
    ap.add_argument("--out", default="demo", help="store name (demo → <workspace>/stores/demo.zarr), path or URL")
    ap.add_argument("--layers", nargs="+", default=None, help="dotted layer names (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block", type=int, default=32, help="images per aligned write block")
    ap.add_argument("--k", type=int, default=16, help="top-k images kept per unit")
    ap.add_argument("--devices", type=int, default=1, help="> 1: DDP over that many processes (gloo on CPU)")
    ap.add_argument("--accelerator", default="cpu", help="cpu (default), gpu or auto")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="forward workers per process (default: one per core "
                                                             "on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--background-writes", action=argparse.BooleanOptionalAction, default=None,
                    help="with one forward worker, write finished blocks on writer threads while the next batches "
                         "are computed (default: on for accelerators, off on a CPU)")
    ap.add_argument("--tf32", action="store_true", help="let a GPU compute in TF32 (faster forward passes, maps "
                                                         "further from float32; off by default)")
    ap.add_argument("--replace", action="store_true", help="replace a store made from another model or dataset")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--workspace", default=None)
    args = ap.parse_args(argv)
    settings = load_settings(args.workspace)
    layers = None if args.layers is None else tuple(n for item in args.layers for n in item.split(",") if n)
    config = ExtractConfig(layers=layers, batch_size=args.batch_size, block=args.block, k=args.k,
                           devices=args.devices, accelerator=args.accelerator, num_workers=args.num_workers,
                           progress_bar=not args.no_progress,
                           replace=args.replace, workers=args.workers, threads=args.threads,
                           background_writes=args.background_writes, tf32=args.tf32)
    from explain.errors import ExplainError
    from training import TrainingError, load_model

    try:
        loaded = load_model(args.model, settings=settings)
        url = settings.store_url(args.out)
        result = extract(loaded.module, meta=loaded.meta, manifest=settings.manifest_path(args.data), url=url,
                         config=config)
    except (ActivationStoreError, ImageError, ValueError, TrainingError, ExplainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.reused:
        print(f"{result.url}: complete for this model and dataset ({result.n_images} images); nothing to do")
    else:
        print(f"{result.url}: {result.n_images} images, {result.blocks_written} of {result.blocks_total} blocks "
              f"written by this process in {result.seconds:.1f} s")
    return 0
