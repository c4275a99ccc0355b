"""The trained policy at inference time: pi(m|x) for queries, and loading from a workdir.

  router = load_router('workdirs/rl')
  probs = router.probs(['How do I reverse a list in Python?'])   # float32[1, K]
  success, c_bar = router.scores([...])    # utility head: route by argmax success - lambda c_bar

A training run leaves in its workdir: config.json, tokenizer.model (token
backbones), stage0.pkl (the query space and the training table of Stage 0),
router.json (model names, strongest model, c_ref, mean normalised cost per
model, final stage, feature size) and the checkpoints; this module needs
nothing else, and imports nothing of the trainer (workdir.py reads those
files). `python -m entrorouter_jax.calibrate` may add calibration.json: the
cost weight (or threshold) that hits a budget on a traffic sample, which
routing then uses by default. A workdir `python -m entrorouter_jax.add_model`
wrote holds added_models.json: models added after the network's outputs, or
hidden from routing (entrorouter_jax/added_models.py); router.json then names
the models routed, and Stage 0's tables have a column for every one of them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from entrorouter_jax import added_models, capability, paths, sharding, state as state_lib
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax import neighbours
from entrorouter_jax.layers import bucket, width_bucket, width_buckets
from entrorouter_jax.policy import batched, is_utility, make_forward, policy_arrays
from entrorouter_jax.workdir import RouterError, load_stage0, read_calibration


@dataclasses.dataclass
class Router:
  """A trained router: tokenizer + policy parameters + what routing needs to know."""
  config: ml_collections.ConfigDict
  tokenizer: object               # None for the embeddings backbone
  model_names: list[str]
  strongest: int
  c_ref: float
  model_costs: np.ndarray        # mean normalised training cost per model, float[K]
  params: object
  mesh: object
  forward: object
  stage0: Optional[workdir_lib.Stage0] = None  # where routing needs Stage 0
  calibration: Optional[dict] = None  # DIR/calibration.json: {'cost_weight'} or {'threshold'}
  # DIR/added_models.json's columns (None: the network's outputs are the models). Stage 0's
  # tables (anchor_tables, knn_table, the `tables` routing takes) then have a column per
  # column there; probs, scores and model_names cover the routed ones (`visible`).
  columns: Optional[added_models.Columns] = None
  _knn: Optional[capability.KnnTable] = dataclasses.field(default=None, repr=False)

  @property
  def needs_stage0(self) -> bool:
    return needs_stage0(self.config)

  def features(self, queries: Sequence[str]) -> np.ndarray:
    """Stage 0's query space for new queries: float32[N, D]."""
    return self.stage0.space.transform(list(queries))

  def anchor_tables(self, queries: Sequence[str], feats=None):
    """(p_hat, c_bar) float32[N, K] for new queries: Stage 0's kNN over the
    training table (zeros where the policy reads neither); with added models, one
    column per column of added_models.json (`visible` keeps the routed ones)."""
    k = len(self.model_names)
    if not self.needs_stage0:
      zeros = np.zeros((len(queries), k), np.float32)
      return zeros, zeros
    feats = self.features(queries) if feats is None else feats
    return self.knn_table().estimates(feats)

  def visible(self, table) -> np.ndarray:
    """The routed models' columns of a Stage-0 table float[N, C] (anchor_tables' layout):
    float[N, K] in model_names' order (the table itself without added models)."""
    return table if self.columns is None else np.asarray(table)[:, self.columns.visible]

  def knn_table(self) -> capability.KnnTable:
    """Stage 0's training table, prepared once for routing's kNN estimates."""
    if self._knn is None:
      s0, anchor = self.stage0, self.config.anchor
      self._knn = capability.KnnTable(
          s0.train_feats, s0.train_outcomes, s0.train_mask, s0.train_cost_hat,
          s0.train_tasks, k=anchor.k, alpha=anchor.alpha, prior=anchor.prior,
          **neighbours.search_settings(anchor))
      if self._knn.search == 'exact':   # ivf scores its cells in NumPy: no device copy
        self._knn.exact_search = device_neighbours(self._knn.x)
    return self._knn

  def _run(self, queries: Sequence[str], cost_weight: Optional[float], tables, feats) -> dict:
    queries = list(queries)
    for i, q in enumerate(queries):
      if not isinstance(q, str) or not q.strip():
        raise RouterError(f'query {i + 1} is empty; expected a non-empty string')
    lam = self.default_cost_weight if cost_weight is None else float(cost_weight)
    if self.tokenizer is None:
      feats = self.features(queries) if feats is None else np.asarray(feats, np.float32)
      inputs = {'features': feats}
    else:
      max_len = self.config.data.max_len
      tokens, mask = self.tokenizer.encode_batch(queries, max_len, self.config.data.truncate)
      # Cut to the width bucket of the longest query: padding (on the right)
      # never changes the real tokens' states, and short queries cost less.
      width = width_bucket(int(mask.sum(1).max(initial=1)), max_len)
      inputs = {'tokens': tokens[:, :width], 'token_mask': mask[:, :width]}
    p_hat, c_bar = tables if tables is not None else self.anchor_tables(
        queries, inputs.get('features'))
    if self.columns is not None:   # the network reads its own columns; the rest come after
      k0 = self.columns.network_columns
      out = batched(self.forward, self.params, self.mesh, self.config.eval_batch_size,
                    policy_arrays(inputs, np.asarray(p_hat)[:, :k0], np.asarray(c_bar)[:, :k0],
                                  lam))
      feats = inputs.get('features') if feats is None else feats
      feats = self.features(queries) if feats is None else feats
      return self.columns.route(out['success'], c_bar, lam, feats)
    out = batched(self.forward, self.params, self.mesh, self.config.eval_batch_size,
                  policy_arrays(inputs, p_hat, c_bar, lam))
    out['c_bar'] = np.asarray(c_bar, np.float32)
    return out

  def probs(self, queries: Sequence[str], cost_weight: Optional[float] = None,
            tables: Optional[tuple] = None, feats=None) -> np.ndarray:
    """pi(m|x) for each query, float32[N, K], at cost weight lambda (default: the trained one).

    `tables` = (p_hat, c_bar) and `feats` (Stage 0's query space) for these
    queries where they are already known (an evaluation split's); otherwise
    they are computed here.
    """
    return self._run(queries, cost_weight, tables, feats)['probs']

  def scores(self, queries: Sequence[str], tables: Optional[tuple] = None,
             feats=None) -> tuple[np.ndarray, np.ndarray]:
    """Utility head: (s, c_bar) float32[N, K], the predicted success and expected
    normalised cost; the router at cost weight lambda picks argmax s - lambda c_bar."""
    if not is_utility(self.config):
      raise RouterError('scores() needs a router with model.head=utility')
    out = self._run(queries, None, tables, feats)
    return out['success'], out['c_bar']

  def sample(self, queries: Sequence[str], explore: Optional[float] = None,
             cost_weight: Optional[float] = None, seed=0, served=None,
             tables: Optional[tuple] = None, feats=None):
    """Routes each query to a model drawn at random instead of the argmax: the deployed,
    exploring policy whose choices, logged with their propensities, are feedback data.

    The distribution over the K models is (1 - explore) pi(.|x) + explore / K' over
    the served models (`served`: a bool[K] mask or a list of model names, default
    all; pi renormalised over them; K' of them), pi itself at the policy's own
    temperature where `explore` is None. Routers whose softmax head routes by a
    threshold rule (`choose`) sample from pi too: the threshold, the fallback and
    calibration.json's threshold play no part here, calibration.json's cost weight
    does (as in `probs`). `seed` is an int (or a numpy Generator to draw on); the
    same seed gives the same choices, and each row takes one uniform draw in turn,
    so routing in batches on one Generator gives the choices of one call.

    Returns (choice int[N], propensity float64[N], dist float64[N, K]) with
    propensity[i] = dist[i, choice[i]] (pi_b(logged model | x) of the log).
    """
    mask = self.served_mask(served)
    eps = check_explore(explore)
    if cost_weight is not None:
      cost_weight = self.check_cost_weight(cost_weight)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(
        check_seed(seed))
    dist = explore_distribution(self.probs(queries, cost_weight, tables, feats), mask, eps)
    choice = draw(dist, rng)
    return choice, dist[np.arange(len(choice)), choice], dist

  def served_mask(self, served=None, name: str = 'served') -> np.ndarray:
    """`served` (None: every model; a bool[K] mask; or model names) as a bool[K] mask
    over `model_names`; RouterError naming `name` for unknown names, a mask of the
    wrong shape or type, or no model served."""
    k = len(self.model_names)
    if served is None:
      return np.ones(k, bool)
    if isinstance(served, str):
      served = [served]
    if isinstance(served, np.ndarray):
      items = served.tolist() if served.dtype.kind in 'UO' else None
    else:
      items = list(served) if isinstance(served, (list, tuple, set, frozenset)) else None
    if items == []:
      raise RouterError(f'{name} serves no model; expected at least one of {self.model_names}')
    if items is not None and all(isinstance(v, str) for v in items):
      unknown = [v for v in items if v not in self.model_names]
      if unknown:
        raise RouterError(f'{name}: {unknown[0]!r} is not in the pool; expected names from '
                          f'{self.model_names}')
      mask = np.isin(np.asarray(self.model_names, object), items)
    else:
      mask = np.asarray(served)
      if mask.dtype != bool or mask.shape != (k,):
        raise RouterError(f'{name} is an array of {mask.dtype} with shape {mask.shape}; '
                          f'expected a bool mask of shape ({k},) or a list of model names '
                          f'from {self.model_names}')
    if not mask.any():
      raise RouterError(f'{name} serves no model; expected at least one of {self.model_names}')
    return mask

  def warm_up(self, max_batch: int) -> int:
    """Routes dummy queries at every shape up to `max_batch` queries can hit (the
    power-of-two batch buckets x the encoders' width buckets), so that no later
    call waits for a compile. Returns the number of calls made."""
    max_tokens = max(int(self.config.anchor.get('encoder_max_len', 0)),
                     int(self.config.data.max_len))
    words = warm_up_words(max_tokens)
    # A batch of n rows is padded to bucket(n) rows (policy.batched, the encoder).
    sizes = sorted({bucket(n) for n in range(1, max_batch + 1)})
    for size in sizes:
      for length in words:
        self.probs([' '.join(['the'] * length)] * size)
    return len(sizes) * len(words)

  @property
  def default_cost_weight(self) -> float:
    """lambda routing uses when none is given: the calibrated one, else the trained one."""
    if self.calibration and self.calibration.get('cost_weight') is not None:
      return float(self.calibration['cost_weight'])
    return self.trained_cost_weight

  @property
  def trained_cost_weight(self) -> float:
    return float(self.config.rl.cost_weight if 'rl' in self.config.stages
                 else self.config.sft.cost_weight)

  @property
  def default_threshold(self) -> float:
    """The threshold rule's default (`choose`): calibrated, else 1 (the top model)."""
    if self.calibration and self.calibration.get('threshold') is not None:
      return float(self.calibration['threshold'])
    return 1.0

  @property
  def moves_with_cost_weight(self) -> bool:
    """Whether lambda moves this router along its curve (utility head or lambda input)."""
    return is_utility(self.config) or bool(self.config.model.lambda_conditioned)

  def check_cost_weight(self, value, name: str = 'cost_weight') -> float:
    """`value` as a cost weight lambda to route at: a finite number >= 0 (not a bool) for a
    router that lambda moves; RouterError naming `name` (a field or a flag) otherwise."""
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
      try:
        number = float(value)
      except OverflowError:   # an integer beyond float's range
        number = None
    if number is None or not np.isfinite(number) or number < 0:
      shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + '...'
      raise RouterError(f'{name} is {shown}; expected a finite number >= 0')
    if not self.moves_with_cost_weight:
      raise RouterError(f'{name} needs a router with the utility head or a lambda-conditioned '
                        'one; this router routes by threshold')
    return number


