"""DeBERTa-v2/v3 against transformers on tiny random checkpoints (weights at std 0.2): every head's outputs on a
right-padded batch, and every row of right- and left-padded batches against the text alone, for the v3 layout and
for variants of the disentangled attention (absolute positions, separate position projections, one relative
term, no buckets, no relative attention, token types, the convolution layer, a narrow embedding)."""

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (the oracle)

from deberta_helpers import encode, reference_deberta, tiny_deberta
from helpers import PAIRS, TEXTS
from lightpipe.errors import UnsupportedModel
from lightpipe.loading import load_model
from lightpipe.models.deberta_v2 import DebertaV2Config, log_bucket

SEQUENCE_OUTPUTS = {"sequence-classification": {"logits"}}  # one row per text; other outputs one row per token
LONG = ("The river flows through the old city at night, and John Smith works at Google in London while Mary "
        "lives in Berlin, Germany.")  # past the buckets and the 16 relative positions of the variants
PARITY_TEXTS = TEXTS + [LONG]
PARITY_PAIRS = PAIRS + ["What is the capital of England?"]

VARIANTS = {
    "v3": {},
    "v2-absolute-positions-separate-keys-types": dict(position_biased_input=True, share_att_key=False,
                                                      type_vocab_size=2, norm_rel_ebd="none"),
    "no-buckets-clamped": dict(position_buckets=-1, max_relative_positions=16),
    "c2p-only": dict(pos_att_type=["c2p"], share_att_key=False),
    "p2c-only-string": dict(pos_att_type="p2c"),
    "no-relative-attention": dict(relative_attention=False, position_biased_input=True, pos_att_type=None),
    "conv-and-narrow-embedding": dict(conv_kernel_size=3, conv_groups=2, embedding_size=16, type_vocab_size=2),
}


@pytest.fixture(scope="module")
def deberta(tmp_path_factory):
    made = {}

    def make(head: str, variant: str = "v3", **extra):
        key = (head, variant, tuple(sorted(extra.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"deberta-{head}-{variant}")
            made[key] = tiny_deberta(folder, head, **VARIANTS[variant], **extra)
        return made[key]

    return make


def assert_parity(folder, head, pairs=None, tol=1e-4):
    """lightpipe's model against transformers' on a right-padded batch (real tokens), and every row of a right-
    and a left-padded batch against transformers on that text alone."""
    ours, ref = load_model(folder, head), reference_deberta(folder, head)
    texts = PARITY_TEXTS
    pairs = None if pairs is None else PARITY_PAIRS
    sequence_keys = SEQUENCE_OUTPUTS.get(head, set())
    with torch.inference_mode():
        alone = [ref(**encode(folder, [t], None if pairs is None else [pairs[i]])) for i, t in enumerate(texts)]
        right = encode(folder, texts, pairs)
        assert right["attention_mask"].float().mean() < 0.9  # the batch is padded
        got, want = ours(**right), ref(**right)
        assert set(got) == {k for k in want.keys() if k not in ("hidden_states", "attentions")}
        for key, value in got.items():
            real = slice(None) if key in sequence_keys else right["attention_mask"].bool()
            assert (value[real] - want[key][real]).abs().max() <= tol, (head, key)
        for side in ("right", "left"):
            batch = right if side == "right" else encode(folder, texts, pairs, "left")
            out = ours(**batch)
            for i, single in enumerate(alone):
                mask = batch["attention_mask"][i].bool()
                for key, value in out.items():
                    row = value[i] if key in sequence_keys else value[i][mask]
                    assert (row - single[key][0]).abs().max() <= tol, (head, key, side, texts[i])
    return got


@pytest.mark.parametrize("head", ["base", "sequence-classification", "token-classification", "question-answering",
                                  "masked-lm"])
def test_v3_heads_equal_transformers(deberta, head):
    assert_parity(deberta(head), head, pairs=True if head == "sequence-classification" else None)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "v3"])
def test_attention_variants_equal_transformers(deberta, variant):
    assert_parity(deberta("sequence-classification", variant), "sequence-classification", pairs=True)


def test_masked_lm_with_its_own_head_layout(deberta):
    """legacy=False: lm_predictions.lm_head.* scores against the word embeddings themselves."""
    folder = deberta("masked-lm", legacy=False)
    logits = assert_parity(folder, "masked-lm")["logits"]
    assert logits.shape[-1] == load_model(folder, "base").config.vocab_size


