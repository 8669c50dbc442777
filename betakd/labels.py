"""The label convention shared by data, alignment and losses.

Labels carry the token id where a position is supervised (an answer token) and
``IGNORE_INDEX`` everywhere else (prompt, image tokens, padding), as Hugging Face
models and ``torch.nn.functional.cross_entropy`` expect.
"""

from __future__ import annotations

from torch import Tensor

IGNORE_INDEX = -100


def supervised(labels: Tensor) -> Tensor:
    """True where a label is a token to learn."""
    return labels != IGNORE_INDEX