def choose(probs: np.ndarray, model_costs: np.ndarray, threshold: float = 1.0,
           fallback: Optional[int] = None, min_confidence: float = 0.0):
  """The routing rule over pi(m|x) float[N, K]: the cheapest model whose probability is at
  least `threshold` x the top one (1: the top model), or `fallback` where the top
  probability is below `min_confidence`. Returns the indices int[N] and whether the
  fallback fired, bool[N]."""
  if not 0.0 < threshold <= 1.0:
    raise RouterError(f'--threshold={threshold}; expected a value in (0, 1]')
  eligible = probs >= threshold * probs.max(axis=1, keepdims=True)
  choice = np.argmin(np.where(eligible, model_costs[None, :], np.inf), axis=1)
  fell_back = np.zeros(len(probs), bool)
  if fallback is not None:
    fell_back = probs.max(axis=1) < min_confidence
    choice = np.where(fell_back, fallback, choice)
  return choice, fell_back


def check_explore(value, name: str = 'explore') -> float:
  """`value` as an exploration rate: None -> 0 (sample from pi), else a number in [0, 1]
  (not a bool); RouterError naming `name` (a field or a flag) otherwise."""
  if value is None:
    return 0.0
  number = None
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    try:
      number = float(value)
    except OverflowError:
      number = None
  if number is None or not 0.0 <= number <= 1.0:   # NaN fails both comparisons
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + '...'
    raise RouterError(f'{name} is {shown}; expected a number in [0, 1]')
  return number


