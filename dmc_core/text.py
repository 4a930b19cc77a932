"""Run a model's text tower on token embeddings instead of token ids.

Prompt learning replaces some input embeddings with learned vectors, so each text-tower
family needs: its tokenizer, its input embedding table, and its forward pass from
embeddings. A registry maps the tower type to the wrapper that knows how.
"""

from __future__ import annotations

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
        """Text features [n, embed_dim] (not normalised); `token_ids` locates padding/EOT."""
        ...


class OpenClipTextTower:
    """open_clip's own text transformer (the `CLIP` model family)."""

    def __init__(self, model: CLIP, tokenizer: Callable[..., torch.Tensor]) -> None:
        self.model = model
        self.tokenizer = tokenizer

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
        cast_dtype = model.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask)
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

    @property
    def device(self) -> torch.device:
        return next(self.text.parameters()).device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text.transformer.get_input_embeddings()(token_ids)

    def encode_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        # Mirrors open_clip.hf_model.HFTextEncoder.forward with inputs_embeds.
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
