"""The trained policy at inference time: pi(m|x) for queries, and loading from a workdir.

  router = load_router('workdirs/rl')
  probs = router.probs(['How do I reverse a list in Python?'])   # float32[1, K]

A training run leaves in its workdir: config.json, tokenizer.model,
stage0.pkl (the kNN space and tables), router.json (model names, strongest
model, c_ref, mean normalised cost per model, final stage) and the
checkpoints; this module needs nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from entrorouter_jax import objectives, paths, sharding
from entrorouter_jax.data import tokenizer as tokenizer_lib
from entrorouter_jax.model import RouterModel


class RouterError(RuntimeError):
  """A workdir or request the router cannot serve (missing checkpoint, unknown model...)."""


def policy_logits(model, batch, cost_weight, config, *, deterministic=True, rngs=None):
  """f_theta(x) / T, plus log A(m|x) when the anchor sits inside the policy (float32[B, K])."""
  cond = cost_weight if config.model.lambda_conditioned else None
  logits = model(batch['tokens'], batch['token_mask'], cond, deterministic=deterministic,
                 rngs=rngs) / config.model.temperature
  if config.model.anchor_in_logits:
    logits = logits + objectives.anchor_log_probs(batch['p_hat'], batch['c_bar'], cost_weight,
                                                  config.anchor.tau)
  return logits


def make_forward(config, model_graphdef, mesh):
  """A jitted (params, batch) -> pi(m|x), the batch sharded over the mesh's batch axes."""
  batch_sh = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(None, batch_sh), out_shardings=batch_sh)
  def forward(params, batch):
    model = nnx.merge(model_graphdef, params)
    return jax.nn.softmax(policy_logits(model, batch, batch['cost_weight'], config), -1)

  return forward


