"""From planned batches to token arrays: shard reading, the objective, and the Ray Data pipeline.

    work = step_work(planned, rank, world_size)          # this rank's rows of a global batch
    arrays = materialise(spec, work)                     # local: int32 [rows, seq_len] arrays
    stream = RayStepStream(planner, spec, rank, world_size, prefetch_batches=4)
    item = stream.next()                                 # the same values, made ahead by Ray Data tasks

Both paths call `materialise`, so they produce identical values (the Ray path moves them in the
narrowest dtypes that hold them; the feed turns both into the same int64 tensors). In the Ray path a
background thread plans windows of upcoming steps; each window becomes a Ray Data dataset of step specs
(ray.data.from_items), one block per chunk of consecutive steps with the same seq_len, mapped by
`map_batches` tasks that read the token slices they need and apply the objective;
`iter_batches(prefetch_batches=...)` with preserve_order streams the results back while training runs.
Shards are read whole (only the `tokens` column, plus `prompt_length` if present) through the dataset's
filesystem (local or s3://) into a per-process LRU cache.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrainer.config import S3Config
from raytrainer.data.fs import Storage, open_storage
from raytrainer.data.manifest import PROMPT_LENGTH, DataError
from raytrainer.data.objectives import Objective
from raytrainer.data.packing import ARRAY_KEYS, ROW, DocLoader, build_rows, rank_rows
from raytrainer.data.plan import PlannedBatch, Planner

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class ReadSpec:
    """What a reading process needs (picklable, small)."""

    dataset: str
    s3: S3Config | None
    shard_paths: tuple[str, ...]  # manifest order; segments name shards by position
    objective: Objective
    vocab_size: int
    cache_bytes: int = DEFAULT_CACHE_BYTES


@dataclass(frozen=True)
class StepWork:
    """One rank's rows of one global batch: global rows [row_start, row_start + n_rows)."""

    batch: int
    seq_len: int
    row_start: int
    n_rows: int
    segments: np.ndarray  # int64 [n, 6], only these rows


@dataclass
class StepData:
    """A served step: the plan, this rank's rows as arrays (None: it has no rows), the cursor after it."""

    planned: PlannedBatch
    rows: tuple[int, int]
    arrays: dict[str, np.ndarray] | None
    cursor: dict


def step_work(planned: PlannedBatch, rank: int, world_size: int) -> StepWork | None:
    start, end = rank_rows(planned.n_rows, world_size, rank)
    if end == start:
        return None
    rows = planned.segments[:, ROW]
    segments = planned.segments[(rows >= start) & (rows < end)]
    return StepWork(planned.batch, planned.seq_len, start, end - start, segments)


# --------------------------------------------------------------------------- reading shards


@dataclass(frozen=True)
class ShardTokens:
    values: np.ndarray  # every token of the shard, uint16 or uint32
    offsets: np.ndarray  # int64 [num_docs + 1]
    prompt_length: np.ndarray | None  # int64 [num_docs] (0 where null) when the shard has the column

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes + (0 if self.prompt_length is None else
                                                           self.prompt_length.nbytes)


