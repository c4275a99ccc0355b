"""The dashboard in a real browser: `python -m entrorouter_jax.serve` on the tiny router of
conftest's `serve_workdir` (fake upstreams on 127.0.0.1, each model priced differently,
a decision log, exploration, one-second buckets) takes routed traffic, fallbacks, scores
and a hot reload; headless Chromium (Debian's, driven by selenium: benchmarks/browser.py)
then opens /dashboard?token=..., and every chart must have drawn data points and a reload
marker, and every number on the page must be /v1/stats's. A screenshot is left in the
test's temporary folder. Skipped, with the reason, where no Chromium can be driven."""

import json
import os
import re
import shutil
import time

import httpx
import pytest

from benchmarks import browser
from serving import QUERIES, TOKEN, auth, running_server, slug

CHARTS = ('chart-routes', 'chart-explore', 'chart-spend', 'chart-feedback', 'chart-routing',
          'chart-upstream')
# What the page shows of /v1/stats, compared whole: its totals, not the moving series.
TOTALS = ('router', 'calibration', 'routes', 'decisions', 'explored', 'explored_share',
          'switched', 'switched_share',
          'completions', 'fallbacks', 'failed', 'spend', 'latency_ms', 'feedback', 'reloads',
          'decision_log', 'since')


def traffic(http, seconds: float, tag: str) -> list:
  """Routed chat completions (and a /v1/route call every third) for `seconds`; returns
  the completions' ids."""
  ids, end, i = [], time.monotonic() + seconds, 0
  while time.monotonic() < end:
    r = http.post('/v1/chat/completions', json={'model': 'router', 'messages': [
        {'role': 'user', 'content': f'{QUERIES[i % len(QUERIES)]} ({tag} {i})'}]})
    assert r.status_code == 200, r.text
    ids.append(r.json()['id'])
    if i % 3 == 0:
      assert http.post('/v1/route', json={'query': QUERIES[i % len(QUERIES)]}).status_code == 200
    i += 1
  return ids


def score(http, ids, offset: int) -> None:
  body = [{'id': rid, 'score': ((k + offset) % 5) / 4} for k, rid in enumerate(ids)]
  r = http.post('/v1/feedback', json=body)
  assert r.status_code == 200, r.text


def get(stats, path):
  for key in path.split('.'):
    stats = None if stats is None else stats.get(key)
  return stats


def check_shown(stat, fmt, raw, text, value):
  """The page's text for `value` (its data-value `raw`) as the page's format `fmt` has it."""
  if value is None:
    assert raw == '' and text == '–', stat
    return
  if fmt == 'text':
    assert raw == text == str(value), stat
    return
  assert float(raw) == pytest.approx(value, rel=1e-12, abs=1e-15), stat
  if fmt == 'time':
    assert text.strip(), stat
    return
  number = float(re.sub(r'[$,%]|ms', '', text).strip())
  if fmt == 'int':
    assert number == round(value), stat
  elif fmt == 'usd':
    assert number == pytest.approx(value, rel=1e-3, abs=5e-3 if abs(value) >= 100 else 0), stat
  elif fmt == 'pct':
    assert number == pytest.approx(100 * value, abs=0.051), stat
  elif fmt == 'ms':
    digits = 0.0051 if value < 10 else 0.051 if value < 1000 else 0.51   # as the page rounds
    assert text.endswith(' ms') and number == pytest.approx(value, abs=digits), stat
  else:
    raise AssertionError(f'{stat}: unknown format {fmt!r}')


