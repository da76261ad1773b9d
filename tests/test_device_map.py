"""device_map, max_memory and offload_folder: blocks placed over the CPU and the disk give the unmapped model's outputs;
plans, device forms and bad arguments."""

from __future__ import annotations

import ctypes

import pytest
import torch
from bart_helpers import tiny_bart
from text_generation_helpers import tiny_generation_checkpoint

from lightpipe import InvalidInput, dispatch, loading, pipeline
from lightpipe.generation.cache import KVCache

TEXTS = ["I love this movie, it is great!", "bad", "Paris is the capital of France."]
PROMPTS = ["hello world", "the cat sat on"]


@pytest.fixture(scope="module")
def bert(checkpoint):
    return checkpoint("bert", "sequence-classification")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_generation_checkpoint(tmp_path_factory.mktemp("gpt2-map"), "gpt2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_generation_checkpoint(tmp_path_factory.mktemp("llama-map"), "llama")


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return tiny_bart(tmp_path_factory.mktemp("bart-map"), "seq2seq-lm", seed=2, scale_embedding=True)


def mapped_region(model) -> tuple[int, int]:
    """The address range of the model's disk-offloaded weights (one memory-mapped file)."""
    mapped = model._lightpipe_offload
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    return start, start + len(mapped)


def on_disk(model, name: str) -> bool:
    """Whether every weight under module `name` is a view of the offload file's mapping (not anonymous memory)."""
    start, end = mapped_region(model)
    module = model.get_submodule(name)
    return all(start <= p.data_ptr() < end for p in module.parameters())


def assert_scores_equal(got, expected, tol=1e-5):
    assert [[d["label"] for d in row] for row in got] == [[d["label"] for d in row] for row in expected]
    for row_got, row_exp in zip(got, expected):
        for a, b in zip(row_got, row_exp):
            assert abs(a["score"] - b["score"]) <= tol


# ------------------------------------------------------------------ outputs equal to the unmapped model


def test_encoder_over_cpu_and_disk(bert, tmp_path):
    plain = pipeline("text-classification", model=str(bert), top_k=None)
    device_map = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "disk", "bert.encoder.layer.1": "cpu",
                  "bert.pooler": "disk", "classifier": "disk"}
    mapped = pipeline("text-classification", model=str(bert), top_k=None, device_map=device_map,
                      offload_folder=str(tmp_path / "offload"))
    assert mapped.model.hf_device_map == device_map and mapped.model.device_map == device_map
    assert on_disk(mapped.model, "bert.encoder.layer.0") and on_disk(mapped.model, "classifier")
    assert not on_disk(mapped.model, "bert.encoder.layer.1")
    assert list((tmp_path / "offload").iterdir()) == []  # the file lives on as the mapping, removed from the folder
    assert_scores_equal(mapped(TEXTS, batch_size=2), plain(TEXTS, batch_size=2))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_generation_over_cpu_and_disk(arch, gpt2, llama, tmp_path):
    folder = {"gpt2": gpt2, "llama": llama}[arch]
    plain = pipeline("text-generation", model=str(folder))
    blocks = dispatch.blocks(plain.model)
    # Every other block on disk, the first on the CPU.
    device_map = {name: ("cpu" if i % 2 == 0 else "disk") for i, name in enumerate(blocks)}
    mapped = pipeline("text-generation", model=str(folder), model_kwargs={"device_map": device_map,
                                                                          "offload_folder": str(tmp_path)})
    assert set(mapped.model.hf_device_map.values()) == {"cpu", "disk"}
    options = dict(max_new_tokens=10, do_sample=False)
    assert mapped(PROMPTS, batch_size=2, **options) == plain(PROMPTS, batch_size=2, **options)
    assert mapped(PROMPTS[0], num_beams=2, **options) == plain(PROMPTS[0], num_beams=2, **options)