class ShardCache:
    """Whole shards' tokens, least recently used dropped first once over `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._shards: OrderedDict[tuple[str, str], ShardTokens] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0

    def get(self, storage: Storage, rel: str) -> ShardTokens:
        key = (storage.url, rel)
        with self._lock:
            hit = self._shards.get(key)
            if hit is not None:
                self._shards.move_to_end(key)
                return hit
        shard = read_shard(storage, rel)
        with self._lock:
            self.reads += 1
            self._shards[key] = shard
            total = sum(s.nbytes for s in self._shards.values())
            while total > self.max_bytes and len(self._shards) > 1:
                _, dropped = self._shards.popitem(last=False)
                total -= dropped.nbytes
        return shard


def read_shard(storage: Storage, rel: str) -> ShardTokens:
    where = storage.uri(rel)
    try:
        pf = pq.ParquetFile(storage.fs.open_input_file(storage.path(rel)))
        columns = ["tokens"] + ([PROMPT_LENGTH] if PROMPT_LENGTH in pf.schema_arrow.names else [])
        table = pf.read(columns=columns)
    except FileNotFoundError:
        raise DataError(f"shard {where}: not found (it was indexed when training started); restore it or "
                        "prepare the dataset again") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"shard {where}: cannot read its tokens ({type(e).__name__}: {e}); check it with "
                        "raytrainer.data.validate, re-run jobs/prepare_data.py") from None
    tokens = table.column("tokens").combine_chunks()
    if isinstance(tokens, pa.ChunkedArray):  # an empty table keeps zero chunks
        tokens = pa.concat_arrays(tokens.chunks) if tokens.num_chunks else pa.array([], tokens.type)
    prompt = None
    if PROMPT_LENGTH in table.column_names:
        prompt = table.column(PROMPT_LENGTH).fill_null(0).to_numpy().astype(np.int64)
    return ShardTokens(values=tokens.values.to_numpy(), offsets=tokens.offsets.to_numpy().astype(np.int64),
                       prompt_length=prompt)


_PROCESS_CACHE: ShardCache | None = None
_STORAGES: dict[tuple[str, str], Storage] = {}


def process_cache(max_bytes: int = DEFAULT_CACHE_BYTES) -> ShardCache:
    """The shard cache of this process (shared by every feed and every Ray task it runs)."""
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None:
        _PROCESS_CACHE = ShardCache(max_bytes)
    return _PROCESS_CACHE


def _storage(dataset: str, s3: S3Config | None) -> Storage:
    key = (dataset, s3.model_dump_json() if s3 is not None else "")
    if key not in _STORAGES:
        _STORAGES[key] = open_storage(dataset, s3)
    return _STORAGES[key]


def doc_loader(spec: ReadSpec) -> DocLoader:
    storage = _storage(spec.dataset, spec.s3)
    cache = process_cache(spec.cache_bytes)

    def load(doc: int, shard: int, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        tokens = cache.get(storage, spec.shard_paths[shard])
        if row + 1 >= len(tokens.offsets):
            raise DataError(f"shard {storage.uri(spec.shard_paths[shard])} has {len(tokens.offsets) - 1} "
                            f"documents, but the plan needs row {row}; was it rewritten after indexing?")
        ids = tokens.values[tokens.offsets[row]: tokens.offsets[row + 1]]
        prompt = None if tokens.prompt_length is None else int(tokens.prompt_length[row])
        return spec.objective.document(doc, ids, prompt)

    return load


def materialise(spec: ReadSpec, work: StepWork, out: dict[str, np.ndarray] | None = None,
                load: DocLoader | None = None) -> dict[str, np.ndarray]:
    """Token arrays ([n_rows, seq_len]; int32, or written into `out`) of one rank's rows of one global batch."""
    return build_rows(work.segments, work.seq_len, work.row_start, work.n_rows, load or doc_loader(spec),
                      spec.objective, work.batch, out=out)


# --------------------------------------------------------------------------- the Ray Data pipeline


def block_dtypes(vocab_size: int, seq_len: int) -> dict[str, type]:
    """The narrowest dtypes a block's arrays travel in (moving bytes between processes is the pipeline's
    main cost): token ids below the vocab size; position ids and document numbers below seq_len; labels
    signed for the ignore index."""
    small_ids = np.uint16 if vocab_size <= 1 << 16 else np.int32
    small_positions = np.uint16 if seq_len <= 1 << 16 else np.int32
    return {"input_ids": small_ids, "labels": np.int32, "position_ids": small_positions,
            "doc_ids": small_positions}


def materialise_block(block: dict[str, np.ndarray], spec: ReadSpec) -> dict[str, np.ndarray]:
    """map_batches UDF: a block of pickled StepWork chunks (one seq_len) -> rows tagged with their batch,
    each step packed straight into the block's arrays."""
    works = [work for payload in block["work"] for work in pickle.loads(payload)]
    n_rows = sum(work.n_rows for work in works)
    seq_len = works[0].seq_len
    out = {key: np.empty((n_rows, seq_len), dtype=dtype)
           for key, dtype in block_dtypes(spec.vocab_size, seq_len).items()}
    out["batch"] = np.empty(n_rows, dtype=np.int64)
    load = doc_loader(spec)
    at = 0
    for work in works:
        if work.seq_len != seq_len:
            raise ValueError(f"a block mixes seq_len {seq_len} and {work.seq_len}")
        materialise(spec, work, out={key: out[key][at: at + work.n_rows] for key in ARRAY_KEYS}, load=load)
        out["batch"][at: at + work.n_rows] = work.batch
        at += work.n_rows
    return out


def build_dataset(chunks: list[list[StepWork]], spec: ReadSpec, concurrency: int):
    """A Ray Data dataset whose blocks are the materialised chunks, in order."""
    import ray.data

    items = [{"work": pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)} for chunk in chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(materialise_block, batch_size=None, batch_format="numpy", fn_kwargs={"spec": spec},
                        num_cpus=1, compute=ray.data.TaskPoolStrategy(size=concurrency))
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds.context.enable_auto_log_stats = False
    ds.context.print_on_execution_start = False  # a new dataset every window: keep the training log quiet
    return ds


