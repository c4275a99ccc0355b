"""Hugging Face safetensors checkpoints -> float32 NumPy arrays (bfloat16 included).

  files, listing = weight_files(model_dir)   # tensor name -> file; model.safetensors
                                             # or a sharded model.safetensors.index.json
  array = read_tensor(handle, path, name, headers)   # handle = safetensors.safe_open(...)
  put(pure, ('layers', 0, 'w_in'), array)           # into a module's pure-dict layout
  pure = read_state(files, rows, mismatch)          # the tensors rows name, shapes checked
  module = build_loaded(make, pure, 'decoder')      # a module holding exactly those weights

Shared by the encoder and decoder loaders; nothing here imports torch.
"""

from __future__ import annotations

import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx


def put(pure: dict, path, value) -> None:
  """pure[path[0]][path[1]]...[path[-1]] = value, creating the dicts on the way."""
  for key in path[:-1]:
    pure = pure.setdefault(key, {})
  pure[path[-1]] = value


def read_header(path: pathlib.Path) -> tuple[dict, int]:
  """A safetensors file's JSON header and the byte offset where its data starts."""
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    return json.loads(f.read(size)), 8 + size


def read_tensor(handle, path: pathlib.Path, name: str, headers: dict) -> np.ndarray:
  """One tensor as float32 (bf16 / f16 / f64 converted); `handle` is a safe_open."""
  dtype = handle.get_slice(name).get_dtype()
  if dtype == 'BF16':
    # NumPy has no bfloat16, so safetensors' numpy loader cannot return it: read
    # the raw little-endian uint16s and widen them (bf16 = the top half of f32).
    if path not in headers:
      headers[path] = read_header(path)
    header, data_start = headers[path]
    entry = header[name]
    begin, end = entry['data_offsets']
    raw = np.fromfile(path, dtype='<u2', count=(end - begin) // 2, offset=data_start + begin)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry['shape'])
  if dtype not in ('F32', 'F16', 'F64'):
    raise ValueError(f'{path}: tensor {name!r} has dtype {dtype}; expected F32, F16 or BF16 '
                     '(quantized checkpoints are not supported)')
  return np.asarray(handle.get_tensor(name), np.float32)


def weight_files(model_dir) -> tuple[dict[str, pathlib.Path], pathlib.Path]:
  """(tensor name -> the safetensors file holding it, the file that lists the names)."""
  model_dir = pathlib.Path(model_dir)
  single = model_dir / 'model.safetensors'
  index = model_dir / 'model.safetensors.index.json'
  if single.is_file():
    with safetensors.safe_open(str(single), framework='np') as f:
      return {name: single for name in f.keys()}, single
  if index.is_file():
    weight_map = json.loads(index.read_text()).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index} has no "weight_map" dict')
    for file in sorted(set(weight_map.values())):
      if not (model_dir / file).is_file():
        raise FileNotFoundError(f'{model_dir / file} (listed in {index}) does not exist')
    return {name: model_dir / file for name, file in weight_map.items()}, index
  raise FileNotFoundError(f'no model.safetensors or model.safetensors.index.json in {model_dir}')


def read_state(files: dict, rows, mismatch) -> dict:
  """The tensors `rows` name as a pure dict of float32 NumPy arrays.

  files: tensor name -> its safetensors file (weight_files); rows: (our
  pure-dict path, tensor name, expected shape, checkpoint array -> ours) each.
  Every file is opened once. A tensor of another shape raises
  ValueError(mismatch(name, file, found shape, expected shape)).
  """
  by_file: dict[pathlib.Path, list] = {}
  for row in rows:
    by_file.setdefault(files[row[1]], []).append(row)
  pure: dict = {}
  headers: dict = {}
  for file, file_rows in by_file.items():
    with safetensors.safe_open(str(file), framework='np') as handle:
      for ours, name, shape, convert in file_rows:
        found = tuple(handle.get_slice(name).get_shape())
        if found != tuple(shape):
          raise ValueError(mismatch(name, file, found, shape))
        put(pure, ours, np.ascontiguousarray(convert(read_tensor(handle, file, name, headers))))
  return pure


def build_loaded(make, pure: dict, what: str):
  """`make()` built abstractly (no random initialisation of weights to be
  overwritten; eager sharding off) with its nnx.Params taken from `pure`.
  Raises ValueError naming the variables `pure` leaves unloaded."""
  with nnx.use_eager_sharding(False):
    module = nnx.eval_shape(make)
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(module, state)
  leftover = ['/'.join(map(str, path)) for path, variable in nnx.to_flat_state(nnx.state(module))
              if isinstance(variable.get_value(), jax.ShapeDtypeStruct)]
  if leftover:
    raise ValueError(f'{len(leftover)} {what} variables were not loaded from the checkpoint: '
                     f'{leftover[:5]}{" ..." if len(leftover) > 5 else ""}')
  return module
