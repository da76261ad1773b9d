"""Checkpoint loading: file layouts, safety, key checks, dtype and device."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lightpipe import CheckpointError, InvalidInput, UnsupportedModel, pipeline
from lightpipe.loading import build_model, load_config, load_model

TEXTS = ["I love this movie, it is great!", "bad", "Paris is the capital of France."]


def copy_of(folder, tmp_path, name="ckpt"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def seqcls(checkpoint):
    return checkpoint("bert", "sequence-classification")


@pytest.fixture(scope="module")
def reference_state(seqcls):
    return state_of(load_model(seqcls, "sequence-classification"))


# ------------------------------------------------------------------ file layouts


def test_sharded_safetensors(seqcls, reference_state, tmp_path):
    out = tmp_path / "sharded"
    transformers.BertForSequenceClassification.from_pretrained(str(seqcls)).save_pretrained(
        str(out), max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_same_state(state_of(load_model(out, "sequence-classification")), reference_state)

    # Every shard the index names must be there.
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(out, "sequence-classification")


def test_sharded_index_that_is_not_json(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="shard index"):
        load_model(out, "sequence-classification")


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_bin(seqcls, reference_state, tmp_path, zipfile_format):
    """pytorch_model.bin (transformers 5 no longer writes it: saved by torch.save) loads with weights_only,
    in torch's zip format and in the legacy format of checkpoints saved before torch 1.6."""
    out = copy_of(seqcls, tmp_path)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile_format)
    assert_same_state(state_of(load_model(out, "sequence-classification")), reference_state)


def test_sharded_pytorch_bin(seqcls, reference_state, tmp_path):
    out = copy_of(seqcls, tmp_path)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, out / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_state(state_of(load_model(out, "sequence-classification")), reference_state)


