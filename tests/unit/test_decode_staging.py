"""The packed inputs of a decode graph step (`kiln.runtime.cuda_graphs.stage_step`), on the CPU."""

from __future__ import annotations

import torch

from kiln.runtime.cuda_graphs import stage_step, staged_views, staged_words


def test_a_step_lands_in_its_views_and_pads_to_the_bucket():
    n, blocks = 8, 5
    buffer = torch.full((staged_words(n, blocks),), 99, dtype=torch.int64)
    used = stage_step(
        buffer, n, blocks, 4, [11, 12, 13], [7, 3, 20], [70, 33, 201], [8, 4, 21], [[4], [2], [6, 9]], ([1], [2])
    )
    tokens, lens, tables = staged_views(buffer, n, blocks)
    assert tokens[:, :4].tolist() == [[11, 12, 13, 0], [7, 3, 20, 0], [70, 33, 201, -1], [-1, 2, -1, -1]]
    assert lens[:4].tolist() == [8, 4, 21, 1]
    assert tables[:3, :2].tolist() == [[4, 0], [2, 0], [6, 9]]
    # The graph of bucket 4 reads the tokens, the lengths and 4 table rows: the first `used` words, no fewer.
    end_of_rows = tables[4].data_ptr() - buffer.data_ptr()  # bytes up to the first table row it does not read
    assert (used - 1) * 8 < end_of_rows <= used * 8 < staged_words(n, blocks) * 8


def test_views_share_the_buffer_without_overlap():
    n, blocks = 3, 3
    buffer = torch.zeros(staged_words(n, blocks), dtype=torch.int64)
    tokens, lens, tables = staged_views(buffer, n, blocks)
    tokens.fill_(1)
    lens.fill_(2)
    tables.fill_(3)
    words = buffer.view(torch.int32)
    assert (words[: 8 * n] == torch.tensor([1, 0] * 4 * n, dtype=torch.int32)).all()  # int64 ones, little-endian
    assert (words[8 * n : 9 * n] == 2).all() and (words[9 * n : 9 * n + n * blocks] == 3).all()
    assert words.numel() >= 9 * n + n * blocks
