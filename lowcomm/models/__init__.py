"""Models used by lowcomm's recipes, simulator and benchmarks."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
