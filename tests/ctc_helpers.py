"""A tiny random Wav2Vec2 CTC speech recogniser and speech-like clips, for tests of inputs and batches (datasets,
Ray) rather than of the model."""

import json

import numpy as np
import torch

from helpers import randomize

RATE = 16000


def voice(n: int, seed: int) -> np.ndarray:
    """A voiced tone with a wandering pitch, syllable-rate loudness and a little noise."""
    t = np.arange(n) / RATE
    pitch = 150 + 50 * np.sin(3 * t + seed)
    wave = np.sin(2 * np.pi * np.cumsum(pitch) / RATE) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + seed))
    return (0.5 * wave + 0.05 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


CLIPS = [voice(n, seed) for seed, n in enumerate((4000, 9000, 6500, 12000))]


def ctc_checkpoint(folder):
    """A tiny random Wav2Vec2 CTC model with its processor, saved by transformers."""
    import transformers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate("ETAONIHSRDLU'")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(folder))
    config = transformers.Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    torch.manual_seed(0)
    model = randomize(transformers.Wav2Vec2ForCTC(config), 0).eval()
    with torch.no_grad():
        model.lm_head.weight *= 5  # sharper frames: the transcript depends on the audio
    model.save_pretrained(str(folder))
    return folder
