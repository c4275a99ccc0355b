"""Micro-batching: concurrent requests share one call of a batch function.

The server's requests arrive one by one on an asyncio loop; routing each alone
would run one jitted forward per request. `MicroBatcher` queues them and hands
a worker thread up to `max_batch` at a time: it waits at most `max_wait_ms`
after the first for more to arrive, then calls `fn(items) -> results` once
(in one thread, so the function never runs twice at the same time) and answers
each request with its own result. Requests fail alone: where `fn` raises on a
batch of several, each item is run again by itself, so only the items that fail
on their own hear of an exception (their own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Optional, Sequence


class MicroBatcher:

  def __init__(self, fn: Callable[[Sequence], Sequence], max_batch: int = 64,
               max_wait_ms: float = 2.0, on_batch: Optional[Callable[[int, float], None]] = None):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch}; expected >= 1')
    if max_wait_ms < 0:
      raise ValueError(f'max_wait_ms={max_wait_ms}; expected >= 0')
    self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
    self.on_batch = on_batch            # called with (batch size, seconds in fn)
    self._queue: Optional[asyncio.Queue] = None
    self._task: Optional[asyncio.Task] = None
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='batcher')

  async def start(self) -> None:
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._work())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
      self._task = None
    self._pool.shutdown(wait=True)

  async def run_alone(self, fn: Callable, *args):
    """Runs fn(*args) in the batch thread (e.g. a warm-up), between batches."""
    return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

  async def submit(self, item):
    """The result of fn for `item`, computed in a batch with its neighbours in time."""
    if self._queue is None:
      raise RuntimeError('MicroBatcher.start() was not called')
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((item, future))
    return await future

  async def _work(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = [await self._queue.get()]
      deadline = loop.time() + self.max_wait
      while len(batch) < self.max_batch:
        try:
          batch.append(self._queue.get_nowait())
          continue
        except asyncio.QueueEmpty:
          pass
        left = deadline - loop.time()
        if left <= 0:
          break
        try:
          batch.append(await asyncio.wait_for(self._queue.get(), left))
        except asyncio.TimeoutError:
          break
      batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
      if not batch:
        continue
      started = loop.time()
      items = [item for item, _ in batch]
      try:
        results = await loop.run_in_executor(self._pool, self._call, items)
      except Exception as e:  # noqa: BLE001 -- one item may be to blame: each runs alone
        if len(batch) == 1:
          if not batch[0][1].done():
            batch[0][1].set_exception(e)
        else:
          await self._one_by_one(loop, batch)
        continue
      if self.on_batch is not None:
        self.on_batch(len(batch), loop.time() - started)
      for (_, fut), result in zip(batch, results):
        if not fut.done():
          fut.set_result(result)

  def _call(self, items):
    results = self.fn(items)
    if len(results) != len(items):
      raise RuntimeError(f'batch function returned {len(results)} results for '
                         f'{len(items)} items')
    return results

  async def _one_by_one(self, loop, batch) -> None:
    """Runs each item of a failed batch alone: an exception reaches its own item only."""
    for item, fut in batch:
      if fut.done():
        continue
      started = loop.time()
      try:
        result = (await loop.run_in_executor(self._pool, self._call, [item]))[0]
      except Exception as e:  # noqa: BLE001 -- handed to the request it belongs to
        if not fut.done():
          fut.set_exception(e)
        continue
      if self.on_batch is not None:
        self.on_batch(1, loop.time() - started)
      if not fut.done():
        fut.set_result(result)