def policy_probs(forward, params, mesh, batch_size: int, tokens, token_mask, p_hat, c_bar,
                 cost_weight) -> np.ndarray:
  """pi(m|x) for every row: float32[N, K]; `cost_weight` is a scalar or float[N]."""
  n = len(tokens)
  unit = sharding.batch_divisor(mesh)
  bs = max(unit, (batch_size // unit) * unit)
  pad = (-n) % bs
  arrays = {'tokens': tokens, 'token_mask': token_mask, 'p_hat': p_hat, 'c_bar': c_bar,
            'cost_weight': np.broadcast_to(np.asarray(cost_weight, np.float32), (n,))}
  arrays = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in arrays.items()}
  batch_sh = sharding.batch_sharding(mesh)
  out = []
  with jax.set_mesh(mesh):
    for start in range(0, n + pad, bs):
      chunk = {k: jax.device_put(v[start:start + bs], batch_sh) for k, v in arrays.items()}
      out.append(np.asarray(jax.device_get(forward(params, chunk))))
  return np.concatenate(out)[:n]


def build_model(config, vocab_size: int, num_models: int, seed: int) -> RouterModel:
  return RouterModel(config.model, vocab_size=vocab_size, max_len=config.data.max_len,
                     num_models=num_models, rngs=nnx.Rngs(params=seed))


@dataclasses.dataclass
class Router:
  """A trained router: tokenizer + policy parameters + what routing needs to know."""
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  model_names: list[str]
  strongest: int
  c_ref: float
  model_costs: np.ndarray        # mean normalised training cost per model, float[K]
  params: object
  mesh: object
  forward: object
  stage0: Optional[dict] = None  # kNN space + training table, for anchor_in_logits

  def anchor_tables(self, queries: Sequence[str]):
    """(p_hat, c_bar) float32[N, K] for new queries (zeros unless the anchor is in the logits)."""
    k = len(self.model_names)
    if not self.config.model.anchor_in_logits:
      zeros = np.zeros((len(queries), k), np.float32)
      return zeros, zeros
    from entrorouter_jax import capability
    s0 = self.stage0
    feats = s0['space'].transform(list(queries))
    return capability.knn_estimates(
        s0['train_feats'], s0['train_outcomes'], s0['train_mask'], s0['train_cost_hat'],
        s0['train_tasks'], query_feats=feats, query_tasks=None, k=self.config.anchor.k,
        alpha=self.config.anchor.alpha, prior=self.config.anchor.prior)

  def probs(self, queries: Sequence[str], cost_weight: Optional[float] = None,
            tables: Optional[tuple] = None) -> np.ndarray:
    """pi(m|x) for each query, float32[N, K], at cost weight lambda (default: the trained one).

    `tables` = (p_hat, c_bar) for these queries where they are already known
    (an evaluation split's Stage-0 tables, which use the queries' tasks);
    otherwise, with the anchor in the logits, they are estimated here.
    """
    queries = list(queries)
    for i, q in enumerate(queries):
      if not isinstance(q, str) or not q.strip():
        raise RouterError(f'query {i + 1} is empty; expected a non-empty string')
    lam = self.default_cost_weight if cost_weight is None else float(cost_weight)
    tokens, mask = self.tokenizer.encode_batch(queries, self.config.data.max_len,
                                               self.config.data.truncate)
    p_hat, c_bar = tables if tables is not None else self.anchor_tables(queries)
    return policy_probs(self.forward, self.params, self.mesh, self.config.eval_batch_size,
                        tokens, mask, p_hat, c_bar, lam)

  @property
  def default_cost_weight(self) -> float:
    return float(self.config.rl.cost_weight if 'rl' in self.config.stages
                 else self.config.sft.cost_weight)


def final_checkpoint(workdir, config) -> tuple:
  """The checkpoint directory and step of the last stage that has one."""
  for stage in reversed([s.strip() for s in config.stages.split(',') if s.strip()]):
    path = paths.as_path(workdir) / 'checkpoints' / stage
    if path.is_dir():
      manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
      if manager.latest_step() is not None:
        return path, manager.latest_step()
  raise RouterError(f'{workdir}: no checkpoint under {workdir / "checkpoints"}; '
                    'expected a finished training run (python -m entrorouter_jax.train)')


def load_router(workdir, mesh=None) -> Router:
  """Loads the router a training run left in `workdir`."""
  workdir = paths.as_path(workdir)
  info_path = workdir / 'router.json'
  for path in (workdir / 'config.json', info_path):
    if not path.is_file():
      raise RouterError(f'{workdir}: {path.name} is missing; expected the workdir of a '
                        'finished training run (python -m entrorouter_jax.train --workdir=...)')
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  info = json.loads(info_path.read_text())
  from entrorouter_jax import train   # train imports this module
  try:
    tok = train.load_tokenizer(config, workdir)
  except FileNotFoundError as e:
    raise RouterError(f'{workdir}: {e}; expected the workdir of a finished training run') from e
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  names = info['model_names']

  path, step = final_checkpoint(workdir, config)
  graphdef, build, shardings = train.abstract_train_state(config, path.name, tok.vocab_size,
                                                          len(names), mesh)
  target = jax.tree.map(lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
                        {'nnx': nnx.state(nnx.eval_shape(build)), 'step': jnp.zeros((), jnp.int32),
                         'rng': jax.random.key_data(jax.random.key(0)),
                         'alpha': jnp.zeros(()), 'h0': jnp.zeros(())}, shardings)
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  model_graphdef, params = nnx.split(nnx.merge(graphdef, restored['state']['nnx'])[0])
  stage0 = None
  if config.model.anchor_in_logits:
    with (workdir / 'stage0.pkl').open('rb') as f:
      stage0 = pickle.load(f)
    if 'train_feats' not in stage0:
      raise RouterError(f'{workdir}/stage0.pkl lacks the training table that anchor_in_logits '
                        'needs at routing time; retrain with this version')
  return Router(config=config, tokenizer=tok, model_names=names, strongest=info['strongest'],
                c_ref=info['c_ref'], model_costs=np.asarray(info['model_costs']),
                params=params, mesh=mesh, forward=make_forward(config, model_graphdef, mesh),
                stage0=stage0)
