"""pdmd: a Phased DMD trainer, and pdmd_kernels, its fused ops (importable on their own)."""
from setuptools import find_packages, setup

setup(
    name="pdmd",
    version="0.1.0",
    description="Phased Distribution Matching Distillation: fast, lean, tested.",
    python_requires=">=3.10",
    packages=find_packages(include=["pdmd", "pdmd.*"]) + ["pdmd_kernels", "pdmd_kernels.ops"],
    package_dir={"pdmd": "pdmd", "pdmd_kernels": "kernels/pdmd_kernels"},
    install_requires=[
        # torch is not pinned: a GPU user keeps the build they have; the README's CPU path installs
        # a CPU build first so that this line never pulls a multi-GB CUDA wheel.
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "pydantic>=2",  # the config schema (pdmd/config.py)
        "safetensors",
        "tqdm",
        "matplotlib",
        "peft",
    ],
    extras_require={
        # everything the CPU test suite needs (triton runs its kernels under TRITON_INTERPRET=1)
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "triton", "diffusers", "transformers",
                "scikit-learn", "tensorboard", "wandb>=0.19.10", "imageio", "imageio-ffmpeg"],
        # log.backends: tensorboard, wandb (pdmd/runtime/logs.py); imageio + imageio-ffmpeg write .mp4 videos
        "log": ["tensorboard", "wandb>=0.19.10", "imageio", "imageio-ffmpeg"],
        # ftfy: diffusers' WanImageToVideoPipeline (0.42) cleans prompt strings with it unconditionally
        "models": ["diffusers", "transformers", "peft", "ftfy", "imageio", "imageio-ffmpeg"],
        "gpu": ["triton", "bitsandbytes"],
    },
    entry_points={"console_scripts": ["pdmd=pdmd.cli:entry"]},
)
