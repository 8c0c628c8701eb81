"""Adapters and models out to where people run them: llama.cpp's GGUF adapter and model formats."""

from deltatune.export.gguf_adapter import export_gguf_adapter
from deltatune.export.gguf_from_hf import export_gguf_from_hf
from deltatune.export.gguf_merged import export_gguf_merged

__all__ = ["export_gguf_adapter", "export_gguf_from_hf", "export_gguf_merged"]