def check_seed(value, name: str = 'seed') -> int:
  """`value` as a seed for numpy's Generator: an int >= 0 (not a bool); RouterError else."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + '...'
    raise RouterError(f'{name} is {shown}; expected an integer >= 0')
  return int(value)


def explore_distribution(probs: np.ndarray, served: np.ndarray, explore: float) -> np.ndarray:
  """The exploring policy, float64[N, K]: (1 - explore) pi_s + explore / K' on the K'
  served models (bool[K]), 0 elsewhere, where pi_s is pi(m|x) float[N, K] renormalised
  over the served models (uniform over them in a row where pi gives them no mass)."""
  probs = np.asarray(probs, np.float64)
  served = np.asarray(served, bool)
  uniform = np.broadcast_to(served / served.sum(), probs.shape)
  on_served = np.where(served[None, :], probs, 0.0)
  total = on_served.sum(axis=1, keepdims=True)
  pi_s = np.where(total > 0, on_served / np.where(total > 0, total, 1.0), uniform)
  return (1.0 - explore) * pi_s + explore * uniform


def draw(dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One index per row of dist float[N, K] (rows summing to 1), drawn with probability
  dist[i, k] by inverse CDF on one uniform per row, in row order: int[N]. A cell of
  probability 0 is never drawn."""
  dist = np.asarray(dist, np.float64)
  cdf = np.cumsum(dist, axis=1)
  u = rng.random(len(dist)) * cdf[:, -1]
  choice = (cdf <= u[:, None]).sum(axis=1)
  last = dist.shape[1] - 1 - np.argmax(dist[:, ::-1] > 0, axis=1)   # rounding at the top end
  return np.minimum(choice, last)


