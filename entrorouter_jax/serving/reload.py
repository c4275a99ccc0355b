"""Hot reload of the router in a running server (POST /admin/reload, SIGHUP).

`Reloader.reload(workdir)` loads the router a workdir holds (in a worker thread: the event
loop keeps serving), checks the pool serves some of its models, starts a new
`RoutingService` (its own micro-batcher), warms it up where the app does, and swaps
`app.state.serving` for a copy with the new service, version and served models (the
client, logs, index, metrics and settings stay). A request that read the old Serving
finishes on the old router: its service is retired (its batcher stopped) once those
requests have their decisions. One reload runs at a time; a failed one leaves the old
router serving. Every reload is counted in entrorouter_reloads_total{result}; one that
succeeds is a marker in the dashboard's stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import signal
import time
from typing import Callable, Optional

from entrorouter_jax import router as router_lib
from entrorouter_jax.data.pool import tool_models
from entrorouter_jax.serving.errors import RequestError
from entrorouter_jax.serving.routing import RoutingService
from entrorouter_jax.serving.version import router_version

log = logging.getLogger('entrorouter_jax.serve')


def resolved_workdir(workdir) -> pathlib.Path:
  """Returns `workdir` with ~ expanded and every symlink resolved now (a link repointed
  to a new run since the last reload names that run); RequestError 400 naming "workdir"
  if it is not a directory."""
  path = pathlib.Path(os.path.expanduser(str(workdir))).resolve()
  if not path.is_dir():
    raise RequestError(400, f'workdir {str(workdir)!r} is not a directory; expected the '
                       'workdir of a finished training run', 'workdir', 'invalid_request_error',
                       'reload_failed')
  return path


class Reloader:
  """Swaps the router of `app` (whose `app.state.serving` is the live Serving);
  `served_models(router, endpoints)` names the models the pool serves (ValueError if
  none); `warm_up` as the app's lifespan does."""

  def __init__(self, app, served_models: Callable, warm_up: bool):
    self.app, self.served_models, self.warm_up = app, served_models, warm_up
    self.lock = asyncio.Lock()   # one reload at a time: a second one waits
    self._tasks: set = set()     # the reloads SIGHUP started, until done

  async def reload(self, workdir) -> dict:
    """Loads the router at `workdir` and makes it the live one. Returns {"version",
    "models", "seconds"} once it serves; RequestError (400: a bad workdir or a router the
    pool serves none of; 500: the warm-up failed; 503: the server is not running) with
    the old router still serving otherwise."""
    async with self.lock:
      metrics = self.app.state.serving.metrics
      started = time.perf_counter()
      try:
        serving, service = await self._start(workdir)
      except RequestError as e:
        metrics.reloads.labels('failed').inc()
        log.warning('reload of %s failed (%d): %s; still serving version %s', workdir,
                    e.status, e.message, self.app.state.serving.version)
        raise
      old = self.app.state.serving
      self.app.state.serving = serving
      seconds = time.perf_counter() - started
      metrics.set_version(serving.version)
      metrics.reloads.labels('ok').inc()
      if serving.stats is not None:   # the dashboard's marker at this reload
        serving.stats.router_loaded(serving.version, workdir, previous=old.version)
      log.info('reloaded %s: version %s (was %s) over %s in %.1f s', workdir, serving.version,
               old.version, serving.served, seconds)
      await old.service.retire()   # after the swap: its requests finish on the old router
      return {'version': serving.version, 'models': serving.served, 'seconds': seconds}

  async def _start(self, workdir):
    """Returns (the new Serving, its started and warmed-up RoutingService); RequestError
    naming the reason, with nothing left running, otherwise."""
    path = resolved_workdir(workdir)

    def load():
      return router_lib.load_router(path), router_version(path)

    try:
      router, version = await asyncio.to_thread(load)
    except Exception as e:  # noqa: BLE001 -- any reason the workdir does not load is the answer
      log.debug('reload of %s: the router did not load', path, exc_info=True)
      raise RequestError(400, f'workdir {str(workdir)!r}: the router did not load '
                         f'({type(e).__name__}: {e}); expected the workdir of a finished '
                         'training run', 'workdir', 'invalid_request_error',
                         'reload_failed') from None
    current = self.app.state.serving
    try:
      served = self.served_models(router, current.endpoints)
    except ValueError as e:
      raise RequestError(400, f'workdir {str(workdir)!r}: {e}', 'workdir',
                         'invalid_request_error', 'reload_failed') from None
    settings = current.settings
    service = RoutingService(router, settings, current.metrics, served,
                             tool_models(current.endpoints))
    await service.batcher.start()
    try:
      if self.warm_up:
        calls = await service.batcher.run_alone(router.warm_up, settings.max_batch)
        log.info('reload: router warmed up (%d shapes, batches up to %d)', calls,
                 settings.max_batch)
    except Exception as e:  # noqa: BLE001 -- answered with the reason; the old router serves on
      await service.batcher.stop()
      log.exception('reload of %s: the warm-up failed', path)
      raise RequestError(500, f'workdir {str(workdir)!r}: the router did not warm up '
                         f'({type(e).__name__}: {e})', None, 'server_error',
                         'reload_failed') from None
    current = self.app.state.serving   # re-read: the server may have shut down meanwhile
    if current.client is None:
      await service.batcher.stop()
      raise RequestError(503, 'the server is not running (starting or shutting down); '
                         'expected the reload once /healthz says ok', None, 'server_error',
                         'not_running')
    return dataclasses.replace(current, service=service, version=version, served=served), service

  async def reload_from_settings(self) -> Optional[dict]:
    """SIGHUP's reload: from the workdir the server was started with (Settings.workdir, as
    given: a symlink is resolved anew). Returns reload's answer, or None after a failure
    (logged with the reason) or where no workdir is set."""
    workdir = self.app.state.serving.settings.workdir
    if workdir is None:
      log.warning('SIGHUP: this server has no --workdir to reload from; ignored')
      return None
    log.info('SIGHUP: reloading the router from %s', workdir)
    try:
      return await self.reload(workdir)
    except RequestError:
      return None   # reload logged the reason
    except Exception:  # noqa: BLE001 -- a signal handler's task: logged, never raised
      log.exception('SIGHUP: the reload from %s failed unexpectedly', workdir)
      return None

  def on_sighup(self) -> None:
    """The loop's SIGHUP handler: starts `reload_from_settings` as a task."""
    task = asyncio.get_running_loop().create_task(self.reload_from_settings())
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  def install_sighup(self) -> bool:
    """Installs `on_sighup` on the running loop; returns whether it could (not where the
    platform has no SIGHUP, nor off the main thread)."""
    if not hasattr(signal, 'SIGHUP'):
      return False
    try:
      asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.on_sighup)
    except (NotImplementedError, RuntimeError, ValueError) as e:
      log.warning('SIGHUP reloads are off: %s', e)
      return False
    return True

  async def uninstall_sighup(self) -> None:
    """Removes the SIGHUP handler and waits for the reloads it started. Returns nothing."""
    if hasattr(signal, 'SIGHUP'):
      try:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
      except (NotImplementedError, RuntimeError, ValueError):
        pass
    if self._tasks:
      await asyncio.gather(*list(self._tasks), return_exceptions=True)
