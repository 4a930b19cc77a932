"""CoOp-style prompt learner with optional task-specific tokens (DMC-OT).

Class c's prompt is `[SOT] ctx_1..ctx_M task_1..task_L <class name> . [EOT]`: M shared
context vectors initialised from a phrase ("a photo of a"), then the L tokens of the task
class c arrived in. The prompts are tokenised once with placeholders in those M + L slots,
whose embeddings are replaced by the learned vectors on every forward pass.

Context initialisation: the phrase's token embeddings; with `ctx_init: null`, random
values (std 0.02); with `n_ctx` larger than the phrase, the phrase fills the last slots
(next to the class name) and the slots before it are random. A task's tokens are created
when its stage 2 starts (`add_task_tokens`), initialised from the previous task's tokens
(random small values for the first task).
"""

from __future__ import annotations

import itertools
from typing import Any

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
        if config.n_ctx < 1:
            raise ValueError(f"prompts.n_ctx must be at least 1, got {config.n_ctx}")
        empty_ids = tower.tokenize([""])[0]
        n_slots = config.n_ctx + task_tokens
        slot_ids = tower.tokenize([" ".join([PLACEHOLDER] * n_slots)])[0]
        if _content_length(slot_ids, empty_ids) != n_slots:
            raise ValueError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} into pieces")
        width = int(tower.embed_tokens(empty_ids[None])[0].shape[-1])
        ctx = torch.randn(config.n_ctx, width, device=empty_ids.device) * TASK_TOKEN_INIT_STD
        if config.ctx_init is not None:
            init_ids = tower.tokenize([config.ctx_init])
            n_phrase = _content_length(init_ids[0], empty_ids)
            if n_phrase > config.n_ctx:
                raise ValueError(
                    f"prompts.ctx_init {config.ctx_init!r} is {n_phrase} tokens, more than "
                    f"prompts.n_ctx = {config.n_ctx}: raise n_ctx or shorten the phrase"
                )
            with torch.no_grad():
                phrase = tower.embed_tokens(init_ids)[0, 1 : 1 + n_phrase].float()
            ctx[config.n_ctx - n_phrase :] = phrase
        self.ctx = nn.Parameter(ctx)
        self.task_tokens = nn.ParameterList()
        self.class_names: list[str] = []
        self.class_tasks: list[int] = []
        # Tasks made so far, including those whose classes were all removed since.
        self.task_count = 0
        self.token_ids: torch.Tensor
        self.register_buffer("token_ids", torch.empty(0, slot_ids.shape[0], dtype=torch.long))

    @property
    def n_tasks(self) -> int:
        return max(self.task_count, max(self.class_tasks, default=-1) + 1)

    @property
    def n_learnable_tokens(self) -> int:
        """Learned token vectors in all: the shared context plus every task's tokens."""
        return self.config.n_ctx + self.n_task_tokens * len(self.task_tokens)

    @property
    def width(self) -> int:
        return int(self.ctx.shape[1])

    def add_task(self, class_names: list[str]) -> int:
        """Register a task's classes and its task tokens; returns the task index."""
        task = self.n_tasks
        self.add_task_tokens()
        self._append_classes(class_names, [task] * len(class_names))
        self.task_count = task + 1
        return task

    def add_task_tokens(self) -> None:
        """The next task's tokens: a copy of the previous task's (random at the first)."""
        if not self.n_task_tokens:
            return
        if len(self.task_tokens):
            tokens = self.task_tokens[-1].detach().clone()
        else:
            tokens = torch.randn(self.n_task_tokens, self.width, device=self.ctx.device)
            tokens *= TASK_TOKEN_INIT_STD
        self.task_tokens.append(nn.Parameter(tokens))

    def context_features(self, class_names: list[str]) -> torch.Tensor:
        """Text features of classes prompted with the shared context only (no task tokens)."""
        slots = " ".join([PLACEHOLDER] * self.config.n_ctx)
        ids = self.tower.tokenize([f"{slots} {name}." for name in class_names])
        return self._encode(ids, self.ctx.unsqueeze(0).expand(len(class_names), -1, -1))

    def snapshot(self) -> dict[str, Any]:
        """Everything `add_task` and training change, to put back with `restore_snapshot`."""
        return {
            "ctx": self.ctx.detach().clone(),
            "task_tokens": [t.detach().clone() for t in self.task_tokens],
            "class_names": list(self.class_names),
            "class_tasks": list(self.class_tasks),
            "token_ids": self.token_ids.clone(),
            "task_count": self.task_count,
        }

    def restore_snapshot(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            self.ctx.copy_(snapshot["ctx"])
        self.task_tokens = nn.ParameterList([nn.Parameter(t) for t in snapshot["task_tokens"]])
        self.class_names = list(snapshot["class_names"])
        self.class_tasks = list(snapshot["class_tasks"])
        self.token_ids = snapshot["token_ids"]
        self.task_count = snapshot["task_count"]

    def restore_classes(
        self, class_names: list[str], class_tasks: list[int], n_tasks: int | None = None
    ) -> None:
        """Rebuild the class list of a saved state (its tensors are loaded separately);
        `n_tasks` counts tasks whose classes were all removed since, if any were."""
        n_tasks = max(n_tasks or 0, max(class_tasks, default=-1) + 1)
        self.task_count = n_tasks
        if self.n_task_tokens:
            for _ in range(n_tasks - len(self.task_tokens)):
                self.task_tokens.append(
                    nn.Parameter(
                        torch.zeros(self.n_task_tokens, self.width, device=self.ctx.device)
                    )
                )
        self._append_classes(class_names, class_tasks)

    def add_classes(self, class_names: list[str], task: int) -> None:
        """Register classes of `task` (whose tokens `add_task_tokens` made)."""
        self._append_classes(class_names, [task] * len(class_names))

    def keep_classes(self, indices: list[int]) -> None:
        """Keep only these classes, in this order (a removal); task tokens stay."""
        rows = torch.tensor(indices, dtype=torch.long, device=self.token_ids.device)
        self.token_ids = self.token_ids.index_select(0, rows)
        self.class_names = [self.class_names[i] for i in indices]
        self.class_tasks = [self.class_tasks[i] for i in indices]

    def rename_class(self, index: int, name: str) -> None:
        """Prompt class `index` with another name; its context and task tokens stay."""
        slots = " ".join([PLACEHOLDER] * (self.config.n_ctx + self.n_task_tokens))
        ids = self.tower.tokenize([f"{slots} {name}."]).to(self.token_ids.device)
        self.token_ids = self.token_ids.clone()
        self.token_ids[index] = ids[0]
        self.class_names[index] = name

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
        learned = self.ctx.unsqueeze(0).expand(n_classes, -1, -1)
        if self.n_task_tokens:
            learned = torch.cat([learned, self._task_tokens_per_class()], dim=1)
        return self._encode(self.token_ids, learned)

    def _task_tokens_per_class(self) -> torch.Tensor:
        """[n_classes, L, width]: each class's task tokens. A class's task is one of a run of
        equal tasks in class order, so each run is its task's tokens expanded: no index
        tensor is made per call, and the backward pass sums each run (an indexed lookup's
        backward accumulates with atomics, in no fixed order on CUDA)."""
        runs = [(task, len(list(group))) for task, group in itertools.groupby(self.class_tasks)]
        return torch.cat(
            [self.task_tokens[task].unsqueeze(0).expand(count, -1, -1) for task, count in runs]
        )

    def _encode(self, token_ids: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
        """Text features of `token_ids` with their first placeholders replaced by `learned`."""
        with torch.no_grad():
            embeddings = self.tower.embed_tokens(token_ids)
        n_learned = learned.shape[1]
        prompts = torch.cat(
            [embeddings[:, :1], learned.to(embeddings.dtype), embeddings[:, 1 + n_learned :]],
            dim=1,
        )
        return self.tower.encode_embeddings(prompts, token_ids)


def _content_length(ids: torch.Tensor, empty_ids: torch.Tensor) -> int:
    """Number of tokens a text adds over the empty text (start/end tokens excluded)."""
    return int((ids != 0).sum() - (empty_ids != 0).sum())
