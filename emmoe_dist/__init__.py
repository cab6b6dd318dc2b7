"""emmoe-dist: distributed fine-tuning and evaluation for emergent misalignment in MoE LLMs.

Importing the package is light: torch, DeepSpeed, Ray, vLLM, openai and W&B load only inside
the modules and functions that need them.
"""

__version__ = "0.1.0"
