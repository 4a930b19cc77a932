"""CoOp-style prompt learner with optional task-specific tokens (DMC-OT).

Class c's prompt is `[SOT] ctx_1..ctx_M task_1..task_L <class name> . [EOT]`: M shared
context vectors initialised from a phrase ("a photo of a"), then the L tokens of the task
class c arrived in. The prompts are tokenised once with placeholders in those M + L slots,
whose embeddings are replaced by the learned vectors on every forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from dmc_core.config import PromptConfig
from dmc_core.text import TextTower

PLACEHOLDER = "X"
TASK_TOKEN_INIT_STD = 0.02


class PromptLearner(nn.Module):
    def __init__(self, tower: TextTower, config: PromptConfig, task_tokens: int) -> None:
        super().__init__()
        self.tower = tower
        self.config = config
        self.n_task_tokens = task_tokens
        init_ids = tower.tokenize([config.ctx_init])
        n_phrase = _content_length(init_ids[0], tower.tokenize([""])[0])
        if n_phrase != config.n_ctx:
            raise ValueError(
                f"prompts.ctx_init {config.ctx_init!r} is {n_phrase} tokens, "
                f"prompts.n_ctx is {config.n_ctx}: make them agree"
            )
        n_slots = config.n_ctx + task_tokens
        slot_ids = tower.tokenize([" ".join([PLACEHOLDER] * n_slots)])[0]
        if _content_length(slot_ids, tower.tokenize([""])[0]) != n_slots:
            raise ValueError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} into pieces")
        with torch.no_grad():
            ctx = tower.embed_tokens(init_ids)[0, 1 : 1 + config.n_ctx].float().clone()
        self.ctx = nn.Parameter(ctx)
        self.task_tokens = nn.ParameterList()
        self.class_names: list[str] = []
        self.class_tasks: list[int] = []
        self.token_ids: torch.Tensor
        self.register_buffer("token_ids", torch.empty(0, init_ids.shape[1], dtype=torch.long))

    @property
    def n_tasks(self) -> int:
        return (
            len(self.task_tokens) if self.n_task_tokens else max(self.class_tasks, default=-1) + 1
        )

    @property
    def width(self) -> int:
        return int(self.ctx.shape[1])

    def add_task(self, class_names: list[str]) -> int:
        """Register a task's classes (and its task tokens); returns the task index."""
        task = self.n_tasks
        if self.n_task_tokens:
            tokens = torch.randn(self.n_task_tokens, self.width, device=self.ctx.device)
            self.task_tokens.append(nn.Parameter(tokens * TASK_TOKEN_INIT_STD))
        self._append_classes(class_names, [task] * len(class_names))
        return task

    def restore_classes(self, class_names: list[str], class_tasks: list[int]) -> None:
        """Rebuild the class list of a saved state (its tensors are loaded separately)."""
        n_tasks = max(class_tasks, default=-1) + 1
        if self.n_task_tokens:
            for _ in range(n_tasks - len(self.task_tokens)):
                self.task_tokens.append(
                    nn.Parameter(
                        torch.zeros(self.n_task_tokens, self.width, device=self.ctx.device)
                    )
                )
        self._append_classes(class_names, class_tasks)

    def _append_classes(self, class_names: list[str], class_tasks: list[int]) -> None:
        slots = " ".join([PLACEHOLDER] * (self.config.n_ctx + self.n_task_tokens))
        ids = self.tower.tokenize([f"{slots} {name}." for name in class_names])
        self.token_ids = torch.cat([self.token_ids, ids.to(self.token_ids.device)])
        self.class_names += class_names
        self.class_tasks += class_tasks

    def trainable_parameters(self, train_old_task_tokens: bool) -> list[nn.Parameter]:
        """The shared context, the newest task's tokens and, if asked, the older tasks' ones."""
        params = [self.ctx]
        if len(self.task_tokens):
            params += list(self.task_tokens) if train_old_task_tokens else [self.task_tokens[-1]]
        return params

    def forward(self) -> torch.Tensor:
        """Text features [n_classes, embed_dim] of every class's prompt (not normalised)."""
        n_classes = len(self.class_names)
        with torch.no_grad():
            embeddings = self.tower.embed_tokens(self.token_ids)
        learned = self.ctx.unsqueeze(0).expand(n_classes, -1, -1)
        if self.n_task_tokens:
            per_class = torch.stack(list(self.task_tokens))[torch.tensor(self.class_tasks)]
            learned = torch.cat([learned, per_class], dim=1)
        n_learned = learned.shape[1]
        prompts = torch.cat(
            [embeddings[:, :1], learned.to(embeddings.dtype), embeddings[:, 1 + n_learned :]],
            dim=1,
        )
        return self.tower.encode_embeddings(prompts, self.token_ids)


def _content_length(ids: torch.Tensor, empty_ids: torch.Tensor) -> int:
    """Number of tokens a text adds over the empty text (start/end tokens excluded)."""
    return int((ids != 0).sum() - (empty_ids != 0).sum())
