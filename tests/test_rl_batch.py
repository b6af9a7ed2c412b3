"""build_batch alignment (by hand) and split_micro_batches."""

import pytest
import torch

from megatron_rpt.rl import build_batch, build_micro_batches, split_micro_batches

P0, P1, P2, R0, R1 = 11, 12, 13, 21, 22


def test_alignment_by_hand():
    batch = build_batch(
        prompt_ids=[[P0, P1, P2], [31]],
        response_ids=[[R0, R1], [41, 42, 43]],
        advantages=[0.5, [1.0, 2.0, 3.0]],  # per sequence, and per token
        old_logprobs=[[-0.1, -0.2], torch.tensor([-1.0, -2.0, -3.0])],
        ref_logprobs=[[-0.3, -0.4], [-4.0, -5.0, -6.0]],
        pad_id=0,
    )
    assert batch.tokens.tolist() == [[P0, P1, P2, R0, R1], [31, 41, 42, 43, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    # logits at position t predict tokens[t + 1]: positions 2 and 3 predict r0 and r1
    assert batch.labels.tolist() == [[P1, P2, R0, R1, 0], [41, 42, 43, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch.advantages.tolist() == [[0, 0, 0.5, 0.5, 0], [1, 2, 3, 0, 0]]
    torch.testing.assert_close(batch.old_logprobs, torch.tensor([[0, 0, -0.1, -0.2, 0], [-1, -2, -3, 0, 0.0]]))
    torch.testing.assert_close(batch.ref_logprobs, torch.tensor([[0, 0, -0.3, -0.4, 0], [-4, -5, -6, 0, 0.0]]))
    assert batch.labels[0, 2] == R0 and batch.labels[0, 3] == R1
    assert batch.prompt_lengths.tolist() == [3, 1] and batch.response_lengths.tolist() == [2, 3]
    assert batch.num_tokens == 5 and batch.num_seqs == 2


def test_padding_multiple_and_empty_response():
    batch = build_batch([[1, 2], [3]], [[4, 5, 6], []], advantages=[1.0, -1.0], pad_id=7, pad_to_multiple_of=4)
    assert batch.tokens.shape == (2, 8)
    assert batch.tokens[1].tolist() == [3, 7, 7, 7, 7, 7, 7, 7]
    assert batch.loss_mask[1].sum() == 0 and batch.num_seqs == 1 and batch.num_tokens == 3
    assert batch.old_logprobs is None and batch.ref_logprobs is None


def test_split_micro_batches_trims_and_preserves_rows():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 50, (n,), generator=g) for n in (2, 9, 3, 1, 4)]
    responses = [torch.randint(1, 50, (n,), generator=g) for n in (3, 5, 1, 2, 6)]
    old = [torch.randn(len(r), generator=g) for r in responses]
    batch = build_batch(prompts, responses, [0.1, 0.2, 0.3, 0.4, 0.5], old_logprobs=old, pad_to_multiple_of=2)
    micro = split_micro_batches(batch, 2)
    assert [m.size for m in micro] == [2, 2, 1]
    # widths: longest row of each chunk (14, 4, 10) rounded up to a multiple of 2
    assert [m.tokens.shape[1] for m in micro] == [14, 4, 10]
    assert sum(m.num_tokens for m in micro) == batch.num_tokens
    row = 0
    for m in micro:
        width = m.tokens.shape[1]
        for name in ("tokens", "labels", "loss_mask", "advantages", "old_logprobs", "position_ids"):
            full = getattr(batch, name)[row:row + m.size]
            assert torch.equal(getattr(m, name), full[:, :width]), name
            assert not full[:, width:].count_nonzero() or name == "position_ids"
        row += m.size
    with pytest.raises(ValueError, match="micro_batch_size"):
        split_micro_batches(batch, 0)


def test_same_shape_micro_batches_for_pipeline_schedules():
    samples = [([1, 2], [3, 4, 5]), ([6], [7]), ([8, 9, 10], [11, 12, 13, 14]), ([15], [16, 17])]
    micro = build_micro_batches(samples, [1.0, -1.0, 0.5, 2.0], micro_batch_size=3, pad_token_id=0,
                                old_logprobs=[[-1.0] * 3, [-2.0], [-3.0] * 4, [-4.0] * 2])
    assert len(micro) == 2
    assert {tuple(mb[k].shape) for mb in micro for k in ("tokens", "labels", "loss_mask", "advantages",
                                                         "old_logprobs", "position_ids")} == {(3, 7)}
    assert "ref_logprobs" not in micro[0]
    # the filler rows of the last micro-batch carry no loss and no sequence
    last = micro[1]
    assert last["tokens"][1:].count_nonzero() == 0 and last["loss_mask"][1:].sum() == 0
    assert last["position_ids"][2].tolist() == list(range(7))
    assert sum(int(mb["loss_mask"].sum()) for mb in micro) == 3 + 1 + 4 + 2
    assert int((micro[1]["response_lengths"] > 0).sum()) == 1
    # same rows, same values as the unsplit batch
    full = build_batch([p for p, _ in samples], [r for _, r in samples], [1.0, -1.0, 0.5, 2.0])
    assert torch.equal(micro[0]["labels"], full.labels[:3]) and torch.equal(micro[1]["labels"][:1], full.labels[3:])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="empty prompt"):
        build_batch([[]], [[1]], [1.0])
    with pytest.raises(ValueError, match=r"old_logprobs\[0\] has 1 values but the response has 2"):
        build_batch([[1]], [[2, 3]], [1.0], old_logprobs=[[0.1]])
    with pytest.raises(ValueError, match="max_length=3"):
        build_batch([[1, 2]], [[3, 4]], [1.0], max_length=3)
    with pytest.raises(ValueError, match="advantages"):
        build_batch([[1]], [[2]], [1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        build_batch([[1]], [[2]], [1.0], old_logprobs=[0.5])
