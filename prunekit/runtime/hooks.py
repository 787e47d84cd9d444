"""What an adapter provides to the runtime: :class:`ModelHooks` (the model-specific services the decoder pruner
calls), :class:`BudgetUnits` (which visual tokens share a budget) and :func:`brings_images`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import contracts as C
from ..errors import PruningError

__all__ = ["ModelHooks", "BudgetUnits", "brings_images"]


class ModelHooks:
    """Model-specific services an adapter provides to :class:`DecoderPruner`."""

    def take_visual_mask(self) -> Tensor | None:
        """``[B, L]`` bool mask of the visual tokens in the current language-model input (then forget it)."""
        raise NotImplementedError

    def projector_signal(self, name: str, options: dict, visual_counts: list[int]) -> list[Tensor]:
        """A vision-side signal (``cls_attention``, ``keys``) before the LLM, per sample."""
        raise PruningError(f"signal {name!r} is not available before the LLM of this model")

    def vision_features(self, visual_counts: list[int]) -> list[Tensor]:
        """Per sample, the vision features the projector read for its visual tokens (``vision_features`` point)."""
        raise PruningError("this model does not offer the 'vision_features' insertion point")

    def project(self, values: Tensor) -> Tensor:
        """The model's projector applied to vision-feature rows ``[k, Dv]`` (for merged values)."""
        raise PruningError("this model cannot project merged vision features")

    def grids(self, visual_counts: list[int]) -> list[list[tuple[int, int]] | None] | None:
        """Per sample, the (rows, cols) patch grid of each image, when its tokens form plain grids."""
        return None

    def end_of_prefill(self) -> None:
        """Forget what was captured for this call (called after every language-model input is handled)."""

    def new_cache(self):
        """A fresh KV cache for a plain forward that did not pass one (so its returned cache can be continued)."""
        return None

    def input_mask_2d(self) -> Tensor | None:
        """The 2-D mask the model was called with, when it hands its language model prepared masks instead."""
        raise PruningError("this model hands its language model prepared attention masks, and its adapter "
                           "cannot rebuild them")

    def prepared_masks(self, kwargs: dict, mask_2d: Tensor, keep_rows: list[Tensor], length: int):
        """The model's own prepared masks for the pruned sequence (``keep_rows``: kept input rows per sample)."""
        raise PruningError("this model hands its language model prepared attention masks, and its adapter "
                           "cannot rebuild them")

    def prune_inputs(self, kwargs: dict, kept: list[Tensor], visual_positions: list[Tensor], length: int) -> None:
        """Prune the model's other per-visual-token language-model inputs alike (Qwen3-VL's deepstack features).
        ``kept``: per sample, kept indices into its visual tokens; ``visual_positions``: their new positions."""

    def found_by_embeddings(self) -> bool:
        """Whether the current call gave ``inputs_embeds`` instead of ids (placeholders were looked for there)."""
        return False

    def placeholder_description(self) -> str:
        """The placeholder tokens looked for, for error messages."""
        return "no placeholder ids known"

    def images_in_call(self) -> bool:
        """Whether the current call brought images or videos (a decode step's sampled token may merely equal a
        placeholder id, which the model then treats as text)."""
        return True

    def units(self, visual_counts: list[int]) -> list[list[int]]:
        """Per sample, the token counts of its images and video frames in sequence order (``budget_per="image"``)."""
        raise PruningError("this model's adapter cannot tell its images or video frames apart (budget_per='image')")

    def unit_ids(self, visual_counts: list[int], per: str) -> list["BudgetUnits"]:
        """Per sample, the budget unit of each visual token for ``budget_per=per`` (``"image"``: its images and
        video frames, from :meth:`units`; adapters add others, such as LLaVA-NeXT's ``"crop"``)."""
        if per == "image":
            return [BudgetUnits.contiguous(sizes) for sizes in self.units(visual_counts)]
        raise PruningError(f"this model's adapter cannot split its visual tokens into {per}s (budget_per={per!r})")


@dataclass
class BudgetUnits:
    """One sample's budget units: ``ids[i]`` is the unit of its visual token ``i`` (-1: a token of no unit, such
    as LLaVA-NeXT's row breaks under ``budget_per="crop"``, kept as it is by every stage); ``sizes[u]`` is the token
    count unit ``u``'s budget is computed from (a crop's patches before unpadding: it may exceed the tokens
    present, and a unit keeps all its tokens when its budget does)."""

    ids: Tensor
    sizes: list[int]

    @classmethod
    def contiguous(cls, sizes: list[int]) -> "BudgetUnits":
        """Units that follow each other in sequence order, of ``sizes`` tokens each."""
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        return cls(ids, list(sizes))


def brings_images(kwargs: dict) -> bool:
    """Whether a multimodal model's forward kwargs carry images or videos (raw or already encoded)."""
    if C.MODEL_ENCODER_OUTPUTS.get(kwargs):
        return True
    return any(k.get(kwargs) is not None for k in C.IMAGE_INPUTS)
