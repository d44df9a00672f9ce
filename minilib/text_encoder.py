"""A tiny text encoder, trained from scratch, in place of SD3's CLIP and T5.

Chapter 7 of the book. SD3 reads a prompt twice: CLIP-L and CLIP-G give a
*sequence* of token features (the MM-DiT's ``context``) and a *pooled* vector
(added to the timestep embedding as ``y``), and T5-XXL adds more sequence
tokens. Those encoders are gigabytes and cannot be downloaded here, and our
captions ("a red circle, top left") use 19 words. So the book trains its own:

    word ids (B, L) -> [CLS] + word embedding + learned positions (B, 1 + L, D)
                    -> 2 pre-norm transformer encoder layers, padding masked
                    -> context (B, 1 + L, D) (padding positions zeroed),
                       pooled  (B, D) = the final [CLS] token (as CLIP pools its EOS token)

The [CLS] token is always present, so even the empty caption (all padding),
which classifier-free guidance uses as the "unconditional" prompt, has one
token to attend to and a well-defined pooled vector.

It is trained jointly with the MM-DiT, end to end, by the flow-matching loss
alone: that is the simplest thing that works for a 19-word vocabulary (no
separate objective, no second training run), and it learns exactly the
features the generator needs. A real text encoder is pre-trained on other data
(CLIP contrastively on image-text pairs, T5 as a language model) and frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from .datasets import VOCAB
from .validation import POSITIVE_INT, check_arguments, check_divisible

PAD_ID = 0  # VOCAB[0] == "<pad>"


class TextEncoder(nn.Module):
    """Word ids -> ``(context (B, 1 + L, D), pooled (B, D))``.

    Args:
        dim: width D of the features.
        depth: number of transformer encoder layers.
        num_heads: attention heads (D must be divisible by it).
        max_length: longest caption in words (positions are learned up to it).
        vocab_size: number of word ids; defaults to ``len(VOCAB)``.

    ``forward(tokens)``: int ``(B, L)`` from :func:`minilib.datasets.tokenize`,
    0 = padding, ``L <= max_length``. Padding is masked out of attention, its
    context rows are zero, and appending more padding leaves the outputs at
    the real tokens unchanged.
    """

    @check_arguments(dim=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, max_length=POSITIVE_INT,
                     vocab_size=POSITIVE_INT)
    def __init__(self, dim: int = 64, depth: int = 2, num_heads: int = 4, max_length: int = 8,
                 vocab_size: int = len(VOCAB)):
        super().__init__()
        check_divisible("TextEncoder", "dim", dim, "num_heads", num_heads)
        self.dim = dim
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.word_embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, 1 + max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_tokens(tokens)
        B, L = tokens.shape
        x = torch.cat([self.cls.expand(B, -1, -1), self.word_embedding(tokens)], dim=1)  # (B, 1 + L, D)
        x = x + self.position[:, :1 + L]
        padding = torch.cat([tokens.new_zeros(B, 1, dtype=torch.bool), tokens == PAD_ID], dim=1)
        x = self.norm(self.layers(x, src_key_padding_mask=padding))
        context = x.masked_fill(padding.unsqueeze(-1), 0.0)  # (B, 1 + L, D), zero at padding
        return context, x[:, 0]  # pooled: the [CLS] token

    def _check_tokens(self, tokens) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
            got = f"shape {tuple(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, torch.Tensor) \
                else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor (B, L) from tokenize(), got {got}")
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"captions of {tokens.shape[1]} tokens are longer than max_length={self.max_length}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size - 1}], got "
                             f"{tokens.min().item()}..{tokens.max().item()}")


class TextToImage(nn.Module):
    """A text encoder and an MM-DiT trained together: ``forward(x, t, tokens) -> velocity``.

    ``context, pooled = text_encoder(tokens)``, then
    ``mmdit(x, t, y=pooled, context=context)``; the MM-DiT must have
    ``adm_in_channels == context_dim == text_encoder.dim``.
    """

    def __init__(self, text_encoder: TextEncoder, mmdit: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.mmdit = mmdit

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context, pooled = self.text_encoder(tokens)
        return self.mmdit(x, t, y=pooled, context=context)
