"""Adapters out to where people run models: llama.cpp's GGUF adapter format."""

from deltatune.export.gguf_adapter import export_gguf_adapter

__all__ = ["export_gguf_adapter"]
