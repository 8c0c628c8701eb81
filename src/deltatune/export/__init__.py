"""Adapters out to where people run models: llama.cpp's GGUF adapter format."""

from deltatune.export.gguf_adapter import export_gguf_adapter
from deltatune.export.gguf_merged import export_gguf_merged

__all__ = ["export_gguf_adapter", "export_gguf_merged"]
