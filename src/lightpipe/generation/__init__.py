"""Generation from small parts: a KV cache, logits processors, token selection strategies, and the loop.

    from lightpipe.generation import GenerationConfig, generate
    config = GenerationConfig.from_folder(folder).replace(max_new_tokens=64, num_beams=5)
    out = generate(model, prompt_ids, config, encoder_hidden=model.encode(features))
    out.sequences  # (N, T) prompt + generated tokens
"""

from .cache import KVCache
from .generate import GenerationConfig, GenerationOutput, generate

__all__ = ["GenerationConfig", "GenerationOutput", "KVCache", "generate"]
