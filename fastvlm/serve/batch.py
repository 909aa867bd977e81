"""The running batch of a continuous-batching server: sequences join and leave between steps.

Every active sequence advances by one token per decode step, in one forward pass. New
requests are prefilled on their own (their images encoded together, their prompts
left-padded among themselves) and then merged into the running batch; finished or
cancelled sequences are dropped at once. A :class:`DecodeBatch` holds what that takes:
the KV cache (in :class:`fastvlm.decoding.DecodeSteps`, so steps take the same path as
``generate``), the attention mask and the next position of every row.

Rows are left-padded to a common length, as in :func:`fastvlm.generation.generate`,
with each row's own position ids, so padding never changes a row's tokens: a sequence
gets the tokens it would get alone, whatever joins or leaves around it (fp32; tested).
Merging pads the shorter side's cache with zero keys and values under a zero mask, and
dropping rows trims the left columns that no remaining row uses, so the cache never
grows past the longest live sequence (plus :data:`HEADROOM` positions allocated ahead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastvlm.decoding import DecodeSteps, prefill

if TYPE_CHECKING:
    from fastvlm.model import FastVLM


def _left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# Positions allocated past the longest row when a batch forms; a step beyond them doubles the KV buffers
HEADROOM = 64


@dataclass
class DecodeBatch:
    """Rows being decoded: their decode steps (with the KV cache), attention mask [B, L], next
    positions [B, 1] and last tokens [B]."""

    steps: DecodeSteps
    attention_mask: torch.Tensor
    next_positions: torch.Tensor
    last_tokens: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    @classmethod
    def prefill(
        cls,
        model: FastVLM,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image_features: torch.Tensor | None = None,
        pad_token_id: int = 0,
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Prefill left-padded prompts; the batch (without its first tokens yet) and the logits [B, V]."""
        inputs = model.prepare_inputs(
            input_ids, attention_mask, image_features=image_features, padding_side="left", pad_token_id=pad_token_id
        )
        cache, logits = prefill(model, inputs)
        batch = cls(
            steps=DecodeSteps(model, cache, capacity=inputs.attention_mask.shape[1] + HEADROOM),
            attention_mask=inputs.attention_mask,
            next_positions=inputs.position_ids[:, -1:] + 1,
            last_tokens=torch.full_like(inputs.attention_mask[:, 0], pad_token_id),
        )
        return batch, logits

    def merge(self, other: DecodeBatch) -> DecodeBatch:
        """This batch's rows followed by ``other``'s, both left-padded to the longer length."""
        length = max(self.length, other.length)
        layers = []
        for (k1, v1), (k2, v2) in zip(self.steps.layers(), other.steps.layers(), strict=True):
            keys = torch.cat([_left_pad(k1, length - self.length, 2), _left_pad(k2, length - other.length, 2)])
            values = torch.cat([_left_pad(v1, length - self.length, 2), _left_pad(v2, length - other.length, 2)])
            layers.append((keys, values))
        return DecodeBatch(
            steps=DecodeSteps.from_layers(self.steps.model, layers, capacity=length + HEADROOM),
            attention_mask=torch.cat(
                [
                    _left_pad(self.attention_mask, length - self.length, 1),
                    _left_pad(other.attention_mask, length - other.length, 1),
                ]
            ),
            next_positions=torch.cat([self.next_positions, other.next_positions]),
            last_tokens=torch.cat([self.last_tokens, other.last_tokens]),
        )

    def select(self, rows: list[int]) -> DecodeBatch:
        """Only ``rows`` (in that order), with the left columns none of them uses trimmed away."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        layers = [
            (keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
            for keys, values in self.steps.layers()
        ]
        return DecodeBatch(
            steps=DecodeSteps.from_layers(self.steps.model, layers, capacity=mask.shape[1] - start + HEADROOM),
            attention_mask=mask[:, start:],
            next_positions=self.next_positions.index_select(0, index),
            last_tokens=self.last_tokens.index_select(0, index),
        )

    def step(self) -> torch.Tensor:
        """Feed every row's last token; the logits of the next one [B, V]."""
        return self._advance(self.steps)

    def greedy_step(self) -> torch.Tensor:
        """Feed every row's last token; each row's greedy next token [B] (:meth:`DecodeSteps.greedy`).

        For a batch whose every row decodes at temperature 0: no logits are made, so the
        model's int8-screened head can find the argmax (:mod:`fastvlm.greedy_head`).
        """
        return self._advance(self.steps.greedy)

    def _advance(self, step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=-1)
        out = step(self.last_tokens[:, None], self.attention_mask, self.next_positions)
        self.next_positions = self.next_positions + 1
        return out