class Payload:
    """An object whose unpickling runs code: creates a folder named by `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_pickled_code_in_bin_is_refused(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    marker = tmp_path / "code-was-run"
    torch.save({**state, "evil": Payload(marker)}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(out, "sequence-classification")
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    (out / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        load_model(out, "sequence-classification")
    torch.save({"bert.embeddings.word_embeddings.weight": 3}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_model(out, "sequence-classification")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors(seqcls, tmp_path, damage):
    out = copy_of(seqcls, tmp_path)
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(out, "sequence-classification")


def test_folder_without_config(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(out, "sequence-classification")
    with pytest.raises(CheckpointError, match="config.json"):
        pipeline("text-classification", model=str(out))


def test_config_that_is_not_json(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    (out / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="JSON"):
        load_model(out, "sequence-classification")


def test_folder_without_weights(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights.*model.safetensors"):
        load_model(out, "sequence-classification")


# ------------------------------------------------------------------ keys


def test_base_checkpoint_for_a_head_names_the_missing_keys(checkpoint):
    base = checkpoint("bert", "base")
    with pytest.raises(CheckpointError, match="missing keys: classifier.bias, classifier.weight"):
        load_model(base, "sequence-classification")
    with pytest.raises(CheckpointError, match="classifier.weight"):
        pipeline("text-classification", model=str(base))


def test_unexpected_keys_are_named(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    state = load_file(str(out / "model.safetensors"))
    state["bert.encoder.layer.9.extra.weight"] = torch.zeros(3)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: bert\.encoder\.layer\.9\.extra\.weight"):
        load_model(out, "sequence-classification")


def test_wrong_shape_is_named(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    state = load_file(str(out / "model.safetensors"))
    state["classifier.weight"] = torch.zeros(5, state["classifier.weight"].shape[1])
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"classifier\.weight .*shape \(5, 32\)"):
        load_model(out, "sequence-classification")


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_head_checkpoint_loads_as_base_model(checkpoint, arch):
    folder = checkpoint(arch, "sequence-classification")
    model = load_model(folder, "base")
    saved = load_file(str(folder / "model.safetensors"))
    prefix = model.base_model_prefix + "."
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[prefix + key]), key


def test_base_checkpoint_with_prefix_loads_as_base(checkpoint, tmp_path):
    """A base model saved under its prefix ("bert.embeddings...") loads as well."""
    folder = checkpoint("bert", "base")
    out = copy_of(folder, tmp_path)
    state = load_file(str(out / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in state.items()}, str(out / "model.safetensors"))
    assert_same_state(state_of(load_model(out, "base")), state_of(load_model(folder, "base")))


# ------------------------------------------------------------------ dtype


@pytest.fixture(scope="module")
def half_checkpoint(seqcls, tmp_path_factory):
    out = tmp_path_factory.mktemp("half")
    model = transformers.BertForSequenceClassification.from_pretrained(str(seqcls), dtype=torch.float16)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(seqcls / name, out / name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    return out


def dtypes_of(model):
    return {p.dtype for p in model.parameters()}


@pytest.mark.parametrize("dtype, expected", [
    ("auto", torch.float16), (None, torch.float16), (torch.float32, torch.float32), ("float32", torch.float32),
    ("float16", torch.float16), ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16),
    ("bfloat16", torch.bfloat16),
])
def test_dtype(half_checkpoint, dtype, expected):
    assert dtypes_of(load_model(half_checkpoint, "sequence-classification", dtype=dtype)) == {expected}


def test_dtype_auto_follows_config(seqcls):
    assert dtypes_of(load_model(seqcls, "sequence-classification", dtype="auto")) == {torch.float32}


def test_dtype_auto_without_config_dtype_follows_the_weights(half_checkpoint, tmp_path):
    """As transformers: with no dtype in config.json, "auto" takes the dtype of the stored weights."""
    out = copy_of(half_checkpoint, tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["dtype"]
    (out / "config.json").write_text(json.dumps(config))
    assert dtypes_of(load_model(out, "sequence-classification")) == {torch.float16}
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype="auto")
    assert {p.dtype for p in ref.parameters()} == {torch.float16}


def test_config_with_torch_dtype_key(half_checkpoint, tmp_path):
    """config.json files written before transformers 5 name the dtype "torch_dtype"."""
    out = copy_of(half_checkpoint, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (out / "config.json").write_text(json.dumps(config))
    assert load_config(out).dtype == "float16"
    assert dtypes_of(load_model(out, "sequence-classification")) == {torch.float16}


def test_dtype_through_pipeline(half_checkpoint):
    assert dtypes_of(pipeline("text-classification", model=str(half_checkpoint)).model) == {torch.float16}
    assert dtypes_of(pipeline("text-classification", model=str(half_checkpoint), dtype="float32").model) == {torch.float32}
    pipe = pipeline("text-classification", model=str(half_checkpoint), torch_dtype=torch.bfloat16)
    assert dtypes_of(pipe.model) == {torch.bfloat16}
    assert pipe("good")[0]["label"].startswith("LABEL_")
    with pytest.raises(InvalidInput, match="not both"):
        pipeline("text-classification", model=str(half_checkpoint), dtype="float32", torch_dtype="float16")


def test_bfloat16_results_are_close_to_float32(seqcls):
    full = pipeline("text-classification", model=str(seqcls), top_k=None)
    half = pipeline("text-classification", model=str(seqcls), dtype="bfloat16", top_k=None)
    for a, b in zip(full(TEXTS), half(TEXTS)):
        scores = {d["label"]: d["score"] for d in b}
        assert max(abs(d["score"] - scores[d["label"]]) for d in a) < 0.05


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp8", torch.int64, torch.float64, 16, "Auto"])
def test_invalid_dtype(seqcls, dtype):
    with pytest.raises(InvalidInput, match="dtype"):
        load_model(seqcls, "sequence-classification", dtype=dtype)
    with pytest.raises(InvalidInput, match="dtype"):
        pipeline("text-classification", model=str(seqcls), dtype=dtype)


# ------------------------------------------------------------------ device


@pytest.mark.parametrize("device", [None, "cpu", -1, torch.device("cpu"), "cpu:0"])
def test_cpu_devices(seqcls, device):
    model = load_model(seqcls, "sequence-classification", device=device)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    pipe = pipeline("text-classification", model=str(seqcls), device=device)
    assert pipe.device.type == "cpu"
    assert pipe("good")[0]["label"].startswith("LABEL_")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0, torch.device("cuda")])
def test_cuda_when_unavailable(seqcls, device):
    with pytest.raises(InvalidInput, match="CUDA"):
        load_model(seqcls, "sequence-classification", device=device)
    with pytest.raises(InvalidInput, match="CUDA"):
        pipeline("text-classification", model=str(seqcls), device=device)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", True, 1.5, [0]])
def test_invalid_device(seqcls, device):
    with pytest.raises(InvalidInput, match="device"):
        load_model(seqcls, "sequence-classification", device=device)


# ------------------------------------------------------------------ tying, registry, meta build

TIED = {"bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        "roberta": ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
        "distilbert": ("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight")}


@pytest.mark.parametrize("arch", sorted(TIED))
def test_tied_mlm_decoder_shares_memory(checkpoint, arch):
    model = load_model(checkpoint(arch, "masked-lm"), "masked-lm")
    decoder, embeddings = (model.get_parameter(name) for name in TIED[arch])
    assert decoder is embeddings
    assert decoder.data_ptr() == embeddings.data_ptr()
    # Still one tensor after a dtype change.
    half = load_model(checkpoint(arch, "masked-lm"), "masked-lm", dtype="bfloat16")
    assert half.get_parameter(TIED[arch][0]).data_ptr() == half.get_parameter(TIED[arch][1]).data_ptr()


def test_untied_mlm_decoder_keeps_its_own_weights(checkpoint):
    folder = checkpoint("bert", "masked-lm", tie_word_embeddings=False)
    model = load_model(folder, "masked-lm")
    decoder, embeddings = (model.get_parameter(name) for name in TIED["bert"])
    assert decoder.data_ptr() != embeddings.data_ptr()
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(decoder, saved["cls.predictions.decoder.weight"])
    assert not torch.equal(decoder, embeddings)


def test_unknown_model_type(seqcls, tmp_path):
    out = copy_of(seqcls, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "llama-from-mars"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=r"'llama-from-mars'.*supported.*bert.*distilbert.*roberta"):
        load_model(out, "sequence-classification")
    with pytest.raises(UnsupportedModel, match="llama-from-mars"):
        pipeline("text-classification", model=str(out))
    del config["model_type"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type"):
        load_model(out, "sequence-classification")


def test_missing_head_for_architecture(checkpoint):
    config = load_config(checkpoint("bert", "base"))
    with pytest.raises(UnsupportedModel, match="no image-classification head"):
        build_model(config, "image-classification")


def test_model_is_built_on_meta_without_random_init(seqcls, reference_state):
    config = load_config(seqcls)
    built = build_model(config, "sequence-classification")
    assert {p.device.type for p in built.parameters()} == {"meta"}
    # Loading draws no random numbers: nothing is initialised only to be overwritten.
    rng = torch.random.get_rng_state()
    model = load_model(seqcls, "sequence-classification")
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_same_state(state_of(model), reference_state)
