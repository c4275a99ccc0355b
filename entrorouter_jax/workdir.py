"""The workdir contract between training and routing: its files, their readers and writers.

A training run leaves in its workdir, besides config.json, tokenizer.model
(token backbones), metrics.jsonl and the checkpoints:

  stage0.pkl        `Stage0`: the query space, both splits' Stage-0 tables and
                    the training table that routing's kNN reads (a pickled dict)
  router.json       `RouterInfo`: model names, strongest model, c_ref, mean
                    normalised cost per model, final stage, feature size...
  sft_choice.json   the chosen Stage-1 candidate (`sft.soft_weight_choices`)

and `python -m entrorouter_jax.calibrate` may add calibration.json: the cost
weight (or threshold) that hits a budget, which routing then uses by default.
`python -m entrorouter_jax.add_model` writes a copy of a workdir with
added_models.json (`AddedModels`): models added to the trained router or hidden
from it, without retraining (entrorouter_jax/added_models.py).
This module knows those files' names and layouts; it imports no model code.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any, Optional

import ml_collections
import numpy as np

from entrorouter_jax import paths

CONFIG = 'config.json'
STAGE0 = 'stage0.pkl'
ROUTER_INFO = 'router.json'
SFT_CHOICE = 'sft_choice.json'
CALIBRATION = 'calibration.json'
ADDED_MODELS = 'added_models.json'
CHECKPOINTS = 'checkpoints'

STAGES = ('sft', 'rl')


class RouterError(RuntimeError):
  """A workdir or request the router cannot serve (missing checkpoint, unknown model...)."""


def stage_names(config) -> list[str]:
  """The stages `config.stages` lists, in its order (unchecked)."""
  return [s.strip() for s in config.stages.split(',') if s.strip()]


# ================================================================ Stage 0 ===
@dataclasses.dataclass
class Stage0:
  """Stage 0's results, computed once per workdir (DIR/stage0.pkl).

  `key` says what they were computed from (data, models, anchor and space
  settings); `tables` maps a split to {'p_hat', 'c_bar'} float32[N, K] and
  `features` a split to its queries in the space, float32[N, D]. The
  train_* fields are the training table routing's kNN reads (train_feats is
  features['train']); workdirs of older versions may lack them (None).
  """
  key: Optional[str]
  strongest: int
  c_ref: float
  space: Any
  tables: dict
  features: dict = dataclasses.field(default_factory=dict)
  train_feats: Optional[np.ndarray] = None
  train_outcomes: Optional[np.ndarray] = None
  train_mask: Optional[np.ndarray] = None
  train_cost_hat: Optional[np.ndarray] = None
  train_tasks: Optional[list] = None

  @property
  def has_training_table(self) -> bool:
    return self.train_feats is not None

  def to_dict(self) -> dict:
    """The pickled layout: a plain dict of the fields (shallow, so shared arrays stay shared)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, data: dict) -> 'Stage0':
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k in names}
    fields.setdefault('key', None)
    return cls(**fields)


def write_stage0(workdir, stage0: Stage0) -> None:
  paths.write_atomic(paths.as_path(workdir) / STAGE0, pickle.dumps(stage0.to_dict()))


def read_stage0(workdir) -> Optional[Stage0]:
  """DIR/stage0.pkl as a `Stage0`, or None where the workdir has none."""
  path = paths.as_path(workdir) / STAGE0
  if not path.is_file():
    return None
  with path.open('rb') as f:
    data = pickle.load(f)
  return Stage0.from_dict(data)


def load_stage0(workdir) -> Stage0:
  """DIR/stage0.pkl, ready for routing new queries: the query space (its encoder
  without a disk cache) and the training table of the kNN estimates."""
  workdir = paths.as_path(workdir)
  stage0 = read_stage0(workdir)
  if stage0 is None:
    raise RouterError(f'{workdir}: {STAGE0} is missing; expected the workdir of a finished '
                      'training run (python -m entrorouter_jax.train --workdir=...)')
  if not stage0.has_training_table:
    raise RouterError(f'{workdir}/{STAGE0} lacks the training table that routing '
                      'needs; retrain with this version')
  from entrorouter_jax import features   # scikit-learn: only where a space is used
  features.for_routing(stage0.space)
  return stage0


# ============================================================ router.json ===
@dataclasses.dataclass
class RouterInfo:
  """DIR/router.json: what routing needs beside the config, checkpoint and tokenizer."""
  model_names: list
  strongest: int
  c_ref: float
  model_costs: list                   # mean normalised training cost per model
  final_stage: Optional[str] = None
  data: Optional[str] = None          # the prepared data set's full name
  checkpoint: Optional[str] = None    # the final stage's checkpoints, relative to DIR
  feature_dim: Optional[int] = None
  lambda_set: Optional[list] = None


def write_router_info(workdir, info: RouterInfo) -> None:
  paths.write_atomic(paths.as_path(workdir) / ROUTER_INFO,
                     json.dumps(dataclasses.asdict(info), indent=2) + '\n')


def read_router_info(workdir) -> RouterInfo:
  names = {f.name for f in dataclasses.fields(RouterInfo)}
  data = json.loads((paths.as_path(workdir) / ROUTER_INFO).read_text())
  return RouterInfo(**{k: v for k, v in data.items() if k in names})


