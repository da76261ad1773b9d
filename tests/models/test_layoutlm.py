"""LayoutLM (v1): logits and hidden states equal transformers' on tiny random checkpoints, with boxes."""

from __future__ import annotations

import pytest
import torch

from layoutlm_helpers import layoutlm_checkpoint
from lightpipe import InvalidInput, loading, pipeline
from lightpipe.models import layoutlm

ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        "qa": layoutlm_checkpoint(tmp_path_factory.mktemp("layoutlm-qa"), "bert", head="qa"),
        "base": layoutlm_checkpoint(tmp_path_factory.mktemp("layoutlm-base"), "bert", head="base", seed=1),
    }


def reference(folder, head: str):
    import transformers

    cls = transformers.LayoutLMForQuestionAnswering if head == "qa" else transformers.LayoutLMModel
    return cls.from_pretrained(str(folder)).eval()


def inputs(batch: int, length: int, seed: int = 0):
    """Random ids, boxes (with zero and full-page boxes), token types, and a mask with padding in row 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 150, (batch, length), generator=gen)
    corner = torch.randint(0, 600, (batch, length, 2), generator=gen)
    size = torch.randint(0, 400, (batch, length, 2), generator=gen)
    bbox = torch.cat([corner, corner + size], dim=-1)  # (B, T, 4): x0, y0, x1, y1
    bbox[:, 0] = 0  # CLS
    bbox[:, -1] = 1000  # SEP
    types = torch.zeros(batch, length, dtype=torch.long)
    types[:, length // 2:] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 5:] = 0
    return ids, bbox, mask, types


def test_question_answering_logits_equal_reference(folders):
    ours = loading.load_model(folders["qa"], "document-question-answering")
    ref = reference(folders["qa"], "qa")
    ids, bbox, mask, types = inputs(2, 17)
    with torch.no_grad():
        expected = ref(input_ids=ids, bbox=bbox, attention_mask=mask, token_type_ids=types)
    got = ours(ids, bbox, mask, types)
    real = mask.bool()  # padded positions are never read; lightpipe skips them
    for name in ("start_logits", "end_logits"):
        assert got[name].shape == (2, 17)
        torch.testing.assert_close(got[name][real], getattr(expected, name)[real], atol=ATOL, rtol=0)
    # The boxes matter: moving them changes the logits.
    moved = ours(ids, (bbox + 3).clamp(max=1000), mask, types)
    assert (moved["start_logits"] - got["start_logits"])[real].abs().max() > 1e-3


def test_batch_equals_single_rows(folders):
    ours = loading.load_model(folders["qa"], "document-question-answering")
    ids, bbox, mask, types = inputs(2, 15, seed=3)
    batched = ours(ids, bbox, mask, types)
    for row in range(2):
        keep = mask[row].bool()
        single = ours(ids[row:row + 1, keep], bbox[row:row + 1, keep], None, types[row:row + 1, keep])
        for name in ("start_logits", "end_logits"):
            torch.testing.assert_close(batched[name][row, keep], single[name][0], atol=1e-5, rtol=0)


def test_base_model_hidden_states_and_pooler_equal_reference(folders):
    ours = loading.load_model(folders["base"], "base")
    ref = reference(folders["base"], "base")
    ids, bbox, mask, types = inputs(2, 12, seed=5)
    with torch.no_grad():
        expected = ref(input_ids=ids, bbox=bbox, attention_mask=mask, token_type_ids=types)
    got = ours(ids, bbox, mask, types)
    real = mask.bool()
    torch.testing.assert_close(got["last_hidden_state"][real], expected.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["pooler_output"], expected.pooler_output, atol=ATOL, rtol=0)


def test_missing_bbox_means_zero_boxes_as_in_reference(folders):
    ours = loading.load_model(folders["qa"], "document-question-answering")
    ref = reference(folders["qa"], "qa")
    ids, _, _, _ = inputs(1, 9, seed=7)
    with torch.no_grad():
        expected = ref(input_ids=ids).start_logits
    torch.testing.assert_close(ours(ids)["start_logits"], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("box", [[-1, 0, 5, 5], [0, 0, 1024, 5], [10, 0, 5, 5], [0, 10, 5, 5]])
def test_boxes_outside_the_grid_are_invalid_input(folders, box):
    ours = loading.load_model(folders["qa"], "document-question-answering")
    ids = torch.tensor([[2, 50, 60, 3]])
    bbox = torch.tensor([[[0, 0, 0, 0], box, [1, 1, 2, 2], [1000] * 4]])
    with pytest.raises(InvalidInput, match="0..1023"):
        ours(ids, bbox)
    assert ours(ids, bbox.clamp(0, 1000).sort(dim=-1).values)["start_logits"].shape == (1, 4)


def test_registry_and_task_inference(folders):
    assert layoutlm.HEADS["document-question-answering"] is layoutlm.LayoutLMForQuestionAnswering
    pipe = pipeline(model=str(folders["qa"]))  # the task comes from config.json's architectures
    assert pipe.task == "document-question-answering"
    assert type(pipe.model) is layoutlm.LayoutLMForQuestionAnswering
    assert pipe.model.config.max_2d_position_embeddings == 1024


@pytest.mark.parametrize("types", [[[0, 0, 1, 2]], [[0, -1, 0, 0]]])
def test_token_types_outside_the_table_are_invalid_input(folders, types):
    # transformers fails here with an opaque IndexError (a device-side assert on a GPU).
    ours = loading.load_model(folders["qa"], "document-question-answering")
    ids = torch.tensor([[2, 50, 60, 3]])
    bbox = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2], [1000] * 4]])
    with pytest.raises(InvalidInput, match="type_vocab_size is 2"):
        ours(ids, bbox, None, torch.tensor(types))
    assert ours(ids, bbox, None, torch.tensor([[0, 0, 1, 1]]))["start_logits"].shape == (1, 4)
