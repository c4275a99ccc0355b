"""The dashboard: GET /v1/stats (the figures, JSON) and GET /dashboard (a page that draws
them, refreshed every 5 s), from the `Stats` of serving/stats.py on the live Serving.

The page and its scripts are files of this package (static/: dashboard.html, .js, .css and
uPlot, MIT, vendored with its licence), served from memory at /dashboard/static/<name>;
the page fetches nothing from elsewhere (its Content-Security-Policy says 'self' only),
so it works on an offline host. With a bearer token, every one of these GETs needs the
token (Authorization: Bearer) or the dashboard cookie: opening /dashboard?token=T once
with the right token sets it (HttpOnly, SameSite=Strict; an HMAC of the token, good only
for these GETs) and redirects (303) to /dashboard, so the token leaves the address bar.
"""

from __future__ import annotations

import hmac
import html
import importlib.resources
import math
import urllib.parse
from typing import Optional

from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from entrorouter_jax.serving.errors import RequestError
from entrorouter_jax.serving.requests import DASHBOARD_COOKIE, authorize_read, dashboard_cookie

# The files the dashboard serves: name -> media type.
FILES = {'dashboard.js': 'text/javascript; charset=utf-8',
         'dashboard.css': 'text/css; charset=utf-8',
         'uPlot.iife.min.js': 'text/javascript; charset=utf-8',
         'uPlot.min.css': 'text/css; charset=utf-8',
         'uPlot.LICENSE': 'text/plain; charset=utf-8'}
PAGE = 'dashboard.html'
# Everything from this server only; no inline script or style (uPlot sizes its elements
# through the DOM, which style-src does not restrict).
PAGE_HEADERS = {
    'content-security-policy': "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    'cache-control': 'no-store', 'referrer-policy': 'no-referrer',
    'x-content-type-options': 'nosniff', 'x-frame-options': 'DENY'}
FILE_HEADERS = {'cache-control': 'private, max-age=300', 'x-content-type-options': 'nosniff'}


def read_files() -> dict:
  """Returns {name: bytes} of the page and every file of FILES, read from the package's
  static/ folder (FileNotFoundError naming a missing one: a broken install)."""
  folder = importlib.resources.files('entrorouter_jax.serving') / 'static'
  out = {}
  for name in (PAGE, *FILES):
    try:
      out[name] = (folder / name).read_bytes()
    except FileNotFoundError:
      raise FileNotFoundError(f'the dashboard\'s file {name} is missing from {folder}; expected '
                              'it in the installed package (setup.py package_data)') from None
  return out


def finite(value) -> Optional[float]:
  """`value` as a float where it is a finite number (not a bool), else None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value)


def calibration_in_force(router) -> dict:
  """The cost weight (or threshold) the live router routes at by default and what
  DIR/calibration.json, where there is one, expects of it: {"cost_weight", "threshold",
  "calibrated", "expected": {"accuracy", "cost_per_query", "strong_share"} or None,
  "target", "created", "queries"}."""
  calibration = router.calibration if isinstance(router.calibration, dict) else {}
  moves = router.moves_with_cost_weight
  expected = calibration.get('expected')
  target = calibration.get('target')
  queries = calibration.get('queries')
  return {
      'cost_weight': router.default_cost_weight if moves else None,
      'threshold': None if moves else router.default_threshold,
      'calibrated': bool(calibration),
      'expected': ({k: finite(expected.get(k)) for k in ('accuracy', 'cost_per_query',
                                                         'strong_share')}
                   if isinstance(expected, dict) else None),
      'target': ({k: finite(v) for k, v in target.items() if k in ('cost_per_query',
                                                                    'strong_share')}
                 if isinstance(target, dict) else None),
      'created': calibration.get('created') if isinstance(calibration.get('created'), str)
                 else None,
      'queries': queries.get('count') if isinstance(queries, dict)
                 and isinstance(queries.get('count'), int) else None}


def strongest_model(router) -> Optional[str]:
  """The name of the router's strongest model (None where router.json's index is off)."""
  names, strongest = router.model_names, router.strongest
  return names[strongest] if isinstance(strongest, int) and 0 <= strongest < len(names) else None


def stats_body(serving, buckets: Optional[int] = None) -> dict:
  """GET /v1/stats's answer for the live `serving` (whose `stats` is on): the live router
  ({"version", "loaded_at", "models", "strongest"}), the calibration in force, the totals
  since the start (Stats.totals: "routes", "spend", "latency_ms", "feedback", ...),
  whether there is a decision log (scores need one), the reloads within the history, the
  history's shape and its series (Stats.series, the last `buckets` buckets)."""
  stats, router = serving.stats, serving.service.router
  strongest = strongest_model(router)
  series = stats.series(buckets, router.model_names)
  totals = stats.totals()
  totals['spend']['strongest_model'] = strongest
  return {
      'time': stats.clock(), 'since': stats.since,
      'router': {'version': serving.version, 'loaded_at': stats.loaded_at,
                 'models': list(serving.served), 'strongest': strongest},
      'calibration': calibration_in_force(router),
      **totals,
      'decision_log': serving.decisions is not None,
      'reloads': stats.markers(series['t'][0] if series['t'] else stats.since),
      'history': {'bucket_s': stats.bucket_s, 'buckets': stats.history,
                  'shown': len(series['t'])},
      'series': series}


