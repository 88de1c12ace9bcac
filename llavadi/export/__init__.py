"""Exporting a saved LLaVA student to an on-device runtime, and running the exported model.

One module per target: `gguf_target` writes llama.cpp's files (a GGUF of the language model per
quantization + an `mmproj` GGUF of the vision tower and projector); `gguf_runtime` loads them
with llama-cpp-python and answers questions for `llavadi eval`; `torch_int8` is the PyTorch-side
weight-only int8 baseline. `support` refuses, by name and before any conversion work, a model a
target cannot take. Targets are looked up by exact name in `TARGETS`.
"""

TARGETS = ("gguf",)