def device_neighbours(train_feats):
  """(q float32[b, D], k) -> int[b, k]: the exact k nearest training rows of
  each query, as neighbours.exact_neighbours finds them, computed on the
  default JAX device against copies of the training features.

  One query (what a router waits for on the request path) is screened: its
  search is a matrix-vector product over the whole table, bound by reading the
  table, so a float16 copy halves the time, and XLA keeps the w = min(N,
  2k + 16) best rows (lax.top_k). Query and table are first scaled to norm
  <= 1 (a positive scale keeps the query's order), so each screened similarity
  is within neighbours.half_precision_error(D) of the exact one; neighbours.
  screened_neighbours reranks the rows the screen cannot rule out by their
  exact float32 similarity, or searches exactly where the w rows do not
  provably hold them all (many near-ties). Batches take a float32 product on
  the device instead (XLA:CPU multiplies float16 matrices far slower than
  float32 ones), queries padded to a power-of-two bucket of rows (few
  compiles; HIGHEST precision, so that no accelerator rounds the inputs down).

  Neither runs in NumPy because of what comes after: OpenBLAS's worker threads
  keep spinning for a while after each product, and on a machine with few
  cores the next query's encoder forward then runs slower
  (benchmarks/routing_speed.py's route_encoder figure, benchmarks/RESULTS.md).
  """
  x = np.ascontiguousarray(train_feats, np.float32)
  n, dim = x.shape
  x32 = jax.device_put(x)
  x_scale = float(np.linalg.norm(x, axis=1).max()) or 1.0
  x16 = jax.device_put((x / x_scale).astype(np.float16))
  eps = neighbours.half_precision_error(dim) * (1 + 2.0 ** -16)   # norms rounded a hair past 1
  product = jax.jit(lambda q, x: jnp.dot(q, x.T, precision=jax.lax.Precision.HIGHEST))
  screens = {}

  def screen(width):
    if width not in screens:
      def run(q, x16):
        sims = jnp.dot(q.astype(jnp.float16), x16.T, preferred_element_type=jnp.float32)
        return jax.lax.top_k(sims, width)
      screens[width] = jax.jit(run)
    return screens[width]

  def similarities(q):
    padded = np.zeros((bucket(len(q)), dim), np.float32)
    padded[:len(q)] = q
    return np.asarray(product(padded, x32))[:len(q)]

  def search(q, k: int):
    q = np.asarray(q, np.float32)
    if len(q) != 1:
      return neighbours.exact_neighbours(q, x, k, similarities)
    norm = float(np.linalg.norm(q))
    vals, idx = screen(min(n, 2 * k + 16))(q / (norm if norm > 0 else 1.0), x16)
    return neighbours.screened_neighbours(q, x, np.asarray(vals), np.asarray(idx), k, eps,
                                          similarities)

  return search


