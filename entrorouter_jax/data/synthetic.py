"""`synthetic_routing`: a deterministic routing world generated from a seed.

This is the embedded default data set: no download, and its ground truth is
known, so the Bayes-optimal expected utility of any cost weight can be computed
exactly. It is synthetic; the real data sets live in ../shared/data.

The world:
- 7 models, from a $0.05/$0.10 per-1M-token "nano" model to a $15/$60
  "frontier" model (600x on output tokens), with two cheap specialists that beat
  the frontier model on their own domain (math, coding).
- 6 domains x 8 subtopics x 5 difficulty levels. Each query's text names its
  subtopic (hence its domain) and its difficulty level in words.
- Outcomes follow an item-response model:
    P(correct | x, m) = sigmoid(a * (theta[m, domain(x)] - b(x))),
  b(x) = level difficulty + subtopic offset. Level-5 queries are, in practice,
  solved only by the frontier model.
- Cost = input_tokens * price_in + output_tokens * price_out (per 1M tokens);
  output length depends on the model's verbosity, the domain and the level.
Outcomes are Bernoulli draws from P; `true_prob` keeps P itself.
"""

from __future__ import annotations

import numpy as np

from entrorouter_jax.data.dataset import ModelInfo, RoutingDataset

# name, price_in, price_out ($ per 1M tokens), general ability, verbosity
MODELS = (
    ('nano', 0.05, 0.10, -0.6, 0.6),
    ('small', 0.15, 0.60, 0.2, 0.8),
    ('math-specialist', 0.20, 0.40, 0.4, 1.0),
    ('code-specialist', 0.30, 0.90, 0.6, 1.2),
    ('medium', 1.00, 3.00, 1.3, 1.0),
    ('large', 3.00, 15.00, 2.0, 1.1),
    ('frontier', 15.00, 60.00, 4.0, 1.3),
)

DOMAINS = {
    'math': ('algebra', 'geometry', 'probability', 'calculus', 'number theory',
             'combinatorics', 'linear algebra', 'statistics'),
    'coding': ('python lists', 'sql joins', 'recursion', 'regular expressions',
               'concurrency', 'sorting algorithms', 'memory leaks', 'unit testing'),
    'law': ('contract breach', 'tenant rights', 'copyright', 'negligence',
            'employment law', 'privacy regulation', 'wills and estates', 'patents'),
    'medicine': ('diabetes', 'hypertension', 'vaccines', 'antibiotics',
                 'sleep apnea', 'migraines', 'nutrition', 'cardiology'),
    'history': ('the roman empire', 'the cold war', 'the silk road', 'the renaissance',
                'the industrial revolution', 'ancient egypt', 'the ming dynasty',
                'world war one'),
    'creative': ('a short poem', 'a fairy tale', 'a product slogan', 'a wedding toast',
                 'a haiku', 'a mystery plot', 'song lyrics', 'a limerick'),
}
# Domain where a specialist beats the frontier model, by how much (logits).
SPECIALISTS = {'math-specialist': ('math', 0.6), 'code-specialist': ('coding', 0.6)}

LEVELS = ('basic', 'introductory', 'intermediate', 'advanced', 'expert')
LEVEL_DIFFICULTY = np.array([-2.0, -0.5, 1.0, 2.5, 3.6])
DISCRIMINATION = 2.0
DOMAIN_OUTPUT_TOKENS = {'math': 250, 'coding': 350, 'law': 300, 'medicine': 250,
                        'history': 200, 'creative': 150}

_OPENERS = ('Please answer this {level} question about {topic}.',
            'I need help with an {level} problem on {topic}.',
            'Here is a {level} {domain} task concerning {topic}.',
            'Can you solve this {level} exercise in {topic}?',
            'Give a {level} level explanation of {topic}.')
_DETAILS = ('Consider case number {n} with {m} parts.',
            'The example involves {n} items and {m} constraints.',
            'Keep the answer short; it is for report {n}.',
            'My teacher gave this as homework {n} of {m}.',
            'Assume {n} inputs and a budget of {m} units.',
            '')


def _world(seed: int):
  """Per-model, per-domain ability theta[K, D] and subtopic offsets [D, 8]."""
  rng = np.random.default_rng(seed)
  domains = list(DOMAINS)
  theta = np.array([[m[3] for _ in domains] for m in MODELS], dtype=np.float64)
  theta += rng.normal(0.0, 0.3, size=theta.shape)
  names = [m[0] for m in MODELS]
  frontier = names.index('frontier')
  for name, (domain, margin) in SPECIALISTS.items():
    d = domains.index(domain)
    theta[names.index(name), d] = theta[frontier, d] + margin
  offsets = rng.uniform(-0.4, 0.4, size=(len(domains), 8))
  return theta, offsets


def generate(seed: int = 0, num_train: int = 20_000, num_validation: int = 2_000,
             num_test: int = 2_000) -> RoutingDataset:
  """Generates the synthetic routing world (deterministic in all arguments)."""
  theta, offsets = _world(seed)
  rng = np.random.default_rng([seed, 1])
  domains = list(DOMAINS)
  n = num_train + num_validation + num_test
  dom = rng.integers(0, len(domains), size=n)
  sub = rng.integers(0, 8, size=n)
  lev = rng.integers(0, len(LEVELS), size=n)

  queries, in_tokens = [], np.zeros(n)
  for i in range(n):
    domain = domains[dom[i]]
    level = LEVELS[lev[i]]
    opener = _OPENERS[rng.integers(len(_OPENERS))]
    detail = _DETAILS[rng.integers(len(_DETAILS))]
    text = opener.format(level=level, topic=DOMAINS[domain][sub[i]], domain=domain)
    text = (text + ' ' + detail.format(n=rng.integers(2, 100), m=rng.integers(2, 20))).strip()
    queries.append(text)
    in_tokens[i] = np.ceil(len(text) / 4) + 20  # + a short system prompt

  difficulty = LEVEL_DIFFICULTY[lev] + offsets[dom, sub]                     # [N]
  true_prob = 1.0 / (1.0 + np.exp(-DISCRIMINATION * (theta[:, dom].T - difficulty[:, None])))
  outcomes = (rng.uniform(size=true_prob.shape) < true_prob).astype(np.float32)

  verbosity = np.array([m[4] for m in MODELS])
  base_out = np.array([DOMAIN_OUTPUT_TOKENS[d] for d in domains])[dom]
  out_tokens = np.round(base_out[:, None] * verbosity[None, :] * (1.0 + 0.25 * lev[:, None]))
  price_in = np.array([m[1] for m in MODELS])
  price_out = np.array([m[2] for m in MODELS])
  costs = (in_tokens[:, None] * price_in + out_tokens * price_out) / 1e6

  splits = np.array(['train'] * num_train + ['validation'] * num_validation + ['test'] * num_test)
  return RoutingDataset(
      name='synthetic_routing',
      models=[ModelInfo(m[0], m[1], m[2]) for m in MODELS],
      ids=np.array([f'synthetic-{i:06d}' for i in range(n)]),
      queries=np.array(queries),
      tasks=np.array(domains)[dom],
      splits=splits,
      outcomes=outcomes,
      outcome_mask=np.ones_like(outcomes, dtype=bool),
      costs=costs.astype(np.float32),
      true_prob=true_prob.astype(np.float32),
      source=f'synthetic_routing(seed={seed})',
  ).validate()
