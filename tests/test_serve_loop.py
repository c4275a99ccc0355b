"""The serving loop end to end, as a user runs it: the tiny router of conftest's
`serve_workdir` (R0) served in a subprocess with exploration and a decision log; routed
chat completions through the official `openai` client; a scripted judge scoring every
answer over POST /v1/feedback; `python -m entrorouter_jax.learn` making the next router
from the log; POST /admin/reload putting it live; twice (R0 -> R1 -> R2).

The judge's world has one rule to learn: math questions are answered well by the math
specialist only (R0, trained for 40 steps, sends every question to `frontier`). After the two
cycles the argmax router must send held-out math questions to the math specialist more
often than R0 did.

The server keeps one --decisions directory for its whole life (a reload does not change
it), so the second `learn` reads both cycles' decisions, each row with the propensity of
the router that logged it. The off-policy stage runs with a higher learning rate and fewer
steps than configs/feedback.py's (LEARN): at its 3e-5 the tiny router's success head does
not move in 600 steps. learn's gate judges the new router on the log's test split (about
100 rows a cycle), so now and then it refuses a router that did learn the rule; the test
then prints the estimate and writes that router with --force (training is seeded: the
same router)."""

import concurrent.futures
import os
import re
import subprocess
import sys
import time

import httpx

from conftest import REPO_ROOT
from entrorouter_jax.data import synthetic
from entrorouter_jax.serving import version as version_lib
from serving import auth, client, running_server, slug

ENV = dict(os.environ, JAX_PLATFORMS='cpu')
SPECIAL = 'math-specialist'   # the one model that answers math questions well
PER_CYCLE = 1000              # routed chat completions per cycle, half of them math
HELD_OUT = 40                 # questions of each kind only /v1/route sees, before and after
CLIENTS = 16                  # concurrent users
# The off-policy stage (configs/feedback.py's keys): 300 steps at 1e-2 rather than 600 at
# 3e-5, batches of 32.
LEARN = {'rl.num_steps': 300, 'rl.learning_rate': 1e-2, 'rl.batch_size': 32,
         'log_every': 100, 'eval_batch_size': 64}


def judge(model: str, kind: str, i: int) -> float:
  """The scripted judge's score of `model`'s answer to the i-th question, of `kind`, from a
  full-information table: SPECIAL ~0.9 on math and every other model ~0.2 there; on the
  other questions SPECIAL ~0.3 and the others ~0.6. A little noise, fixed by i."""
  if kind == 'math':
    mean = 0.9 if model == SPECIAL else 0.2
  else:
    mean = 0.3 if model == SPECIAL else 0.6
  return round(mean + 0.05 * ((i * 7919) % 21 - 10) / 10, 4)


def questions():
  """(traffic of both cycles: [(text, kind)], math and other alternating; held-out math
  questions; held-out other questions), texts of the synthetic world the tiny router was
  trained on (its generator, more rows)."""
  data = synthetic.generate(seed=0, num_train=7000, num_validation=1, num_test=1)
  math = [t for t, task in zip(data.queries.tolist(), data.tasks) if task == 'math']
  other = [t for t, task in zip(data.queries.tolist(), data.tasks) if task != 'math']
  assert len(math) >= PER_CYCLE + HELD_OUT   # PER_CYCLE / 2 math questions a cycle, two cycles
  traffic = [pair for m, o in zip(math[:PER_CYCLE], other[:PER_CYCLE])
             for pair in ((m, 'math'), (o, 'other'))]
  return traffic, math[-HELD_OUT:], other[-HELD_OUT:]