def test_base_model_loads_from_a_classifier_checkpoint(deberta):
    folder = deberta("sequence-classification")
    batch = encode(folder, TEXTS)
    with torch.inference_mode():
        got = load_model(folder, "base")(**batch)["last_hidden_state"]
        want = reference_deberta(folder, "base")(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4


def test_log_buckets_equal_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    relative = torch.arange(-600, 601)[:, None] - torch.zeros(1, dtype=torch.long)
    for buckets, max_position in ((256, 512), (8, 64), (32, 128)):
        want = make_log_bucket_position(relative, buckets, max_position).long()
        assert torch.equal(log_bucket(relative, buckets, max_position), want)


def test_configs_that_cannot_be_built_are_refused():
    with pytest.raises(UnsupportedModel, match="multiple of num_attention_heads"):
        DebertaV2Config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(UnsupportedModel, match="pooler_hidden_size"):
        DebertaV2Config(hidden_size=32, num_attention_heads=4, pooler_hidden_size=16)
    with pytest.raises(UnsupportedModel, match="activation"):
        DebertaV2Config(hidden_size=32, num_attention_heads=4, hidden_act="nope")


def assert_results_equal(got, want):
    """Plain pipeline results: equal structure, texts, labels and offsets; floats within 1e-4."""
    if isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_results_equal(g, w)
    elif isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            assert_results_equal(got[key], want[key])
    elif isinstance(want, (float, np.floating)):
        assert abs(got - float(want)) <= 1e-4
    else:
        assert got == want


PIPELINE_CALLS = [
    ("text-classification", "sequence-classification", TEXTS, dict(top_k=None)),
    ("text-classification", "sequence-classification", [{"text": TEXTS[1], "text_pair": PAIRS[1]}], {}),
    ("token-classification", "token-classification", TEXTS, dict(ignore_labels=[])),
    ("token-classification", "token-classification", TEXTS, dict(aggregation_strategy="simple", ignore_labels=[])),
    ("fill-mask", "masked-lm", ["Paris is the [MASK] of France.", "John [MASK] at Google."], {}),
    ("feature-extraction", "base", TEXTS, {}),
]


@pytest.mark.parametrize("task, head, inputs, params", PIPELINE_CALLS)
def test_bert_family_pipelines_equal_transformers(deberta, task, head, inputs, params):
    import lightpipe

    folder = str(deberta(head))
    ours, ref = lightpipe.pipeline(task, model=folder), transformers.pipeline(task, model=folder)
    assert_results_equal(ours(inputs, batch_size=4, **params), ref(inputs, **params))


def question_answering_tests():
    """The question-answering tests' module (its transformers 5.2.0 oracle and cases), loaded from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tasks" / "test_question_answering.py"
    spec = importlib.util.spec_from_file_location("question_answering_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_question_answering_pipeline_equals_transformers(deberta, tmp_path):
    """Answers, offsets (SentencePiece pieces carry their leading space) and scores against transformers 5.2.0,
    the last release with this pipeline, over windows, lists of questions and odd text."""
    import lightpipe

    qa = question_answering_tests()
    names = ["short-top3", "short-impossible-top3", "odd-text", "no-align", "windows-top3", "question-list",
             "pairwise-lists"]
    calls = [qa.CASES[name][0] for name in names]
    folder = deberta("question-answering")
    [reference] = qa.run_oracle([{"model": str(folder), "calls": calls}], tmp_path)
    ours = lightpipe.pipeline("question-answering", model=str(folder))
    for name, call, want in zip(names, calls, reference):
        assert "ok" in want, (name, want)
        qa.assert_same(ours(**call, batch_size=4), want["ok"])


def test_a_sentencepiece_model_without_tokenizer_json_says_how_to_convert_it(tmp_path):
    from lightpipe.errors import CheckpointError
    from lightpipe.processing.text import Tokenizer

    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "DebertaV2Tokenizer"}')
    (tmp_path / "spm.model").write_bytes(b"\x0a\x00")
    with pytest.raises(CheckpointError, match=r"spm\.model.*save_pretrained"):
        Tokenizer.from_folder(tmp_path)


def test_extra_weights_of_hub_v3_checkpoints_are_ignored(deberta, tmp_path):
    """v3 pretraining leftovers: an absolute position table although position_biased_input is false, and the
    replaced-token-detection head (mask_predictions.*); transformers ignores both."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = deberta("sequence-classification")
    copy = tmp_path / "with-extras"
    shutil.copytree(folder, copy)
    state = load_file(str(copy / "model.safetensors"))
    state["deberta.embeddings.position_embeddings.weight"] = torch.randn(128, 32)
    state["mask_predictions.dense.weight"] = torch.randn(32, 32)
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    batch = encode(folder, TEXTS, PAIRS)
    with torch.inference_mode():
        got = load_model(copy, "sequence-classification")(**batch)["logits"]
        want = load_model(folder, "sequence-classification")(**batch)["logits"]
    assert torch.equal(got, want)
