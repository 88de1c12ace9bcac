"""llavadi: distillation of LLaVA-style multimodal language models (arXiv 2407.19409)."""

__version__ = "0.1.0"
