"""vaopd: a trainer and a fused loss for Visual-Advantage On-Policy Distillation of VLMs.

Importing the package does nothing process-wide; ``vaopd.kernels`` (the loss) needs nothing of
the trainer. Trainer modules that import transformers, peft or vLLM import
``vaopd.torchvision_ops`` first (see there why).
"""