def read_config(workdir):
  """DIR/config.json as an ml_collections.ConfigDict."""
  return ml_collections.ConfigDict(json.loads((paths.as_path(workdir) / CONFIG).read_text()))


def missing_run_files(workdir) -> list:
  """The files of a finished run (config.json, router.json) that `workdir` lacks."""
  workdir = paths.as_path(workdir)
  return [workdir / name for name in (CONFIG, ROUTER_INFO) if not (workdir / name).is_file()]


def finished_run_stage0(workdir) -> tuple[Optional[Stage0], Optional[str]]:
  """(its Stage0, None) where `workdir` holds a finished run whose stage0.pkl has the
  training table (what a run that starts from it needs); else (None, the name of the first
  file missing or incomplete there)."""
  missing = missing_run_files(workdir)
  if missing:
    return None, missing[0].name
  stage0 = read_stage0(workdir)
  if stage0 is None or not stage0.has_training_table:
    return None, STAGE0
  return stage0, None


# ====================================================== the SFT candidates ===
def write_sft_choice(workdir, chosen: str, candidates: dict) -> None:
  """DIR/sft_choice.json: the chosen candidate's name, its weight and every
  candidate's {'soft_weight', 'oof_utility'}."""
  paths.write_atomic(paths.as_path(workdir) / SFT_CHOICE, json.dumps(
      {'chosen': chosen, 'soft_weight': candidates[chosen]['soft_weight'],
       'candidates': candidates}, indent=2) + '\n')


def read_sft_choice(workdir) -> Optional[dict]:
  path = paths.as_path(workdir) / SFT_CHOICE
  return json.loads(path.read_text()) if path.is_file() else None


def stage_checkpoints(workdir, stage: str):
  """Where `stage`'s checkpoints live in a workdir: checkpoints/<stage>, or for
  Stage 1 with candidates, the chosen candidate's folder (DIR/sft_choice.json)."""
  workdir = paths.as_path(workdir)
  choice = read_sft_choice(workdir) if stage == 'sft' else None
  return workdir / CHECKPOINTS / (choice['chosen'] if choice else stage)


# ======================================================== calibration.json ===
def write_calibration(workdir, calibration: dict) -> None:
  paths.write_atomic(paths.as_path(workdir) / CALIBRATION,
                     json.dumps(calibration, indent=2) + '\n')


def read_calibration(workdir) -> Optional[dict]:
  """DIR/calibration.json (None where the workdir has none); RouterError if unreadable."""
  path = paths.as_path(workdir) / CALIBRATION
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RouterError(f'{path}: not valid JSON ({e.msg} at line {e.lineno}); expected the '
                      'file python -m entrorouter_jax.calibrate writes') from None
  for key in ('cost_weight', 'threshold'):
    value = data.get(key) if isinstance(data, dict) else None
    if value is not None and (not isinstance(value, (int, float)) or value < 0):
      raise RouterError(f'{path}: {key} is {value!r}; expected a number >= 0')
  if not isinstance(data, dict) or (data.get('cost_weight') is None
                                    and data.get('threshold') is None):
    raise RouterError(f'{path}: expected a JSON object with "cost_weight" or "threshold"')
  return data


# ====================================================== added_models.json ===
@dataclasses.dataclass
class AddedModels:
  """DIR/added_models.json: the router's columns beyond its network's (add_model.py).

  The columns are the network's outputs (`network_models`, the checkpoint's K0
  models in order), then each added model's in the order they were added; Stage
  0's tables in DIR/stage0.pkl have one column per entry of `columns`. `removed`
  holds the indices of the columns routing hides; the others, in column order,
  are the router's models (router.json's model_names). Each entry of `added` is
  one added model's success model and where its labels came from
  (added_models.SuccessModel.to_dict), `columns` each column's
  {'name', 'cost'} (its mean normalised cost, router.json's model_costs).
  """
  network_models: list
  network_strongest: int
  columns: list
  removed: list = dataclasses.field(default_factory=list)
  added: list = dataclasses.field(default_factory=list)

  @property
  def visible(self) -> list[int]:
    """The indices of the columns routing chooses among, in column order."""
    return [i for i in range(len(self.columns)) if i not in set(self.removed)]

  @property
  def model_names(self) -> list[str]:
    return [self.columns[i]['name'] for i in self.visible]


def write_added_models(workdir, added: AddedModels) -> None:
  paths.write_atomic(paths.as_path(workdir) / ADDED_MODELS,
                     json.dumps(dataclasses.asdict(added), indent=1) + '\n')


def read_added_models(workdir) -> Optional[AddedModels]:
  """DIR/added_models.json as `AddedModels` (None where the workdir has none: a trained
  router as it was trained); RouterError if it is unreadable."""
  path = paths.as_path(workdir) / ADDED_MODELS
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
    return AddedModels(**data)
  except (json.JSONDecodeError, TypeError) as e:
    raise RouterError(f'{path}: not the file python -m entrorouter_jax.add_model writes '
                      f'({e}); expected its JSON object') from None
