"""The train state, its optimizer and the tokenizer: what training and routing share.

Routing (router.py) restores a checkpoint into `abstract_state` without
importing the trainer; training (train.py) creates the same structure with
`create_state`. A stage's state:

  {'nnx': nnx.State of (model, optimizer), 'step': int32, 'rng': key data,
   'alpha': entropy coefficient, 'h0': entropy after Stage 1,
   'best_score': float32, 'since_best': int32, 'done': int32,
   'best': the model parameters the stage's selection liked best (only where
           the stage selects, see `selects`)}

a plain dict, so that checkpoints keep that layout; `model_params` and
`set_model_params` name its model's part (in the state or its shardings).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entrorouter_jax import backbones, paths, sharding
from entrorouter_jax.data import tokenizer as tokenizer_lib
from entrorouter_jax.policy import build_model


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, bad stage list, missing checkpoint)."""


def load_tokenizer(config, workdir, train_texts=None):
  """None for the embeddings backbone (it reads no tokens); the backbone's own
  tokenizer; else data.tokenizer; else the one trained on the training queries
  and cached as DIR/tokenizer.model (trained here if missing)."""
  kind = backbones.kind_of(config.model)
  if kind == 'embeddings':
    return None
  if kind in backbones.PRETRAINED:
    if config.data.tokenizer:
      raise TrainingError(f'data.tokenizer={config.data.tokenizer!r} with a pretrained '
                          'backbone: the tokenizer comes from model.checkpoint; unset one')
    return backbones.load_tokenizer(config.model)
  if config.data.tokenizer:
    return tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  path = paths.as_path(workdir) / 'tokenizer.model'
  if train_texts is None:
    return tokenizer_lib.Tokenizer.load(path)
  return tokenizer_lib.load_or_train(path, train_texts, config.data.vocab_size)


def vocab_size(tokenizer) -> int:
  return 1 if tokenizer is None else tokenizer.vocab_size


# ====================================================== the SFT candidates ===
def soft_weight_choices(config) -> list[float]:
  """The Soft Supervision weights Stage 1 tries (`sft.soft_weight_choices`, a
  comma-separated list), or [] when it trains once with `sft.soft_weight`."""
  spec = str(config.sft.get('soft_weight_choices', '') or '').strip()
  if not spec:
    return []
  try:
    values = [float(v) for v in spec.split(',') if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 0 or len(set(values)) != len(values):
    raise TrainingError(f'sft.soft_weight_choices={spec!r}; expected "" or distinct '
                        'comma-separated weights >= 0, e.g. "0,0.1,0.3"')
  return values if len(values) > 1 else []


def candidate_name(soft_weight: float) -> str:
  """The checkpoint folder (under checkpoints/) and metrics label of one SFT candidate."""
  return f'sft_soft{soft_weight:g}'


# ================================================================ optimizer ===
def _schedule(stage_cfg, peak: float):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak,
      warmup_steps=min(stage_cfg.warmup_steps, max(stage_cfg.num_steps - 1, 0)),
      decay_steps=max(stage_cfg.num_steps, 1), end_value=0.1 * peak)