def test_encoder_decoder_generation_over_cpu_and_disk(bart, tmp_path):
    plain = pipeline("text2text-generation", model=str(bart))
    device_map = {"model.shared": "cpu", "model.encoder": "disk", "model.decoder.layers.0": "cpu",
                  "model.decoder": "disk", "lm_head": "disk"}
    mapped = pipeline("text2text-generation", model=str(bart), device_map=device_map, offload_folder=str(tmp_path))
    # (the encoder's and decoder's token embeddings are the shared ones, on the CPU)
    assert on_disk(mapped.model, "model.encoder.layers.0") and on_disk(mapped.model, "model.decoder.layers.1")
    assert not on_disk(mapped.model, "model.decoder.layers.0")
    options = dict(max_new_tokens=8, num_beams=2)
    assert mapped(TEXTS, batch_size=2, **options) == plain(TEXTS, batch_size=2, **options)


def test_auto_with_max_memory_offloads(gpt2, tmp_path):
    """A CPU budget smaller than the model: the blocks that do not fit go to disk, and the outputs stay the same."""
    plain = pipeline("text-generation", model=str(gpt2))
    sizes = dispatch.block_sizes(plain.model, dispatch.blocks(plain.model), torch.float32)
    budget = sum(sizes[name] for name in ["transformer.wte", "transformer.wpe", "transformer.h.0"])
    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        mapped = pipeline("text-generation", model=str(gpt2), device_map=strategy, max_memory={"cpu": budget},
                          offload_folder=str(tmp_path))
        assert mapped.model.hf_device_map == {"transformer.wte": "cpu", "transformer.wpe": "cpu",
                                              "transformer.h.0": "cpu", "transformer.h.1": "disk",
                                              "transformer.ln_f": "disk", "lm_head": "disk"}
        assert on_disk(mapped.model, "transformer.h.1")
        assert mapped(PROMPTS[1], max_new_tokens=6, do_sample=False) == plain(PROMPTS[1], max_new_tokens=6,
                                                                              do_sample=False)
    # Pages let go of (out of memory and the page cache) are read from the disk again on the next call.
    assert dispatch.release_offloaded(mapped.model) >= sizes["transformer.h.1"]
    assert mapped(PROMPTS[0], max_new_tokens=6, do_sample=False) == plain(PROMPTS[0], max_new_tokens=6, do_sample=False)
    assert dispatch.release_offloaded(plain.model) == 0


def test_auto_without_a_limit_keeps_everything_in_memory(bert):
    pipe = pipeline("text-classification", model=str(bert), device_map="auto")
    first = 0 if torch.cuda.is_available() else "cpu"  # transformers reports CUDA devices by index
    assert set(pipe.model.hf_device_map.values()) == {first}
    assert pipe.model.hf_device_map["bert.encoder.layer.1"] == first
    assert pipe.device == torch.device("cuda:0" if first == 0 else "cpu") and pipe(TEXTS[0])[0]["label"]


def test_dispatch_a_loaded_model(bert, tmp_path):
    plain = pipeline("text-classification", model=str(bert))
    model = loading.load_model(bert, "sequence-classification")
    mapped = pipeline("text-classification", model=model, device_map={"": "cpu", "bert.encoder": "disk"},
                      offload_folder=str(tmp_path))
    assert on_disk(mapped.model, "bert.encoder")
    assert_scores_equal([mapped(TEXTS[0])], [plain(TEXTS[0])])
    with pytest.raises(InvalidInput, match="device_map"):
        pipeline("text-classification", model=model, device="cpu")


# ------------------------------------------------------------------ bad arguments


