"""feature-extraction parity with transformers, and real all-MiniLM-L6-v2 weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from lightpipe import InvalidInput, pipeline

ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")
TEXTS = ["Hello world.", "Paris is the capital of France, and John Smith works at Google.", "a",
         "The river flows through the old city at night, very much like it did long ago."]


@pytest.mark.parametrize("arch", ARCHS)
def test_parity(checkpoint, arch):
    folder = checkpoint(arch, "base")
    ours = pipeline("feature-extraction", model=str(folder))
    ref = transformers.pipeline("feature-extraction", model=str(folder))
    for text in TEXTS:
        a, b = np.array(ours(text)), np.array(ref(text))
        assert a.shape == b.shape and a.shape[0] == 1
        assert np.abs(a - b).max() <= 1e-4
    batched = ours(TEXTS, batch_size=3)
    for text, out in zip(TEXTS, batched):
        assert np.abs(np.array(out) - np.array(ref(text))).max() <= 1e-4
    tensor = ours(TEXTS[0], return_tensors=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == np.array(ref(TEXTS[0])).shape


def test_head_checkpoint_loads_as_encoder(checkpoint):
    """A fine-tuned checkpoint's encoder serves feature-extraction (its head weights are ignored)."""
    folder = checkpoint("bert", "sequence-classification")
    ours = pipeline("feature-extraction", model=str(folder))
    ref = transformers.pipeline("feature-extraction", model=str(folder))
    assert np.abs(np.array(ours(TEXTS[1])) - np.array(ref(TEXTS[1]))).max() <= 1e-4


def test_truncation_via_tokenize_kwargs(checkpoint):
    folder = checkpoint("bert", "base")
    ours = pipeline("feature-extraction", model=str(folder))
    ref = transformers.pipeline("feature-extraction", model=str(folder))
    long = "the city " * 100
    a = ours(long, tokenize_kwargs={"truncation": True, "max_length": 16})
    b = ref(long, tokenize_kwargs={"truncation": True, "max_length": 16})
    assert np.array(a).shape == (1, 16, 32) and np.abs(np.array(a) - np.array(b)).max() <= 1e-4
    with pytest.raises(InvalidInput):
        ours(long)


@pytest.mark.parametrize("bad", [None, 1.5, ["ok", None]])  # "" is a text: see test_inputs_dropin
def test_bad_input(checkpoint, bad):
    ours = pipeline("feature-extraction", model=str(checkpoint("bert", "base")))
    with pytest.raises(InvalidInput):
        ours(bad)
    assert np.array(ours("fine")).shape[0] == 1


def test_real_minilm_matches_transformers():
    from lightpipe.hub import package_folder

    folder = package_folder("sentence-transformers/all-MiniLM-L6-v2")
    ours = pipeline("feature-extraction", model="sentence-transformers/all-MiniLM-L6-v2")
    ref = transformers.pipeline("feature-extraction", model=str(folder))
    sentences = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome!",
                 "Lightpipe runs transformers pipelines fast, on the CPU or the GPU."]
    for a, b in zip(ours(sentences, batch_size=4), ref(sentences)):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5
    # Real weights say real things: mean-pooled embeddings of related sentences are closer.
    emb = [np.array(e)[0].mean(0) for e in ours(sentences)]
    emb = [e / np.linalg.norm(e) for e in emb]
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


FALLBACK_SCRIPT = """
import json
import numpy as np
from lightpipe import pipeline
pipe = pipeline("feature-extraction")
print(json.dumps({"hidden_size": pipe.model.config.hidden_size, "folder": str(pipe.tokenizer.name_or_path),
                  "width": np.array(pipe("offline")).shape[-1]}))
"""


def test_default_model_falls_back_to_weight_package(tmp_path):
    """No model named and an empty Hub cache: the installed MiniLM package answers. A subprocess, since
    huggingface_hub reads its cache location when it is imported."""
    from lightpipe.hub import package_folder

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"hidden_size": 384, "width": 384,  # MiniLM-L6
                      "folder": str(package_folder("sentence-transformers/all-MiniLM-L6-v2"))}
