"""What every routing TFDS builder shares: the features, the metadata, the writer.

A builder only says how to obtain a `RoutingDataset` (`_load`); this base class
writes it as array_record files, one TFDS split per split name, and keeps the
model pool and the assumptions made while reading in the dataset's metadata.
Builders live in their own module folders under `entrorouter_jax/datasets/`
(TFDS needs that); they build and read back without TensorFlow.
A builder of feedback logs (`_feedback_rows`) adds two per-example features,
`propensity` and `cost_weight`; every other builder's features and examples
are exactly the fully labelled ones, so their prepared folders stay valid.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from entrorouter_jax.data.dataset import DataError, ModelInfo, RoutingDataset

# The per-example features of feedback logs: RoutingDataset field -> feature.
FEEDBACK_FEATURES = {'propensities': 'propensity', 'cost_weights': 'cost_weight'}


def routing_features(feedback: bool = False) -> tfds.features.FeaturesDict:
  """One example per query; the per-model vectors have length K (the pool size).

  feedback: adds `propensity` (float32, pi_b(logged model | query)) and
  `cost_weight` (float32, NaN where the log gives none), a feedback log's rows.
  """
  vector = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
  features = {
      'index': np.int64,          # position of the query within its split
      'id': tfds.features.Text(),
      'query': tfds.features.Text(),
      'task': tfds.features.Text(),
      'outcomes': vector(np.float32),
      'outcome_mask': vector(np.bool_),
      'costs': vector(np.float32),
      'true_prob': vector(np.float32),   # empty unless the data knows P(correct)
  }
  if feedback:
    features.update({name: np.float32 for name in FEEDBACK_FEATURES.values()})
  return tfds.features.FeaturesDict(features)


class RoutingBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Writes the `RoutingDataset` returned by `_load` as array_record splits."""

  def _feedback_rows(self) -> bool:
    """Whether the data are feedback logs (per-row propensity and cost weight);
    the feature spec is static per builder config, so the builder says it."""
    return False

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=routing_features(feedback=self._feedback_rows()),
        metadata=tfds.core.MetadataDict())

  @abc.abstractmethod
  def _load(self, dl_manager: tfds.download.DownloadManager) -> RoutingDataset:
    """Returns the validated routing table to write."""

  def _split_generators(self, dl_manager):
    data = self._load(dl_manager).validate()
    feedback = self._feedback_rows()
    where = data.source or data.name
    for field, name in FEEDBACK_FEATURES.items():
      has = getattr(data, field) is not None
      if feedback and not has:
        raise DataError(f'{where}: the data has no {field}, but builder {self.name!r} writes '
                        f'feedback logs (feature {name!r}); expected a feedback log')
      if has and not feedback:
        raise DataError(f'{where}: the data has {field} (a feedback log), but builder '
                        f'{self.name!r} has no feature {name!r}; expected fully labelled data')
    self.info.metadata.update({
        'models': [dataclasses.asdict(m) for m in data.models],
        'notes': list(data.notes),
        'source': data.source,
        'name': data.name,
    })
    return {s: self._generate_examples(data.split(s)) for s in data.split_names()}

  def _generate_examples(self, data: RoutingDataset):
    empty = np.zeros((0,), np.float32)
    rows = {name: getattr(data, field) for field, name in FEEDBACK_FEATURES.items()
            if getattr(data, field) is not None}
    for i in range(data.num_queries):
      example = {
          'index': i,
          'id': str(data.ids[i]),
          'query': str(data.queries[i]),
          'task': str(data.tasks[i]),
          'outcomes': data.outcomes[i].astype(np.float32),
          'outcome_mask': data.outcome_mask[i],
          'costs': data.costs[i].astype(np.float32),
          'true_prob': empty if data.true_prob is None else data.true_prob[i],
      }
      example.update({name: np.float32(values[i]) for name, values in rows.items()})
      yield str(data.ids[i]), example


def _text(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> RoutingDataset:
  """Reads a prepared split back into a `RoutingDataset`, in `index` order; a
  feedback log's `propensity` and `cost_weight` become `propensities` and
  `cost_weights` (float64)."""
  if split not in builder.info.splits:
    raise DataError(f'{builder.name}: split {split!r} is empty or absent; expected one of '
                    f'{sorted(builder.info.splits)}')
  source = builder.as_data_source(split=split)
  records = sorted((source[i] for i in range(len(source))), key=lambda r: r['index'])
  meta = builder.info.metadata
  has_truth = len(records[0]['true_prob']) > 0
  stack = lambda key, dtype: np.stack([r[key] for r in records]).astype(dtype)
  rows = {field: stack(name, np.float64) for field, name in FEEDBACK_FEATURES.items()
          if name in records[0]}
  return RoutingDataset(
      name=meta.get('name', builder.name),
      models=[ModelInfo(**m) for m in meta['models']],
      ids=np.array([_text(r['id']) for r in records]),
      queries=np.array([_text(r['query']) for r in records]),
      tasks=np.array([_text(r['task']) for r in records]),
      splits=np.array([split] * len(records)),
      outcomes=stack('outcomes', np.float32),
      outcome_mask=stack('outcome_mask', bool),
      costs=stack('costs', np.float32),
      true_prob=stack('true_prob', np.float32) if has_truth else None,
      source=meta.get('source', builder.name),
      notes=list(meta.get('notes', [])),
      **rows,
  )