def test_device_and_device_map(bert):
    with pytest.raises(InvalidInput, match="device or device_map"):
        pipeline("text-classification", model=str(bert), device="cpu", device_map="auto")
    with pytest.raises(InvalidInput, match="twice"):
        pipeline("text-classification", model=str(bert), device_map="auto", model_kwargs={"device_map": "auto"})
    with pytest.raises(InvalidInput, match="device_map='auto'"):
        pipeline("text-classification", model=str(bert), max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize("device_map, match", [
    ({"bert": "cpu", "classifier": "gpu7"}, r"device_map\['classifier'\]"),
    ({"bert": "cpu", "classifier": "cuda:3"}, r"device_map\['classifier'\].*available here: cpu"),
    ({"bert": "cpu", "classifer": "cpu"}, "'classifer'.*top-level modules"),
    ({"bert.encoder": "cpu"}, "no device for bert.embeddings"),
    ({}, "empty"),
    ("everywhere", "neither a device nor one of auto"),
    ({"": "disk"}, "offload_folder"),
])
def test_bad_device_maps(bert, device_map, match):
    with pytest.raises(InvalidInput, match=match):
        pipeline("text-classification", model=str(bert), device_map=device_map)


@pytest.mark.parametrize("max_memory, match", [
    ({"cpu": "lots"}, "'lots' is not a size"),
    ({"cpu": "-3GB"}, "not a size"),
    ({"cpu": -1}, "non-negative"),
    ({"tpu": "1GiB"}, "max_memory key 'tpu'"),
    ({"cpu": 1000}, r"block\(s\).*offload_folder"),
    ("10GB", "dict of device"),
])
def test_bad_max_memory(bert, max_memory, match):
    with pytest.raises(InvalidInput, match=match):
        pipeline("text-classification", model=str(bert), device_map="auto", max_memory=max_memory)


def test_sizes():
    assert dispatch.parse_size("20GiB") == 20 * 2**30
    assert dispatch.parse_size("1.5GB") == 1_500_000_000
    assert dispatch.parse_size("500MB") == 500 * 10**6
    assert dispatch.parse_size("2G") == 2 * 10**9
    assert dispatch.parse_size("64 kib") == 65536
    assert dispatch.parse_size(12345) == 12345


# ------------------------------------------------------------------ devices


@pytest.mark.parametrize("device, expected", [
    (-1, "cpu"), ("cpu", "cpu"), (torch.device("cpu"), "cpu"), (None, "cpu"), ("-1", "cpu"),
])
def test_device_forms(bert, device, expected):
    assert loading.resolve_device(device) == torch.device(expected)
    pipe = pipeline("text-classification", model=str(bert), device=device)
    assert pipe.device == torch.device(expected) and pipe(TEXTS[0])[0]["label"]


@pytest.mark.parametrize("device", ["mps", "xpu", "npu", "xpu:1", 3, "cuda:5", torch.device("mps")])
def test_unavailable_devices_name_what_there_is(bert, device):
    available = loading.available_devices()
    if str(device) in available or (isinstance(device, int) and len(available) > device + 1):
        device = "cuda:99"  # this machine has it: ask for one it cannot have
    with pytest.raises(InvalidInput, match="available here: cpu"):
        pipeline("text-classification", model=str(bert), device=device)


@pytest.mark.parametrize("device, match", [
    ("meta", "holds no weights"), ("gpu", "not a device torch knows"), ("cuda:x", "not a device torch knows"),
    (1.5, "not float"), (True, "not True"),
])
def test_devices_refused(bert, device, match):
    with pytest.raises(InvalidInput, match=match):
        pipeline("text-classification", model=str(bert), device=device)
    with pytest.raises(InvalidInput):
        pipeline("text-classification", model=str(bert), device_map=device)


# ------------------------------------------------------------------ plans for accelerators (no GPU needed)

UNITS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
SIZES = {"embed": 10, "layers.0": 20, "layers.1": 20, "layers.2": 20, "layers.3": 20, "head": 10}


def test_sequential_fills_devices_in_order():
    plan = dispatch.plan_blocks(UNITS, SIZES, {"cuda:1": 40, "cuda:0": 30, "cpu": 30}, "sequential", offload=True)
    assert plan == {"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "layers.2": "cuda:1",
                    "layers.3": "cpu", "head": "cpu"}
    plan = dispatch.plan_blocks(UNITS, SIZES, {"cuda:0": 30, "cpu": 25}, "sequential", offload=True)
    assert plan["layers.1"] == "cpu" and plan["layers.2"] == "disk" and plan["head"] == "disk"


def test_balanced_spreads_over_gpus():
    budgets = {"cuda:0": 1000, "cuda:1": 1000, "cpu": 1000}
    plan = dispatch.plan_blocks(UNITS, SIZES, budgets, "balanced")
    assert plan == {"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:0", "layers.2": "cuda:0",
                    "layers.3": "cuda:1", "head": "cuda:1"}  # half of 100 plus one block of room on each
    assert dispatch.plan_blocks(UNITS, SIZES, budgets, "auto") == plan
    low = dispatch.plan_blocks(UNITS, SIZES, {"cuda:0": 1000, "cuda:1": 90, "cpu": 1000}, "balanced_low_0")
    # Only what cuda:1 cannot hold stays on the first GPU (room for generation there).
    assert low == {"embed": "cuda:0", **{f"layers.{i}": "cuda:1" for i in range(4)}, "head": "cuda:1"}


def test_plans_with_one_gpu_offload_behind_it():
    plan = dispatch.plan_blocks(UNITS, SIZES, {"cuda:0": 50, "cpu": 30}, "auto", offload=True)
    assert plan == {"embed": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:0", "layers.2": "cpu",
                    "layers.3": "disk", "head": "disk"}
    # CPU and disk blocks run on the main device: the first accelerator in the map.
    main = dispatch._main_device(plan.values())
    assert main == torch.device("cuda:0")
    assert dispatch.execution_device("disk", main) == main and dispatch.execution_device("cuda:1", main).index == 1
    assert dispatch._main_device(["cpu", "disk"]) == torch.device("cpu")
    assert dispatch._reported("cuda:1") == 1 and dispatch._reported("disk") == "disk"
    with pytest.raises(InvalidInput, match="offload_folder"):
        dispatch.plan_blocks(UNITS, SIZES, {"cuda:0": 50, "cpu": 30}, "auto")


def test_block_hook_moves_inputs_and_outputs():
    """The hook of a block: its inputs reach its execution device, outputs come back to the main device (here both
    the CPU; on a GPU machine the same path moves them)."""
    layer = torch.nn.Linear(4, 3)
    hook = dispatch.BlockHook(layer, torch.device("cpu"), torch.device("cpu"))
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert hook.remote == [] and hook._saved == []
    hook.remove()
    nested = dispatch._move({"a": [x, (x, 3)], "b": "text"}, torch.device("cpu"))
    assert nested["a"][1][1] == 3 and nested["b"] == "text" and nested["a"][0] is x


def test_cache_follows_each_layer_device():
    """A cache moved whole (to a device_map's main device) and per layer on first use (layers on other devices)."""
    cache = KVCache(2, 1, 2, 4, 8, dtype=torch.float32, device="cpu")
    cache.set_left_padding(torch.tensor([1]))
    assert cache.to("cpu") is cache and cache.padding.device.type == "cpu"
    k = torch.randn(1, 2, 3, 4)
    keys, values = cache.update(1, k, k)
    assert torch.equal(keys, k) and keys.device == k.device


# ------------------------------------------------------------------ low-memory loading

PEAK_SCRIPT = """
import json, sys
import torch
from lightpipe import loading

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

folder, dtype = sys.argv[1], sys.argv[2]
loading.RELEASE_EVERY = 4 << 20  # this checkpoint is small: a window of pages to match
config = loading.load_config(__import__("pathlib").Path(folder))
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
model = loading.load_model(folder, "causal-lm", dtype=dtype, config=config)
size = sum(t.nbytes for t in model.state_dict().values() if t.data_ptr() not in ())
size = sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())  # tied weights once
print(json.dumps({"growth": status("VmHWM") - before, "size": size}))
"""


def opt_checkpoint(folder, dtype, **sizes):
    """An OPT-shaped checkpoint of random weights written tensor by tensor (no model built in memory)."""
    import json as _json

    import transformers
    from safetensors.torch import save_file

    config = transformers.OPTConfig(**sizes)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.OPTForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    state = {k: (0.02 * torch.randn(shape, generator=gen)).to(dtype) for k, shape in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = config.to_dict()
    raw["architectures"] = ["OPTForCausalLM"]
    (folder / "config.json").write_text(_json.dumps(raw))
    return folder


def test_loading_peak_memory_stays_near_the_model_size(tmp_path):
    """A float32 checkpoint loaded in bfloat16: each tensor goes from the mapped file to its bfloat16 copy, so the
    process grows by the model's bfloat16 size and little more (never the float32 file's size)."""
    import json as _json
    import subprocess
    import sys

    folder = opt_checkpoint(tmp_path / "opt", torch.float32, hidden_size=512, num_hidden_layers=6, ffn_dim=2048,
                            num_attention_heads=8, vocab_size=8192, max_position_embeddings=128,
                            word_embed_proj_dim=512)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), "bfloat16"], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    result = _json.loads(out.stdout.strip().splitlines()[-1])
    file_size = (folder / "model.safetensors").stat().st_size
    assert result["size"] < 0.55 * file_size  # bfloat16, half the float32 file
    assert result["growth"] < 1.3 * result["size"], result