class _Rows:
    """Rows of consecutive steps out of a stream of blocks, checked against the batch each belongs to."""

    def __init__(self, blocks: Iterator[dict[str, np.ndarray]]):
        self._blocks = blocks
        self._block: dict[str, np.ndarray] | None = None
        self._at = 0

    def take(self, n: int, batch: int) -> dict[str, np.ndarray]:
        parts = []
        while n > 0:
            if self._block is None or self._at == len(self._block["batch"]):
                self._block, self._at = next(self._blocks), 0
                continue
            k = min(n, len(self._block["batch"]) - self._at)
            parts.append({key: v[self._at: self._at + k] for key, v in self._block.items()})
            self._at += k
            n -= k
        out = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        tags = out.pop("batch")
        if not (tags == batch).all():
            raise RuntimeError(f"data pipeline out of order: expected rows of batch {batch}, "
                               f"got {np.unique(tags)}")
        return out


class RayStepStream:
    """Plans ahead in a background thread and materialises through Ray Data; next() gives steps in order.

    Upcoming steps are planned in windows (`window_chunks` chunks of about `chunk_tokens` tokens each); each
    window is one Ray Data execution whose blocks a thread of its own pulls as they are made. The next
    window is planned and launched by a helper thread as soon as the previous one starts handing out
    steps, so its planning and start-up overlap that work instead of stalling the trainer at a boundary.
    The planner is owned by the thread from here on; close() stops everything (the caller then rebuilds a
    planner from the cursor of the last step taken)."""

    def __init__(self, planner: Planner, spec: ReadSpec, rank: int, world_size: int, prefetch_batches: int,
                 chunk_tokens: int = 1 << 22, max_chunk_steps: int = 64, window_chunks: int = 32,
                 concurrency: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, prefetch_batches) * 4)
        self._stop = threading.Event()
        chunking = _Chunking(chunk_tokens, max_chunk_steps, window_chunks, concurrency,
                             max(1, prefetch_batches))
        self._windows: list[_Window] = []
        self._threads_before = {t.ident for t in threading.enumerate()}
        self._thread = threading.Thread(
            target=_produce, name=f"data-feed-rank{rank}", daemon=True,
            args=(planner, spec, rank, world_size, chunking, self._queue, self._stop, self._windows))
        self._thread.start()

    def next(self) -> StepData:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data pipeline thread stopped without an error") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        """Stop planning and every Ray Data execution in flight; returns when they have ended."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
        for window in self._windows:
            window.join()
        self._windows.clear()
        _join_ray_data_threads(self._threads_before)


_RAY_DATA_THREADS = ("StreamingExecutor-", "iter_threaded")


def _join_ray_data_threads(started_after: set[int], timeout_s: float = 30.0) -> None:
    """Ray Data's executor shutdown gives its loop thread 2 s and returns, and its batch threads finish the
    block in hand: a thread of theirs still calling into Ray when Ray itself is shut down (a finished job,
    a bench) ends the whole process. So close() waits for the ones started since this stream began."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.ident not in started_after and thread.name.startswith(_RAY_DATA_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


@dataclass(frozen=True)
class _Chunking:
    chunk_tokens: int  # a Ray task materialises about this many tokens (fewer tasks, less overhead) ...
    max_chunk_steps: int  # ... but no more steps than this (the first step of a chunk waits for all of it)
    # Chunks per Ray Data execution. Every execution and every block cost a start-up (~0.5 s and ~50 ms on
    # 2 busy cores), so windows are long and blocks large: 32 chunks of 4M tokens (about 40 MB each in
    # the block dtypes). Memory stays bounded: Ray Data streams a window's blocks with backpressure.
    window_chunks: int
    concurrency: int  # Ray tasks at once per window; each process keeps its own shard cache
    prefetch_batches: int  # blocks Ray Data fetches ahead of the puller


_END = object()
FIRST_WINDOW_CHUNKS = 2


def _user_error(error: BaseException) -> BaseException:
    """The DataError inside a Ray Data task failure (it names the file and the fix), or the failure itself.
    Ray Data re-raises a UDF's exception as a UserCodeException that keeps only its traceback text."""
    if isinstance(error, DataError):
        return error
    lines = [line for line in str(error).splitlines() if "DataError: " in line]
    if not lines:
        return error
    found = DataError(lines[-1].split("DataError: ", 1)[1])
    found.__cause__ = error
    return found
