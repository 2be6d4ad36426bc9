"""specjax: language-specific drafters and speculative decoding in JAX/Flax NNX."""
import setuptools

setuptools.setup(
    name="specjax",
    version="0.1.0",
    description="Multilingual speculative decoding with specialized drafters, in JAX/Flax NNX.",
    packages=setuptools.find_packages(include=["specjax", "specjax.*"]),
    # the embedded corpus that `make demo` trains on; the C++ source of the few-row CPU kernels
    package_data={"specjax": ["assets/corpus/*/*", "models/kernels/*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        # The design card's packages.
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets",
        "seqio",
        "transformers>=4.46",
        "ml-collections",
        # What the code needs besides.
        "numpy",
        "ml_dtypes",  # bfloat16 for numpy: safetensors shards are read and written with it.
        "absl-py",
        "tqdm",
        "matplotlib",
        "tensorboard",  # event files (flax.metrics.tensorboard) and the viewer
        "sacrebleu",  # BLEU and chrF of the evaluation's translations against references
        "gguf>=0.17",  # reads llama.cpp .gguf files (specjax.models.gguf): metadata, tensors, dequantization
    ],
    extras_require={
        # torch==2.13.0: its CPU build is what the test machines have; another
        # version pulls several GB of CUDA packages.
        # nbformat, nbclient, ipykernel: tests/test_colab.py runs colabs/quickstart.ipynb in a kernel.
        # accelerate: transformers refuses to load a GGUF file without it (tests/test_gguf.py's parity test).
        # ruff: `make test` lints before testing (ruff.toml).
        "test": ["pytest", "scipy", "torch==2.13.0", "safetensors", "nbformat", "nbclient", "ipykernel",
                 "accelerate", "ruff"],
        "tpu": ["jax[tpu]"],
        "dev": ["pytest", "scipy", "ruff"],
    },
)
