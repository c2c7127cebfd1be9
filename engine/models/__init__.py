"""Model code. One Llama-family implementation covers Llama 2/3, Mistral, Qwen2/3, SmolLM."""

from .llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