_Step = tuple[PlannedBatch, tuple[int, int], StepWork | None, dict]


class _Window:
    """One Ray Data execution over a window of planned steps; its blocks are pulled by their own thread."""

    def __init__(self, steps: list[_Step], chunks: list[list[StepWork]], spec: ReadSpec, chunking: _Chunking,
                 stop: threading.Event):
        self.steps = steps
        self._stop = stop
        # A few blocks (at most ~40 MB each) ahead of the steps being served; beyond that Ray Data's own
        # prefetch and backpressure hold the rest, so a rank never buffers a whole window.
        self._blocks: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._pull, args=(chunks, spec, chunking), daemon=True,
                                        name="data-feed-window")
        self._thread.start()

    def _pull(self, chunks: list[list[StepWork]], spec: ReadSpec, chunking: _Chunking) -> None:
        batches = None
        try:
            if chunks:
                ds = build_dataset(chunks, spec, chunking.concurrency)
                batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy",
                                               prefetch_batches=chunking.prefetch_batches))
                for block in batches:
                    if self._stop.is_set():
                        break
                    if not _put(self._blocks, block, self._stop):
                        break
        except BaseException as e:  # raised in the training loop by next()
            _put(self._blocks, _user_error(e), self._stop)
        finally:
            if batches is not None and hasattr(batches, "close"):
                batches.close()  # shuts the execution down now, not whenever the generator is collected
            _put(self._blocks, _END, self._stop)

    def join(self) -> None:
        self._thread.join()

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        while not self._stop.is_set():
            try:
                block = self._blocks.get(timeout=0.1)
            except queue.Empty:
                continue
            if block is _END:
                return
            if isinstance(block, BaseException):
                raise block
            yield block


def _plan_window(planner: Planner, rank: int, world_size: int, chunking: _Chunking, n_chunks: int,
                 stop: threading.Event) -> tuple[list[_Step], list[list[StepWork]]]:
    steps, chunks, current, tokens = [], [], [], 0
    # Also bounds the steps of a window where this rank has no rows (nothing for Ray to make).
    max_steps = n_chunks * chunking.max_chunk_steps
    while len(chunks) < n_chunks and len(steps) < max_steps:
        if stop.is_set():  # closing: the window will not be served, and close() waits for this thread
            return [], []
        planned = planner.next_batch()
        work = step_work(planned, rank, world_size)
        rows = rank_rows(planned.n_rows, world_size, rank)
        steps.append((planned, rows, work, planner.cursor.to_dict()))
        if work is None:
            continue
        if current and current[0].seq_len != work.seq_len:
            chunks.append(current)
            current, tokens = [], 0
        current.append(work)
        tokens += work.n_rows * work.seq_len
        if tokens >= chunking.chunk_tokens or len(current) >= chunking.max_chunk_steps:
            chunks.append(current)
            current, tokens = [], 0
    if current:
        chunks.append(current)
    return steps, chunks


def _produce(planner: Planner, spec: ReadSpec, rank: int, world_size: int, chunking: _Chunking,
             q: queue.Queue, stop: threading.Event, windows: list[_Window]) -> None:
    def launch(n_chunks: int) -> _Window:
        window = _Window(*_plan_window(planner, rank, world_size, chunking, n_chunks, stop), spec, chunking, stop)
        windows[:] = [w for w in windows if w._thread.is_alive()] + [window]
        return window

    # The next window is planned and started by a helper thread while this one hands out the current
    # window's steps, so that neither planning nor Ray Data's start-up holds up a step already made.
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-feed-plan") as planning:
            # A short first window: the first step waits for its planning and its first block.
            current = launch(min(FIRST_WINDOW_CHUNKS, chunking.window_chunks))
            while not stop.is_set():
                following = planning.submit(launch, chunking.window_chunks)
                rows = _Rows(current.blocks())
                for planned, row_range, work, cursor in current.steps:
                    arrays = None
                    if work is not None:  # widened here, off the training thread (see DataFeed)
                        arrays = {k: v.astype(np.int64) for k, v in rows.take(work.n_rows, planned.batch).items()}
                    if not _put(q, StepData(planned, row_range, arrays, cursor), stop):
                        break
                current = following.result()
    except StopIteration:
        if not stop.is_set():
            _put(q, RuntimeError("the data pipeline ended before its planned steps were made"), stop)
    except BaseException as e:  # handed to the consumer, which raises it in the training loop
        _put(q, e, stop)
