"""titans-train: pretraining Titans language models at scale."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is a range, not a pin: an existing CUDA build is kept. `make` installs the
# CPU wheel torch==2.13.0 first when no torch is present (see Makefile).
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy>=1.24",
    "omegaconf>=2.3",
    "pyyaml>=6",
    "deepspeed>=0.16",
    "webdataset>=0.2.90",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "wandb>=0.17",
    "tqdm>=4.66",
    "pyarrow>=14",
    "zstandard>=0.22",
]


def requirements(name: str) -> list[str]:
    """The requirement lines of requirements/<name> (comments and blank lines dropped)."""
    text = Path(__file__).with_name("requirements").joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


EXTRAS = {
    # triton: the fused memory kernel's tests run in its CPU interpreter (TRITON_INTERPRET=1).
    # Unversioned and not in the constraints: a CUDA torch pins its own triton (==x.y.z), and a
    # different pin would make pip replace that torch (requirements/constraints.txt).
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",
        "ruff>=0.6",
        "matplotlib>=3.8",
        'triton; sys_platform == "linux"',
    ],
    # flash-attn builds from source against a CUDA torch and needs --no-build-isolation:
    # use `make install-gpu` (docs/gpus.md). It is picked up automatically when importable.
    "gpu": requirements("gpu.txt"),
}

setup(
    name="titans_train",
    version="0.1.0",
    description="Pretraining Titans (neural long-term memory) language models with DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["titans_train", "titans_train.*", "data_pipelines"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "titans-train=titans_train.cli:main",
            "titans-data=data_pipelines.cli:main",
            "titans-eval=titans_train.evaluate:main",
            "titans-generate=titans_train.generate:main",
            "titans-export=titans_train.export:main",
        ]
    },
)
