import runpy

from setuptools import find_packages, setup

# The one place the version is written; read without importing the package (which needs torch).
VERSION = runpy.run_path("diffusion_dpo_trainer/_version.py")["__version__"]

TEST = ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.15"]
OPTIONAL = {
    "deepspeed": ["deepspeed>=0.19"],
    # QLoRA on a torchao-quantized base (int8 / float8 weight-only): quant_backend "torchao".
    "torchao": ["torchao>=0.18"],
    # The reward models run on transformers; HPSv2 also needs ftfy to clean prompts as open_clip does.
    "rewards": ["ftfy>=6"],
    # The OCR reward: PP-OCRv4 as ONNX inside the wheel, run by onnxruntime (with opencv-python: about 390 MB
    # installed; no model download).
    "ocr": ["rapidocr-onnxruntime>=1.4"],
    # Video models (Wan): PyAV decodes and encodes mp4/webm without torchvision or torchcodec.
    "video": ["av>=12"],
}

setup(
    name="diffusion-dpo-trainer",
    version=VERSION,
    description="Align text-to-image diffusion models to preferences with Diffusion-DPO, TRL-style.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["diffusion_dpo_trainer", "diffusion_dpo_trainer.*"]),
    # Prompt sets shipped with the package (prompt_sets.py): Flow-GRPO's OCR prompts, GenEval's metadata.
    package_data={"diffusion_dpo_trainer": ["prompt_data/*"]},
    # Lower bounds are the versions the test suite runs against (the trainer uses transformers 5's
    # `activation_checkpointing` and diffusers' LoRA adapter metadata).
    install_requires=[
        # A range that the CPU wheel 2.13.0 satisfies; install torch first to pick the build you want.
        "torch>=2.4,<3",
        "diffusers>=0.42",
        "transformers>=5.23",
        "accelerate>=1.15",
        "peft>=0.21",
        "datasets>=5.0",
        "trl>=1.16",
        # 0.48+: quantized models move between devices (the denoiser steps aside while caches are encoded).
        "bitsandbytes>=0.48",
        "safetensors>=0.4",
        "pillow>=10",
        "tqdm",
    ],
    entry_points={"console_scripts": ["diffusion-dpo=diffusion_dpo_trainer.cli:main"]},
    extras_require={
        **OPTIONAL,
        # The test suite runs every optional path, so CI installs them all.
        "test": TEST + [req for reqs in OPTIONAL.values() for req in reqs],
        "dev": TEST + [req for reqs in OPTIONAL.values() for req in reqs] + ["ruff"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