def test_accelerator_path_with_meta_standing_in(gpt2):
    """The path of a GPU main device, run with "meta" standing in for the accelerator: every block hooked, its weights
    copied to the execution device for the call and given back after, inputs moved there, the generation cache made
    there. Shapes flow; the stored weights never move."""
    layer = torch.nn.Linear(4, 3)
    hook = dispatch.BlockHook(layer, torch.device("meta"), torch.device("meta"))
    assert {name for _, name, _ in hook.remote} == {"weight", "bias"}
    out = layer(torch.randn(2, 4))
    assert out.device.type == "meta" and out.shape == (2, 3)
    assert layer.weight.device.type == "cpu" and hook._saved == []

    model = loading.load_model(gpt2, "causal-lm")
    stored = {k: v.data_ptr() for k, v in model.state_dict().items()}
    mapping = {name: "cpu" for name in dispatch.blocks(model)}
    dispatch.attach(model, dispatch.DevicePlacer(mapping, torch.device("meta"), None))
    assert len(model._lightpipe_hooks) == len(mapping) and model.hf_device_map == mapping
    cache = model.new_cache(1, 8)
    assert cache.device.type == "meta"
    logits = model.decode_step(torch.tensor([[5, 6, 7]]), cache)
    assert logits.device.type == "meta" and logits.shape == (1, 3, model.config.vocab_size)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == stored
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_parts_outside_blocks_stay_on_an_accelerator_main_device(gpt2):
    """With a GPU as main device, embeddings, final norm and head (read directly by model code, never called through
    a hook) are pinned to it; blocks keep their places. On the CPU nothing changes."""
    model = loading.build_model(loading.load_config(gpt2), "causal-lm")
    mapping = {"transformer.wte": "cpu", "transformer.wpe": "cuda:0", "transformer.h.0": "cuda:1",
               "transformer.h.1": "disk", "transformer.ln_f": "disk", "lm_head": "cuda:1"}
    pinned = dispatch.pin_parts_outside_blocks(model, mapping, torch.device("cuda:0"))
    assert pinned == {"transformer.wte": "cuda:0", "transformer.wpe": "cuda:0", "transformer.h.0": "cuda:1",
                      "transformer.h.1": "disk", "transformer.ln_f": "cuda:0", "lm_head": "cuda:0"}
    assert dispatch.pin_parts_outside_blocks(model, mapping, torch.device("cpu")) == mapping
    # A part holding blocks is split into its units (its own forward is reached through a method, not a call).
    whole = dispatch.pin_parts_outside_blocks(model, {"": "cuda:0", "transformer": "disk", "transformer.h.1": "cpu"},
                                              torch.device("cuda:0"))
    assert whole == {"transformer.wte": "cuda:0", "transformer.wpe": "cuda:0", "transformer.h.0": "disk",
                     "transformer.h.1": "cpu", "transformer.ln_f": "cuda:0", "lm_head": "cuda:0"}
