"""betakd: uncertainty-aware knowledge distillation (Beta-KD) for multimodal and text LLMs."""

__version__ = "0.1.0"
