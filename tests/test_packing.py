"""Packed LM rows: spans within a token budget, the packed ids, positions and attention mask."""

from __future__ import annotations

import pytest
import torch

from tapioca.models.packing import pack_rows, pack_spans


def test_pack_spans_fill_a_token_budget_in_order_with_one_row_at_least():
    assert pack_spans([3, 4, 5, 1], 7) == [(0, 2), (2, 4)]
    assert pack_spans([10, 2, 2], 5) == [(0, 1), (1, 3)]  # a row longer than the budget goes alone
    assert pack_spans([], 5) == []


def test_pack_rows_lays_rows_end_to_end_after_the_shared_prefix():
    ids = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 5, 0, 0]])
    pack = pack_rows(ids, torch.tensor([4, 3]), shared=2)
    assert pack.ids.tolist() == [[3, 4, 5]]
    assert pack.position_ids.tolist() == [[2, 3, 2]]  # positions within each row, after the prefix
    assert pack.starts.tolist() == [0, 2]
    assert pack.allowed.shape == (1, 1, 3, 5)
    assert pack.allowed[0, 0].int().tolist() == [[1, 1, 1, 0, 0],   # prefix, then its own row causally
                                                 [1, 1, 1, 1, 0],
                                                 [1, 1, 0, 0, 1]]   # row 2 never sees row 1
    assert pack.index(torch.tensor([[2, 3], [2, 2]]), shared=2).tolist() == [[0, 1], [2, 2]]


def test_pack_masks_for_sdpa_and_eager_and_a_clear_error_otherwise():
    pack = pack_rows(torch.tensor([[7, 8], [9, 0]]), torch.tensor([2, 1]), shared=0)
    assert pack.attention_mask("sdpa", torch.float32) is pack.allowed
    additive = pack.attention_mask("eager", torch.float32)
    assert additive.dtype == torch.float32 and (additive[pack.allowed] == 0).all()
    assert (additive[~pack.allowed] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="flash_attention_2.*known"):
        pack.attention_mask("flash_attention_2", torch.float32)
