"""The instruction's positions (the text after each sample's last visual token) decide the text signals' shapes,
so their counts reach the host: read with the prefill's own counts where every sample's visual tokens are one
block, since pruning inside a block leaves the text after it as it was; read at each state otherwise."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.runtime.sequence import Call
from prunekit.runtime.signals import ends_rows, instruction, text_after
from prunekit.testing import assert_pruned, count_ops, tiny_llava, tiny_llava_inputs


def _call(vis_pos, valid) -> Call:
    return Call(mode="prefill", pos=None, valid=valid, vis_pos=vis_pos)


def _reads(fn):
    out, count = count_ops(fn)
    return out, count.syncs


def _later(call: Call, keep: list[list[int]]) -> tuple[list, torch.Tensor]:
    """A later state: each sample keeps the visual tokens ``keep[b]`` (indices into its current ones), its rows
    padded on the left to the longest, as a stage inside the language model leaves them."""
    rows = []
    for b, v in enumerate(call.vis_pos):
        dropped = set(v.tolist()) - {v[i].item() for i in keep[b]}
        rows.append([r for r in call.valid[b].nonzero().squeeze(1).tolist() if r not in dropped])
    n = max(len(r) for r in rows)
    vis = [torch.tensor([n - len(r) + r.index(v[i].item()) for i in keep[b]], dtype=torch.long)
           for b, (r, v) in enumerate(zip(rows, call.vis_pos))]
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for b, r in enumerate(rows):
        valid[b, n - len(r):] = True
    return vis, valid


def test_one_block_per_sample_is_read_once_and_gives_the_read_positions():
    # sample 0: 3 text, 6 visual (3..8), 5 text; sample 1: left-padded by 2, 2 text, 6 visual (4..9), 4 text
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, :2] = False
    call = _call([torch.arange(3, 9), torch.arange(4, 10)], valid)
    first, reads = _reads(lambda: instruction(call, call.vis_pos, call.valid))
    assert reads == 1 and [t.tolist() for t in first] == [list(range(9, 14)), list(range(10, 14))]
    for keep in ([[0, 5], [2]], [[1], [0]]):  # the last visual token kept or pruned, rows padded or not
        call.vis_pos, call.valid = _later(call, keep)
        text, reads = _reads(lambda: instruction(call, call.vis_pos, call.valid))
        assert reads == 0
        assert [t.tolist() for t in text] == [t.tolist() for t in text_after(call.vis_pos, call.valid)]


def test_rows_that_end_with_their_instruction_take_its_last_positions_without_a_read():
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, :2] = False  # left padding: the rows still end with their instructions
    call = _call([torch.arange(3, 9), torch.arange(4, 10)], valid)
    call.instruction_counts, call.instruction_tail = [5, 4], True  # as the prefill's read gives them
    for keep in (None, [[0, 5], [2]], [[1], [0]]):
        if keep is not None:
            call.vis_pos, call.valid = _later(call, keep)
        text, count = count_ops(lambda: instruction(call, call.vis_pos, call.valid))
        assert count.syncs == 0 and count.launches <= 2  # one arange per distinct count
        assert [t.tolist() for t in text] == [t.tolist() for t in text_after(call.vis_pos, call.valid)]
        assert ends_rows(call, text)


def test_text_between_visual_tokens_is_read_at_each_state():
    # two images with text between them: pruning all of the second leaves more text after the last visual token
    valid = torch.ones(1, 16, dtype=torch.bool)
    call = _call([torch.tensor([2, 3, 4, 8, 9, 10])], valid)
    first, reads = _reads(lambda: instruction(call, call.vis_pos, call.valid))
    assert reads == 1 and first[0].tolist() == list(range(11, 16))
    call.vis_pos, call.valid = _later(call, [[0, 2]])  # the second image's tokens all pruned
    text, reads = _reads(lambda: instruction(call, call.vis_pos, call.valid))
    assert reads == 1 and text[0].tolist() == list(range(4, 12))


def test_a_sample_left_without_visual_tokens_is_read():
    valid = torch.ones(2, 10, dtype=torch.bool)
    call = _call([torch.arange(2, 6), torch.arange(2, 6)], valid)
    instruction(call, call.vis_pos, call.valid)
    call.vis_pos, call.valid = [torch.arange(2, 4), torch.zeros(0, dtype=torch.long)], \
        torch.stack([valid[0, :8], torch.cat([torch.zeros(2, dtype=torch.bool), valid[1, :6]])])
    text, reads = _reads(lambda: instruction(call, call.vis_pos, call.valid))
    assert reads == 1 and [t.tolist() for t in text] == [[4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]


def test_the_first_state_read_after_a_later_one_is_read_again():
    # a stage reading the prompt's first state (layer_input layer="first") after the sequence changed
    valid = torch.ones(1, 12, dtype=torch.bool)
    call = _call([torch.arange(2, 8)], valid)
    first_pos, first_valid = call.vis_pos, call.valid
    call.vis_pos, call.valid = _later(call, [[1, 3]])
    later = instruction(call, call.vis_pos, call.valid)
    text, reads = _reads(lambda: instruction(call, first_pos, first_valid))
    assert reads == 1 and text[0].tolist() == list(range(8, 12)) and later[0].tolist() == [4, 5, 6, 7]


def _checked_prefill(monkeypatch, method: str, inputs: dict, model) -> list[int]:
    """Run a pruned prefill with every instruction the stages take checked against the one read from the device;
    returns, per instruction taken, how many host reads it made."""
    from prunekit.runtime import signals

    taken = signals.instruction
    reads = []

    def checked(call, vis_pos, valid):
        text, count = count_ops(lambda: taken(call, vis_pos, valid))
        assert [t.tolist() for t in text] == [t.tolist() for t in text_after(vis_pos, valid)]
        reads.append(count.syncs)
        return text

    monkeypatch.setattr(signals, "instruction", checked)
    prunekit.build(method, model, keep_tokens=24 if method == "pdrop" else 8, budget_meaning="nominal")
    with torch.no_grad():
        model(**inputs)
    assert_pruned(model)
    return reads


@pytest.mark.parametrize("method", ["tops", "pdrop", "sparsevlm"])
def test_a_prefill_of_one_image_per_sample_reads_no_instruction_in_its_stages(monkeypatch, method):
    model = tiny_llava(num_layers=4)
    reads = _checked_prefill(monkeypatch, method, tiny_llava_inputs(model), model)  # left-padded batch of 2
    assert reads and not any(reads)  # the prefill's own read gave the counts


@pytest.mark.parametrize("pad", ["left", "right"])
def test_the_prefill_knows_whether_rows_end_with_their_instruction(monkeypatch, pad):
    from prunekit.runtime import signals

    model = tiny_llava(num_layers=4)
    inputs = tiny_llava_inputs(model)  # left-padded
    if pad == "right":  # the same rows padded after their instructions: the text is not the rows' last positions
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        order = torch.argsort(mask, dim=1, descending=True, stable=True)
        inputs = {**inputs, "input_ids": ids.gather(1, order), "attention_mask": mask.gather(1, order)}
    ends = []
    taken = signals.ends_rows
    monkeypatch.setattr(signals, "ends_rows", lambda call, texts: ends.append(taken(call, texts)) or ends[-1])
    reads = _checked_prefill(monkeypatch, "tops", inputs, model)  # every instruction checked against the device's
    # stage II's two rater attentions and their instructions' rows: sliced where the rows end with them
    assert reads and not any(reads) and len(ends) >= 2 and ends == [pad == "left"] * len(ends)


@pytest.mark.parametrize("method", ["tops", "fastv"])
def test_text_between_two_images_is_read_by_the_stages(monkeypatch, method):
    model = tiny_llava(num_layers=4)
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    image = [cfg.image_token_id] * n
    ids = torch.tensor([[3, 4, *image, 8, 9, *image, 5, 6, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)}
    reads = _checked_prefill(monkeypatch, method, inputs, model)
    # each stage inside the LLM reads its state's instruction once (a second signal of the stage finds it taken)
    assert sum(reads) == {"tops": 2, "fastv": 1}[method] and max(reads) == 1, reads


@pytest.mark.parametrize("method", prunekit.list_methods())
def test_a_prefill_in_inference_mode_leaves_nothing_a_prefill_with_gradients_cannot_use(method):
    # the runtime and the methods keep a few small constant tensors between prefills (the causal triangle of the
    # instruction's rows, the no-merge flag, Pool's plans): made in inference mode they would break a later forward
    # that records gradients
    from prunekit import ops

    ops._shared.cache_clear()  # made afresh, in the inference-mode prefill below
    model = tiny_llava(num_layers=4)
    inputs = tiny_llava_inputs(model)
    inputs["attention_mask"][:] = 1  # no padding: the instruction's rows take the causal triangle
    prunekit.build(method, model, keep_tokens=32, budget_meaning="nominal")
    with torch.inference_mode():
        model(**inputs)
    assert_pruned(model)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():  # the suite runs under no_grad
        out = model(**inputs)
    assert out.logits.requires_grad
    with torch.enable_grad():
        out.logits.float().sum().backward()
    assert_pruned(model)
