"""Readers of checkpoint file formats other than Hugging Face folders: each turns files into (config dict, state dict, tokenizer)."""
