"""The next-token loss, in one place: the training step, evaluation during training and
`ift eval` all score a batch with `next_token_loss`.

A batch's loss is the summed cross entropy of every trainable next token (labels other than
IGNORE_INDEX, shifted by one), returned with the count of those tokens, so callers can
divide by whatever count they need: the global batch's trainable tokens in training, the
held-out set's in evaluation. Logits may carry extra leading positions, the virtual tokens
of the prompt methods (prefix, p_tuning, prompt_tuning): the last T, T the labels' length,
are scored. In packed rows each sample's first label is IGNORE_INDEX (its prompt, or the
boundary), so the shift never scores a token of one sample from the one before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ift.artifacts import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross entropy, trainable tokens) of one batch, both 0-d tensors;
    the sum keeps its graph for a backward pass. Computed in float32 whatever the logits'
    dtype."""
    t = labels.shape[1]
    if logits.shape[1] != t:
        logits = logits[:, -t:, :]
    logits = logits.float()
    # The labels move left by one (the last position predicts nothing), not the logits:
    # slicing [B, T, V] logits would copy them, at every step.
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shifted != IGNORE_INDEX).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """`next_token_loss` as Python numbers, for scoring without gradients."""
    total, count = next_token_loss(logits, labels)
    return float(total), int(count)
