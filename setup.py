"""bigjax: sharded Transformer and mixture-of-experts training in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="bigjax",
    version="0.1.0",
    description="Sharded Transformer and MoE training in JAX/Flax NNX.",
    packages=find_packages(include=["bigjax", "bigjax.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint>=0.11",
        "ml-collections",
        "absl-py",
        "tensorflow-datasets>=4.9",
        "grain",
        "array-record",
        "tensorboardX",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "scikit-learn", "nbformat", "nbclient", "ipykernel"],
    },
)