def test_the_dashboard_draws_what_v1_stats_says(serve_workdir, tmp_path):
  reason = browser.missing()
  if reason:
    pytest.skip(f'the dashboard\'s browser test needs headless Chromium: {reason}')
  from selenium.webdriver.support.ui import WebDriverWait
  second = tmp_path / 'run1'   # another version of the router: a copy, a checkpoint touched
  shutil.copytree(serve_workdir, second)
  first = sorted(p for p in (second / 'checkpoints').rglob('*') if p.is_file())[0]
  os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
  names = json.loads((serve_workdir / 'router.json').read_text())['model_names']
  prices = {n: (0.1 * 3**i, 0.4 * 3**i) for i, n in enumerate(names)}
  flags = (f'--decisions={tmp_path / "log"}', '--explore=0.3', '--seed=5', '--stats_bucket_s=1',
           '--max_batch=8')
  with running_server(serve_workdir, tmp_path, *flags, prices=prices) as (base, upstreams, _, _):
    with httpx.Client(base_url=base, headers=auth(), timeout=60) as http:
      ids = traffic(http, 1.5, 'warm')
      top = http.post('/v1/route', json={'query': QUERIES[0], 'explore': False}).json()['model']
      upstreams.mode[slug(top)] = 'down'   # its requests fall back to the next model
      ids += traffic(http, 1.5, 'down')
      upstreams.mode.clear()
      score(http, ids, 0)
      reload = http.post('/admin/reload', json={'workdir': str(second)})
      assert reload.status_code == 200, reload.text
      after = traffic(http, 1.5, 'after')
      score(http, after, 2)
      stats = http.get('/v1/stats').json()
      assert stats['fallbacks'] > 0 and stats['explored'] > 0 and stats['feedback']
      assert [r['version'] for r in stats['reloads']] == [reload.json()['version']]

      driver = browser.chromium(1400, 2200)
      try:
        driver.get(f'{base}/dashboard?token={TOKEN}&range=all')
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            'return window.dashboard && window.dashboard.refreshes > 0'))
        # The token went into an HttpOnly, SameSite cookie and out of the address bar.
        assert driver.current_url == f'{base}/dashboard?range=all'
        cookies = driver.get_cookies()
        assert [c['name'] for c in cookies] == ['entrorouter_dashboard']
        assert cookies[0]['httpOnly'] and cookies[0]['sameSite'] == 'Strict'
        assert TOKEN not in cookies[0]['value']

        # The numbers on the page are /v1/stats's (no traffic since: the same totals).
        shown = driver.execute_script('return window.dashboard.last')
        stats = http.get('/v1/stats').json()
        for key in TOTALS:
          assert shown[key] == stats[key], key
        fields = driver.execute_script(
            "return [...document.querySelectorAll('[data-stat]')].map(e => "
            "[e.dataset.stat, e.dataset.format, e.dataset.value, e.textContent])")
        assert len(fields) >= 15
        for stat, fmt, raw, text in fields:
          check_shown(stat, fmt, raw, text, get(stats, stat))
        rows = driver.execute_script("return [...document.querySelectorAll('#feedback tbody tr')]"
                                     ".map(r => [...r.cells].map(c => c.textContent))")
        assert {r[0]: (int(r[1]), float(r[2])) for r in rows} == {   # means to 3 places
            m: (f['count'], pytest.approx(f['mean'], abs=5.1e-4))
            for m, f in stats['feedback'].items()}

        # Every chart drew data points, and the reload's marker.
        for chart in CHARTS:
          drawn = driver.execute_script('return window.dashboard.drawn(arguments[0])', chart)
          assert drawn['points'] > 0 and drawn['pixels'] > 20, (chart, drawn)
          assert drawn['markers'] == 1, (chart, drawn)

        # Nothing came from elsewhere, and nothing went wrong in the page.
        loaded = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(base + '/') for u in loaded), loaded
        errors = [e for e in driver.get_log('browser') if e['level'] == 'SEVERE']
        assert not errors, errors
        driver.save_screenshot(str(tmp_path / 'dashboard.png'))
        assert (tmp_path / 'dashboard.png').stat().st_size > 10_000

        # The page keeps itself up to date: one more request shows within a refresh or two.
        traffic(http, 0.01, 'late')
        WebDriverWait(driver, 15).until(lambda d: d.execute_script(
            'return window.dashboard.last.completions') == stats['completions'] + 1)
      finally:
        driver.quit()
