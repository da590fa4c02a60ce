from setuptools import setup

setup(
    name="amapo-fast",
    version="0.1.0",
    description="Fused Triton kernels and a lean trainer for AMaPO, SimPO and DPO preference optimisation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` lives at the repository root but must not be installed as a top-level module named
    # `kernels` (the PyPI distribution `kernels` owns that name and transformers imports it).
    packages=["amapo_fast", "amapo_fast.kernels"],
    package_dir={"amapo_fast": "amapo_fast", "amapo_fast.kernels": "kernels"},
    install_requires=[
        # torch 2.11's CUDA build pins Triton 3.6, the oldest Triton the kernels support; CI runs the kernel
        # tests on it and on the newest.
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "transformers>=5.0",
        "datasets>=3.0",
        "tokenizers",
        "safetensors",
        "xxhash",  # checkpoint manifests: a fast hash of every file
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    # torchrun for the trainer: settings checked before the workers start, the worker's exit status at the end.
    entry_points={"console_scripts": ["amapo-train = amapo_fast.launch:main"]},
    extras_require={
        # ZeRO-3 loading partitions weights as they load via transformers' HfDeepSpeedConfig, which needs accelerate.
        "deepspeed": ["deepspeed>=0.15", "accelerate"],
        "flash-attn": ["flash-attn>=2.6"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # A peer in the benchmark (CUDA only), measured when installed.
        "cut-cross-entropy": ["cut-cross-entropy"],
        # TRL's CPOTrainer and DPOTrainer, compared in bench/train_step.py when installed; its CPO, IPO and ORPO
        # loss functions are the references of tests/test_losses.py (skipped without it).
        "trl": ["trl>=1.0"],
        # LoRA adapters (--use_peft); QLoRA's 4-bit base (--load_in_4bit, CUDA only) also needs bitsandbytes.
        "peft": ["peft>=0.13"],
        "qlora": ["peft>=0.13", "bitsandbytes>=0.43"],
        "dev": ["pytest", "pytest-timeout", "liger-kernel>=0.5", "deepspeed>=0.15", "accelerate", "psutil", "peft>=0.13"],
    },
)
