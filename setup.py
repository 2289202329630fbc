from setuptools import find_packages, setup

setup(
    name="diffusion-dpo-trainer",
    version="0.1.0",
    description="Align text-to-image diffusion models to preferences with Diffusion-DPO, TRL-style.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["diffusion_dpo_trainer", "diffusion_dpo_trainer.*"]),
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
        "bitsandbytes>=0.44",
        "safetensors>=0.4",
        "pillow>=10",
        "tqdm",
    ],
    entry_points={"console_scripts": ["diffusion-dpo=diffusion_dpo_trainer.cli:main"]},
    extras_require={
        # Video models (Wan): PyAV decodes and encodes mp4/webm without torchvision or torchcodec.
        "video": ["av>=12"],
        "test": ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.15", "av>=12"],
        "dev": ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard>=2.15", "av>=12",
                "ruff"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