def stats_off() -> RequestError:
  return RequestError(404, 'this server keeps no dashboard history; expected a server started '
                      'with --stats_history > 0 (the default)', None, 'invalid_request_error',
                      'stats_off')


async def stats(request):
  """GET /v1/stats[?buckets=N]: `stats_body` (N: the last N buckets of the series, default
  all kept); 404 with --stats_history=0, 400 naming "buckets" for a bad N."""
  serving = request.app.state.serving
  authorize_read(request, serving.settings.auth_token)
  if serving.stats is None:
    raise stats_off()
  buckets = request.query_params.get('buckets')
  if buckets is not None:
    if not buckets.isdigit() or not 1 <= int(buckets) <= 10**6:
      shown = buckets if len(buckets) <= 20 else buckets[:20] + '...'
      raise RequestError(400, f'buckets is {shown!r}; expected a whole number >= 1 (the last '
                         'N buckets of the history)', 'buckets')
    buckets = int(buckets)
  return JSONResponse(stats_body(serving, buckets), headers={'cache-control': 'no-store'})


def refusal_page(status: int, message: str) -> HTMLResponse:
  """A small HTML page for a browser that may not see the dashboard (no stylesheet: the
  request was not authorised to fetch it)."""
  body = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>entrorouter '
          f'dashboard: {status}</title></head><body><h1>entrorouter dashboard</h1><p>'
          f'{html.escape(message)}</p><p>Open <code>/dashboard?token=&lt;the bearer token&gt;'
          '</code> once: it sets a cookie and takes the token out of the address bar.</p>'
          '</body></html>')
  return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


async def dashboard(request):
  """GET /dashboard: the page. With ?token=T: the right token sets the dashboard cookie and
  redirects (303) to /dashboard without it (the other query parameters kept); a wrong one
  is refused (401), as is a request with neither the bearer token nor the cookie."""
  serving = request.app.state.serving
  token = serving.settings.auth_token
  given = request.query_params.get('token')
  if given is not None:
    if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
      return refusal_page(401, 'wrong token; expected the bearer token the server was started '
                          'with (--auth_token_env)')
    rest = urllib.parse.urlencode([(k, v) for k, v in request.query_params.multi_items()
                                   if k != 'token'])
    reply = RedirectResponse('/dashboard' + (f'?{rest}' if rest else ''), status_code=303,
                             headers={'cache-control': 'no-store',
                                      'referrer-policy': 'no-referrer'})
    if token is not None:
      reply.set_cookie(DASHBOARD_COOKIE, dashboard_cookie(token), path='/', httponly=True,
                       samesite='strict', secure=request.url.scheme == 'https')
    return reply
  try:
    authorize_read(request, token)
  except RequestError as e:
    return refusal_page(e.status, e.message)
  if serving.stats is None:
    return refusal_page(404, stats_off().message)
  return HTMLResponse(request.app.state.dashboard_files[PAGE], headers=PAGE_HEADERS)


async def dashboard_file(request):
  """GET /dashboard/static/<name>: one of the dashboard's files (404 for any other name)."""
  serving = request.app.state.serving
  authorize_read(request, serving.settings.auth_token)
  name = request.path_params['name']
  if name not in FILES:
    raise RequestError(404, f'no dashboard file {name[:60]!r}; expected one of {sorted(FILES)}',
                       None, 'invalid_request_error', 'not_found')
  return Response(request.app.state.dashboard_files[name], media_type=FILES[name],
                  headers=FILE_HEADERS)
