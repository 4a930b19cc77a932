"""Run a model's text tower on token embeddings instead of token ids.

Prompt learning replaces some input embeddings with learned vectors, so each text-tower
family needs: its tokenizer, its input embedding table, and its forward pass from
embeddings. A registry maps the tower type to the wrapper that knows how.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn


class TextTower(Protocol):
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [n, context_length] on the model's device."""
        ...

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [n, context_length, width]."""
        ...

    def encode_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Text features [n, embed_dim] (not normalised); `token_ids` locates padding/EOT.

        The transformer runs on the longest real prompt of the batch, not the whole
        context: the padding after it changes nothing in the result.
        """
        ...


class RealLength:
    """Length of the longest real (non-padding) token sequence of a batch of token ids.

    Prompt learning runs the same token ids through the tower at every step, so the length
    is remembered for the last tensor seen (same object, not modified in place): on a GPU,
    reading it back costs a host-device sync that a training step should not wait for.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self._ids: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self._length = 0

    def __call__(self, token_ids: torch.Tensor) -> int:
        if token_ids.is_inference():  # no version counter: not remembered
            return self._measure(token_ids)
        if (
            self._ids is not None
            and self._ids() is token_ids
            and self._version == token_ids._version
        ):
            return self._length
        self._length = self._measure(token_ids)
        self._ids, self._version = weakref.ref(token_ids), token_ids._version
        return self._length

    def _measure(self, token_ids: torch.Tensor) -> int:
        positions = torch.arange(1, token_ids.shape[1] + 1, device=token_ids.device)
        real = (token_ids != self.pad_id) * positions
        return max(int(real.amax()), 1) if real.numel() else token_ids.shape[1]


class OpenClipTextTower:
    """open_clip's own text transformer (the `CLIP` model family)."""

    # Pooling that reads a position at or before the end token. With a causal mask no
    # position sees the ones after it, so cutting the padding leaves them unchanged.
    TRIMMABLE_POOLING = ("argmax", "eos", "first")

    def __init__(self, model: CLIP, tokenizer: Callable[..., torch.Tensor]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # open_clip's tokenizers pad with id 0.
        self.real_length = RealLength(pad_id=0)

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(token_ids)

    def encode_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        # Mirrors open_clip.model.CLIP.encode_text after its token-embedding lookup.
        model = self.model
        attn_mask = model.attn_mask
        if attn_mask is not None and model.text_pool_type in self.TRIMMABLE_POOLING:
            length = self.real_length(token_ids)
            embeddings, token_ids = embeddings[:, :length], token_ids[:, :length]
            attn_mask = attn_mask[:length, :length]
        n = embeddings.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
        x = model.transformer(x, attn_mask=attn_mask)
        x = model.ln_final(x)
        x = text_global_pool(
            x, token_ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        if model.text_projection is not None:
            if isinstance(model.text_projection, nn.Linear):
                x = model.text_projection(x)
            else:
                x = x @ model.text_projection
        return x


class HuggingFaceTextTower:
    """A Hugging Face encoder inside open_clip's `CustomTextCLIP` (`model.text`)."""

    def __init__(self, text: HFTextEncoder, tokenizer: Callable[..., torch.Tensor]) -> None:
        self.text = text
        self.tokenizer = tokenizer
        # Padding is masked out of attention and pooling, so it can be cut.
        self.real_length = RealLength(pad_id=text.config.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.text.parameters()).device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text.transformer.get_input_embeddings()(token_ids)

    def encode_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        # Mirrors open_clip.hf_model.HFTextEncoder.forward with inputs_embeds.
        length = self.real_length(token_ids)
        embeddings, token_ids = embeddings[:, :length], token_ids[:, :length]
        attention_mask = (token_ids != self.text.config.pad_token_id).long()
        out = self.text.transformer(inputs_embeds=embeddings, attention_mask=attention_mask)
        pooled = self.text.pooler(out, attention_mask)
        return self.text.proj(pooled)


TowerFactory = Callable[[nn.Module, Callable[..., torch.Tensor]], TextTower]
_TEXT_TOWERS: list[tuple[Callable[[nn.Module], bool], TowerFactory]] = [
    (lambda m: isinstance(m, CLIP), lambda m, tok: OpenClipTextTower(m, tok)),
    (
        lambda m: isinstance(getattr(m, "text", None), HFTextEncoder),
        lambda m, tok: HuggingFaceTextTower(m.text, tok),
    ),
]


def register_text_tower(matches: Callable[[nn.Module], bool], factory: TowerFactory) -> None:
    _TEXT_TOWERS.append((matches, factory))


def text_tower_for(model: nn.Module, tokenizer: Callable[..., torch.Tensor]) -> TextTower:
    for matches, factory in _TEXT_TOWERS:
        if matches(model):
            return factory(model, tokenizer)
    text = getattr(model, "text", None)
    raise TypeError(
        f"prompt learning does not support the text tower of {type(model).__name__}"
        f" ({type(text).__name__ if text is not None else 'built-in'})"
    )
