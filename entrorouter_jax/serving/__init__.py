"""The OpenAI-compatible server (`python -m entrorouter_jax.serve`) in parts.

  settings.py  the server's knobs (Settings)
  errors.py    OpenAI-style errors: RequestError, its reply, the ErrorBoundary middleware
  requests.py  reading a request: auth, the body limit, strict JSON, the text to route on
  metrics.py   the Prometheus metrics and the middleware that counts and times replies
  routing.py   the router behind a micro-batcher: a text -> a Decision (model and ranking)
  upstream.py  forwarding to the pool's endpoints: fallback along the ranking, streaming
  version.py   the router's version: a digest of its workdir
  reload.py    hot reload of the router (POST /admin/reload, SIGHUP)
  stats.py     the dashboard's numbers: totals and a bounded history of time buckets
  dashboard.py GET /v1/stats and GET /dashboard (static/: the page, its script, uPlot)
  app.py       the Starlette application: its lifespan, endpoints and route table
"""
