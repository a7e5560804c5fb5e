"""megatron-ds: DeepSeek-V3-class MoE pre-training on Megatron-Core."""

__version__ = "0.1.0"