def share_to_special(http, base, queries) -> float:
  """The share of `queries` the live router's argmax sends to SPECIAL (POST /v1/route,
  "explore": false)."""

  def route(query):
    r = http.post(f'{base}/v1/route', json={'query': query, 'explore': False}, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()['model']

  with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
    chosen = list(pool.map(route, queries))
  return sum(m == SPECIAL for m in chosen) / len(chosen)


def serve_traffic(http, base, traffic, offset):
  """Sends `traffic` as routed chat completions (CLIENTS at a time, the openai client); the
  judge scores each answer by the reply's "model" and posts the score to /v1/feedback.
  Returns how often SPECIAL answered a math question, and the math questions."""
  api = client(base)

  def one(i):
    text, kind = traffic[i]
    reply = api.chat.completions.create(model='router',
                                        messages=[{'role': 'user', 'content': text}])
    assert reply.choices[0].message.content == f'answer from up-{slug(reply.model)}'
    r = http.post(f'{base}/v1/feedback', headers=auth(),
                  json={'id': reply.id, 'score': judge(reply.model, kind, offset + i)})
    assert r.status_code == 200 and r.json() == {'accepted': 1}, r.text
    return kind == 'math' and reply.model == SPECIAL

  with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
    special = sum(pool.map(one, range(len(traffic))))
  return special, sum(kind == 'math' for _, kind in traffic)


def learn(workdir, decisions, out, data_dir, force=False):
  """`python -m entrorouter_jax.learn`; returns its printed verdict."""
  got = subprocess.run(
      [sys.executable, '-m', 'entrorouter_jax.learn', f'--workdir={workdir}',
       f'--decisions={decisions}', f'--out={out}', f'--config.data.data_dir={data_dir}',
       *(f'--config.{k}={v}' for k, v in LEARN.items()), *(['--force'] if force else [])],
      cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert got.returncode == 0, got.stderr[-3000:]
  return got.stdout


def reload(http, base, workdir):
  """POST /admin/reload; checks the answer and that /healthz names the new version."""
  r = http.post(f'{base}/admin/reload', json={'workdir': str(workdir)}, headers=auth(),
                timeout=120)
  assert r.status_code == 200, r.text
  version = version_lib.router_version(workdir)
  assert r.json()['version'] == version
  health = http.get(f'{base}/healthz').json()
  assert health['status'] == 'ok' and health['version'] == version, health


def test_two_learn_and_reload_cycles_teach_the_router_the_judges_rule(serve_workdir, tmp_path):
  traffic, held_math, held_other = questions()
  log = tmp_path / 'decisions'
  live = serve_workdir
  with running_server(serve_workdir, tmp_path, '--explore=0.2', f'--decisions={log}') as (
      base, _, names, _), httpx.Client(timeout=60) as http:
    assert SPECIAL in names
    shares = [(share_to_special(http, base, held_math), share_to_special(http, base, held_other))]
    for cycle in (1, 2):
      part = slice((cycle - 1) * PER_CYCLE, cycle * PER_CYCLE)
      started = time.perf_counter()
      special, math = serve_traffic(http, base, traffic[part], part.start)
      print(f'cycle {cycle}: {special} of {math} math questions answered by {SPECIAL} '
            f'({time.perf_counter() - started:.1f} s)')
      out = tmp_path / f'R{cycle}'
      started = time.perf_counter()
      said = learn(live, log, out, tmp_path / 'tfds')
      print(f'{said}learn: {time.perf_counter() - started:.1f} s')
      assert re.search(r'dropped: .*failed \(status != 200\) 0, fallbacks 0', said), said
      if 'not written' in said:   # the gate refused: the same training, written anyway
        out = tmp_path / f'R{cycle}-forced'
        print(learn(live, log, out, tmp_path / 'tfds', force=True))
      started = time.perf_counter()
      reload(http, base, out)
      live = out
      print(f'reload: {time.perf_counter() - started:.1f} s')
      shares.append((share_to_special(http, base, held_math),
                     share_to_special(http, base, held_other)))
      print(f'after cycle {cycle}: held-out math / other questions sent to {SPECIAL}: '
            f'{shares[-1][0]:.3f} / {shares[-1][1]:.3f} (R0: {shares[0][0]:.3f} / '
            f'{shares[0][1]:.3f})')
    metrics = http.get(f'{base}/metrics', headers=auth()).text
  # No request failed, here or in the server's own count.
  statuses = re.findall(r'^entrorouter_requests_total\{endpoint="([^"]+)",status="(\d+)"\}',
                        metrics, re.M)
  assert statuses and {s for _, s in statuses} == {'200'}, statuses
  assert not re.search(r'^entrorouter_(upstream_errors|fallbacks)_total\{[^}]*\} [1-9]',
                       metrics, re.M)
  (before, _), (after, after_other) = shares[0], shares[-1]
  assert after > before, shares
  # The rule, not a blanket switch: the other questions stay with the other models more.
  assert after_other < after, shares