def _param_group(params):
  """'backbone' for the pretrained backbone's parameters, 'head' for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'backbone' if getattr(path[0], 'key', None) == 'backbone' else 'head',
      params)


def make_optimizer(config, stage: str):
  """AdamW with linear warmup and cosine decay, after global-norm clipping.

  With a pretrained backbone its parameters get their own learning rate,
  optim.backbone_lr_scale x the stage's (same schedule), or none at all with
  model.freeze_backbone. Returns (tx, the head's schedule).
  """
  optim_cfg, stage_cfg = config.optim, config[stage]
  schedule = _schedule(stage_cfg, stage_cfg.learning_rate)
  adamw = lambda lr: optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2,
                                 weight_decay=optim_cfg.weight_decay)
  if backbones.kind_of(config.model) not in backbones.PRETRAINED:
    update = adamw(schedule)
  else:
    backbone = (optax.set_to_zero() if config.model.freeze_backbone else
                adamw(_schedule(stage_cfg, stage_cfg.learning_rate * optim_cfg.backbone_lr_scale)))
    update = optax.multi_transform({'backbone': backbone, 'head': adamw(schedule)}, _param_group)
  return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), update), schedule


# ==================================================================== state ===
SELECT_SCORES = ('bce', 'utility')
# Positions in state['nnx'], the nnx.State of (model, optimizer).
MODEL, OPTIMIZER = 0, 1


def model_params(tree):
  """The model's part of a train state (or of its shardings): state['nnx'][MODEL]."""
  return tree['nnx'][MODEL]


def set_model_params(tree, params) -> None:
  """Puts `params` in the model's place of a train state (in place)."""
  tree['nnx'][MODEL] = params



def selects(config, stage: str) -> bool:
  """Whether `stage` keeps its best parameters by an out-of-fold check."""
  stage_cfg = config[stage]
  how = stage_cfg.get('select', '')
  if how and how not in SELECT_SCORES:
    raise TrainingError(f'{stage}.select={how!r}; expected one of {SELECT_SCORES} or ""')
  return bool(how) and int(stage_cfg.get('select_every', 0)) > 0


def abstract_train_state(config, stage: str, vocab_size: int, num_models: int, mesh,
                         feature_dim: int | None = None):
  """(graphdef, build, shardings) of a stage's train state, without allocating it."""
  tx, _ = make_optimizer(config, stage)

  def build():
    with nnx.use_eager_sharding(False):
      model = build_model(config, vocab_size, num_models, config.seed, feature_dim)
      return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  repl = sharding.replicated(mesh)
  nnx_shardings = sharding.state_shardings(abstract, mesh)
  shardings = {'nnx': nnx_shardings, 'step': repl, 'rng': repl, 'alpha': repl, 'h0': repl,
               'best_score': repl, 'since_best': repl, 'done': repl}
  if selects(config, stage):
    shardings['best'] = nnx_shardings[MODEL]
  return graphdef, build, shardings


def initial_values(config, build, with_best: bool) -> dict:
  """The state's entries (traceable: called under jit or eval_shape)."""
  nnx_state = nnx.state(build())
  state = {'nnx': nnx_state, 'step': jnp.zeros((), jnp.int32),
           'rng': jax.random.key_data(jax.random.key(config.seed + 17)),
           'alpha': jnp.asarray(config.rl.alpha_init, jnp.float32),
           'h0': jnp.zeros((), jnp.float32), 'best_score': jnp.asarray(jnp.inf, jnp.float32),
           'since_best': jnp.zeros((), jnp.int32), 'done': jnp.zeros((), jnp.int32)}
  if with_best:
    state['best'] = nnx_state[MODEL]
  return state


def create_state(config, stage: str, vocab: int, num_models: int, mesh,
                 feature_dim: int | None = None, compiled: dict | None = None):
  """The train state, created already sharded: (graphdef, state, shardings).

  Given a dict `compiled`, the jitted initialiser is kept there under
  ('init', stage) and reused by later calls with the same shapes and seed
  (the Stage-1 candidates), so it compiles once.
  """
  graphdef, build, shardings = abstract_train_state(config, stage, vocab, num_models, mesh,
                                                    feature_dim)
  key = ('init', stage)
  if compiled is not None and key in compiled:
    init = compiled[key]
  else:
    init = jax.jit(functools.partial(initial_values, config, build, 'best' in shardings),
                   out_shardings=shardings)
    if compiled is not None:
      compiled[key] = init
  with jax.set_mesh(mesh):
    state = init()
  return graphdef, state, shardings


def abstract_state(config, stage: str, vocab: int, num_models: int, mesh,
                   feature_dim: int | None = None):
  """(graphdef, a ShapeDtypeStruct tree with shardings): a checkpoint's restore target."""
  graphdef, build, shardings = abstract_train_state(config, stage, vocab, num_models, mesh,
                                                    feature_dim)
  shapes = jax.eval_shape(functools.partial(initial_values, config, build, 'best' in shardings))
  return graphdef, jax.tree.map(
      lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh), shapes, shardings)