def warm_up_words(max_tokens: int) -> list[int]:
  """Words per dummy text of `Router.warm_up`: one text in every width bucket up
  to `max_tokens` tokens (layers.width_buckets), and one longer than that. A
  text of w - 4 words ('the the ...') is w - 4 to w - 1 tokens (one per word,
  plus the tokenizer's markers): in bucket w, above the one below (<= w - 8)."""
  return [max(1, w - 4) for w in width_buckets(max_tokens)] + [2 * max_tokens]


def final_checkpoint(workdir, config) -> tuple:
  """The checkpoint directory and step of the last stage that has one."""
  for stage in reversed(workdir_lib.stage_names(config)):
    path = workdir_lib.stage_checkpoints(workdir, stage)
    if path.is_dir():
      manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
      if manager.latest_step() is not None:
        return path, manager.latest_step()
  raise RouterError(f'{workdir}: no checkpoint under {workdir / "checkpoints"}; '
                    'expected a finished training run (python -m entrorouter_jax.train)')


def needs_stage0(config) -> bool:
  """Whether routing a new query needs Stage 0 (its space and kNN tables)."""
  from entrorouter_jax import backbones
  return (is_utility(config) or bool(config.model.anchor_in_logits)
          or backbones.kind_of(config.model) == 'embeddings')


def load_router(workdir, mesh=None) -> Router:
  """Loads the router a training run left in `workdir`."""
  workdir = paths.as_path(workdir)
  missing = workdir_lib.missing_run_files(workdir)
  if missing:
    raise RouterError(f'{workdir}: {missing[0].name} is missing; expected the workdir of a '
                      'finished training run (python -m entrorouter_jax.train --workdir=...)')
  config = workdir_lib.read_config(workdir)
  info = workdir_lib.read_router_info(workdir)
  try:
    tok = state_lib.load_tokenizer(config, workdir)
  except FileNotFoundError as e:
    raise RouterError(f'{workdir}: {e}; expected the workdir of a finished training run') from e
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  names = info.model_names
  added = workdir_lib.read_added_models(workdir)
  if added is not None and added.model_names != list(names):
    raise RouterError(f'{workdir}: router.json names the models {list(names)}, but '
                      f'{workdir_lib.ADDED_MODELS} routes {added.model_names}; expected the '
                      'same (a workdir python -m entrorouter_jax.add_model wrote)')
  if added is not None and not is_utility(config):
    raise RouterError(f'{workdir}: {workdir_lib.ADDED_MODELS} needs a router with '
                      'model.head=utility')

  path, step = final_checkpoint(workdir, config)
  stage = 'rl' if path.name == 'rl' else 'sft'
  network_models = names if added is None else added.network_models
  graphdef, target = state_lib.abstract_state(config, stage, state_lib.vocab_size(tok),
                                              len(network_models), mesh, info.feature_dim)
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  model = nnx.merge(graphdef, restored['state']['nnx'])[state_lib.MODEL]
  model_graphdef, params = nnx.split(model)
  stage0 = load_stage0(workdir) if needs_stage0(config) else None
  columns = None if added is None else added_models.Columns.make(
      added, float(model.temperature()))
  return Router(config=config, tokenizer=tok, model_names=names, strongest=info.strongest,
                c_ref=info.c_ref, model_costs=np.asarray(info.model_costs),
                params=params, mesh=mesh, forward=make_forward(config, model_graphdef, mesh),
                stage0=stage0, calibration=read_calibration(workdir), columns=columns)
