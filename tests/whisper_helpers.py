"""A tiny random Whisper checkpoint built with transformers, with the special-token layout of the real ones."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import randomize

WHISPER_TEXT_TOKENS = 100  # ids 0..99 are text; the special tokens follow in Whisper's order
WHISPER_LANGUAGES = ("en", "de", "fr")
WHISPER_TIMESTAMPS = 60  # <|0.00|> ... <|1.18|>


def whisper_special_ids(multilingual: bool = True) -> dict:
    """Token ids of the tiny layout: eos, start of transcript, languages, tasks, prev, no-timestamps, timestamps."""
    eos = WHISPER_TEXT_TOKENS
    sot = eos + 1
    langs = {f"<|{code}|>": sot + 1 + i for i, code in enumerate(WHISPER_LANGUAGES)} if multilingual else {}
    nxt = sot + 1 + len(WHISPER_LANGUAGES)
    ids = {"eos": eos, "sot": sot, "lang_to_id": langs, "translate": nxt, "transcribe": nxt + 1,
           "startoflm": nxt + 2, "startofprev": nxt + 3, "nospeech": nxt + 4, "notimestamps": nxt + 5}
    ids["timestamp_begin"] = ids["notimestamps"] + 1
    ids["vocab_size"] = ids["timestamp_begin"] + WHISPER_TIMESTAMPS
    return ids


def tiny_whisper(folder: Path, *, multilingual: bool = True, seed: int = 0, eos_boost: float = 1.9,
                 **config_overrides) -> Path:
    """Save a tiny random WhisperForConditionalGeneration (d_model 32, 2+2 layers, 16 mel bins, 100 frames) with a
    generation_config.json laid out like the real checkpoints'. `eos_boost` scales the end-of-text embedding row
    (tied to the output projection) so that random weights finish sequences now and then."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    ids = whisper_special_ids(multilingual)
    config = WhisperConfig(
        vocab_size=ids["vocab_size"], num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
        max_source_positions=50, max_target_positions=40, pad_token_id=ids["eos"], bos_token_id=ids["eos"],
        eos_token_id=ids["eos"], decoder_start_token_id=ids["sot"],
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    randomize(model, seed)
    with torch.no_grad():
        # With tied embeddings and a weak decoder, random Whisper repeats its last token forever; stronger
        # positions, layer outputs and sharper cross-attention make the tokens depend on step and audio.
        decoder = model.model.decoder
        decoder.embed_positions.weight *= 3
        for layer in decoder.layers:
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight *= 3
            layer.encoder_attn.q_proj.weight *= 3
        decoder.embed_tokens.weight[ids["eos"]] *= eos_boost
    generation = {
        "decoder_start_token_id": ids["sot"], "eos_token_id": ids["eos"], "pad_token_id": ids["eos"],
        "bos_token_id": ids["eos"], "max_length": 40, "no_timestamps_token_id": ids["notimestamps"],
        "prev_sot_token_id": ids["startofprev"], "max_initial_timestamp_index": 10,
        "begin_suppress_tokens": [3, ids["eos"]],
        "suppress_tokens": [1, 7, 11, ids["sot"], ids["translate"], ids["transcribe"], ids["startoflm"],
                            ids["startofprev"], ids["nospeech"]],
        "is_multilingual": multilingual, "return_timestamps": False,
        "alignment_heads": [[0, 1], [1, 0], [1, 3]],
    }
    if multilingual:
        generation["lang_to_id"] = ids["lang_to_id"]
        generation["task_to_id"] = {"translate": ids["translate"], "transcribe": ids["transcribe"]}
        generation["forced_decoder_ids"] = [[1, None], [2, ids["transcribe"]]]
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(str(folder))
    return folder
