"""The README's picture of the dashboard (docs/dashboard.png), taken in a real browser.

  python benchmarks/dashboard_screenshot.py [--workdir=DIR] [--seconds=150] [--out=PNG]

Starts `python -m entrorouter_jax.serve` on the router (without --workdir: the default
recipe briefly trained, as in routing_speed.py) with every pool model played by one
local fake upstream (benchmarks/fake_upstream.py) that answers with token counts and
delays growing with the model's size, priced like a real pool; 10-second buckets, a
decision log and 5% exploration. It then sends routed chat completions from a few clients
for --seconds and on while the reload loads (the queries of the router's test split),
scores about half of them as a judge would (better models score higher, with noise),
takes one model's upstream down for a while (fallbacks), and halfway reloads the router
calibrated to send at most 20% of the queries to the strongest model (calibration.json in
a copy of the workdir: a new version, so the marker shows what the calibration changed).
Headless Chromium
(benchmarks/browser.py: Debian's chromium and chromium-driver, selenium) then opens
/dashboard?token=... and the page is saved as a 256-colour PNG at --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = 'dashboard-demo-token'
# $ per 1M tokens (in, out) for the synthetic pool's names; others by their rank.
PRICES = {'nano': (0.05, 0.2), 'small': (0.15, 0.6), 'math-specialist': (0.3, 1.2),
          'code-specialist': (0.5, 1.5), 'medium': (1.0, 4.0), 'large': (3.0, 15.0),
          'frontier': (10.0, 40.0)}


def slug(name: str) -> str:
  return ''.join(c if c.isalnum() else '-' for c in name.lower())


def pool_for(names: list, up) -> dict:
  """The pool file's content: every model on the fake upstream, priced."""
  pool = {}
  for i, name in enumerate(names):
    price_in, price_out = PRICES.get(name, (0.1 * 2.5**i, 0.4 * 2.5**i))
    pool[name] = {'price_in': price_in, 'price_out': price_out,
                  'base_url': up.url(slug(name))}
  return pool


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='a trained router (default: train one)')
  parser.add_argument('--seconds', type=float, default=150.0, help='seconds of traffic')
  parser.add_argument('--out', default=os.path.join(REPO, 'docs', 'dashboard.png'))
  parser.add_argument('--width', type=int, default=1400)
  args = parser.parse_args()

  import httpx
  from benchmarks import browser, fake_upstream, routing_speed
  from entrorouter_jax import calibrate, router as router_lib
  reason = browser.missing()
  if reason:
    sys.exit(f'error: {reason}')
  tmp = tempfile.TemporaryDirectory(prefix='dashboard_')
  workdir = args.workdir or routing_speed.train_short_router(os.path.join(tmp.name, 'router'))
  router = router_lib.load_router(workdir)
  names = router.model_names
  queries = routing_speed._queries(router, 400)
  rank = {slug(n): i / max(1, len(names) - 1) for i, n in enumerate(names)}

  def usage(model_slug, body):   # bigger models: longer answers, slower
    size = rank.get(model_slug, 0.5)
    time.sleep(0.002 + 0.03 * size * random.random())
    prompt = 4 * len(str(body.get('messages', '')).split())
    return prompt, int(120 + 500 * size * random.random())

  # R1: the same router calibrated to at most 20% on the strongest model, another version.
  second = os.path.join(tmp.name, 'calibrated')
  shutil.copytree(workdir, second)
  calibrate.calibrate(second, queries[:200], strong_share=0.2, source='the test split')
  touched = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(second,
                                                                           'checkpoints'))
                   for f in fs)[0]
  stat = os.stat(touched)
  os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

  up = fake_upstream.Upstreams(record=False, usage=usage)
  pool = os.path.join(tmp.name, 'pool.json')
  with open(pool, 'w') as f:
    json.dump(pool_for(names, up), f)
  port = fake_upstream.free_port()
  log = open(os.path.join(tmp.name, 'serve.log'), 'w')
  env = dict(os.environ, DEMO_TOKEN=TOKEN)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'entrorouter_jax.serve', f'--workdir={workdir}', f'--pool={pool}',
       f'--port={port}', '--auth_token_env=DEMO_TOKEN', '--explore=0.05', '--seed=0',
       f'--decisions={os.path.join(tmp.name, "decisions")}', '--stats_bucket_s=10',
       '--max_batch=16'], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  base = f'http://127.0.0.1:{port}'
  try:
    if not fake_upstream.wait_until_healthy(base, proc, 600):
      sys.exit(f'error: the server did not start; see {log.name}')
    headers = {'authorization': f'Bearer {TOKEN}'}
    stop, lock, answered = threading.Event(), threading.Lock(), []
    started = time.monotonic()
    quality = {n: 0.35 + 0.55 * rank[slug(n)] for n in names}

    def client(k):
      rng = random.Random(k)
      with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        while not stop.is_set():
          phase = (time.monotonic() - started) / args.seconds
          r = http.post('/v1/chat/completions', json={'model': 'router', 'messages': [
              {'role': 'user', 'content': rng.choice(queries)}]})
          if r.status_code == 200:
            with lock:
              answered.append((r.json()['id'], r.json()['model']))
          # a busier and a quieter spell
          time.sleep(0.05 + 0.15 * (1 + math.sin(2 * math.pi * (phase + k / 8))))

    def judge():
      rng = random.Random(99)
      with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        while not stop.wait(3):
          with lock:
            batch, answered[:] = answered[:], []
          scores = [{'id': rid, 'score': min(1.0, max(0.0, rng.gauss(quality.get(m, 0.5), 0.2)))}
                    for rid, m in batch if rng.random() < 0.5]
          if scores:
            http.post('/v1/feedback', json=scores[:1000])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=judge))
    for t in threads:
      t.start()
    with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
      time.sleep(args.seconds * 0.25)
      up.mode[slug(names[len(names) // 2])] = 'down'   # an outage: fallbacks
      time.sleep(args.seconds * 0.15)
      up.mode.clear()
      time.sleep(args.seconds * 0.1)
      r = http.post('/admin/reload', json={'workdir': second})   # traffic goes on meanwhile
      print(f'reload: {r.status_code} {r.text}', file=sys.stderr)
      time.sleep(args.seconds * 0.5)   # the calibrated router's half
    stop.set()
    for t in threads:
      t.join()

    driver = browser.chromium(args.width, 2200)
    try:
      driver.get(f'{base}/dashboard?token={TOKEN}')
      deadline = time.monotonic() + 30
      while not driver.execute_script('return window.dashboard && window.dashboard.refreshes > 0'):
        if time.monotonic() > deadline:
          sys.exit('error: the dashboard did not draw within 30 s')
        time.sleep(0.2)
      time.sleep(0.5)
      height = int(driver.execute_script(
          'return document.querySelector("footer").getBoundingClientRect().bottom'))
      driver.set_window_size(args.width, height + 140)   # the window's frame: its own pixels
      time.sleep(0.5)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      raw = os.path.join(tmp.name, 'raw.png')
      driver.save_screenshot(raw)
    finally:
      driver.quit()
    from PIL import Image
    Image.open(raw).convert('RGB').quantize(colors=256).save(args.out, optimize=True)
    print(f'{args.out}: {os.path.getsize(args.out)} bytes', file=sys.stderr)
  finally:
    proc.terminate()
    proc.wait(30)
    up.close()
    log.close()
    tmp.cleanup()


if __name__ == '__main__':
  main()
