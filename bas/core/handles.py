"""Handles: one new token per concept whose embedding row is the only part of the vocabulary that trains.

Rather than training the whole embedding matrix and restoring the old rows after each step (the
reference code), the text encoder's token embedding is wrapped so that the handle rows are a
separate small parameter.  Every other row is untouched by construction, the optimizer holds
state for N rows instead of ~49k, and nothing needs restoring.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from bas.core.errors import BasError

DEFAULT_INIT_TOKEN = "object"
HANDLE_PATTERN = re.compile(r"<asset(\d+)>")


def handle_tokens(n: int) -> list[str]:
    return [f"<asset{i}>" for i in range(n)]


class HandleEmbedding(nn.Module):
    """A token embedding whose rows ``num_base..num_base+N-1`` come from a trainable parameter."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.num_base = base.num_embeddings
        self.handles = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, as a plain ``nn.Embedding`` would have it (for export and inspection)."""
        return torch.cat([self.base.weight, self.handles.to(self.base.weight.dtype)], dim=0)

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.handles.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_handle = input_ids >= self.num_base
        base = self.base(input_ids.clamp(max=self.num_base - 1))
        handles = F.embedding((input_ids - self.num_base).clamp(min=0), self.handles.to(base.dtype))
        return torch.where(is_handle.unsqueeze(-1), handles, base)

    def to_embedding(self) -> nn.Embedding:
        """A plain embedding with the handle rows appended (what a saved pipeline holds)."""
        weight = self.weight.detach()
        emb = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        emb.weight.data.copy_(weight)
        return emb


def add_handles(tokenizer, text_encoder, n: int, init_words: list[str] | None = None) -> tuple[list[str], list[int], HandleEmbedding]:
    """Add ``<asset0>``.. to the tokenizer and wrap the text encoder's embedding.

    Each handle starts as the first sub-token embedding of its initializer word.
    """
    tokens = handle_tokens(n)
    base = text_encoder.get_input_embeddings()
    if len(tokenizer) != base.num_embeddings:
        raise BasError(
            f"The tokenizer has {len(tokenizer)} tokens but the text encoder has {base.num_embeddings} embedding rows; "
            "--model must be an unmodified base pipeline, not the output of an earlier run."
        )
    if any(t in tokenizer.get_vocab() for t in tokens):
        raise BasError("The model's tokenizer already has <asset...> tokens; start from the base model, not a bas output.")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(base.num_embeddings, base.num_embeddings + n)):
        raise BasError("The tokenizer did not give the handles consecutive new ids; use a standard CLIP tokenizer.")
    words = init_words or [DEFAULT_INIT_TOKEN] * n
    init = []
    for word in words:
        sub = tokenizer.encode(word, add_special_tokens=False)
        if not sub or sub[0] >= base.num_embeddings:
            raise BasError(f"--init-token '{word}' is not in the model's vocabulary; pick a plain English word such as 'dog'.")
        init.append(base.weight.data[sub[0]].float())
    embedding = HandleEmbedding(base, torch.stack(init))
    text_encoder.set_input_embeddings(embedding)
    return tokens, ids, embedding


def check_handle_names(names) -> list[str]:
    """Handle names from a file, checked, in index order: they end up in prompts and file names."""
    bad = [n for n in names if not HANDLE_PATTERN.fullmatch(n)]
    if bad:
        raise BasError(f"The handles file holds an invalid handle name {bad[0]!r} (handles are <asset0>, <asset1>, ...); re-create it with `bas run`.")
    return sorted(names, key=lambda t: int(HANDLE_PATTERN.fullmatch(t).group(1)))


def check_prompt_fits(tokenizer, prompt: str, what: str = "The prompt") -> None:
    """Refuse a prompt whose handle the text encoder would not see because the tokenizer's limit
    (77 tokens for CLIP) cuts it off; warn when only words without handles are cut.

    Call it once per tokenizer a model family uses, with the handles already added to it.
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 100_000:  # tokenizers without a limit report a huge number
        return
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) <= limit:
        return
    tokens = tokenizer.convert_ids_to_tokens(ids)
    kept = limit - 1  # the first limit-1 tokens and an end-of-text token reach the encoder
    lost = [t for t in tokens[kept:-1] if HANDLE_PATTERN.fullmatch(str(t))]
    if lost:
        raise BasError(
            f"{what} {prompt[:60] + '...' if len(prompt) > 60 else prompt!r} is {len(ids)} tokens long and its handle {lost[0]} comes after "
            f"the text encoder's limit of {limit}, so it would be cut off; shorten the text before {lost[0]}."
        )
    import warnings

    warnings.warn(f"{what} is {len(ids)} tokens long; the text encoder sees the first {limit}, the rest is ignored.", stacklevel=2)


def install_handles(tokenizer, text_encoder, handles: dict[str, torch.Tensor]) -> None:
    """Add saved handles to a loaded pipeline's tokenizer and text encoder (for generation)."""
    tokens = check_handle_names(handles)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if not missing:
        return
    tokenizer.add_tokens(missing)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are overwritten below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token in missing:
            weight[tokenizer.convert_tokens_to_ids(token)] = handles[token].to(weight.dtype)


def check_prompt_handles(prompt: str, known: list[str]) -> None:
    for match in HANDLE_PATTERN.finditer(prompt):
        if match.group(0) not in known:
            raise BasError(
                f"The prompt names {match.group(0)} but this run has {len(known)} handles ({', '.join(known)}); use one of those."
            )
