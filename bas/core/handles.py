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

from bas.core.compat import resize_token_embeddings
from bas.core.errors import BasError

DEFAULT_INIT_TOKEN = "object"
HANDLE_PATTERN = re.compile(r"<asset(\d+)>")


def handle_tokens(n: int) -> list[str]:
    return [f"<asset{i}>" for i in range(n)]


class HandleEmbedding(nn.Module):
    """A token embedding whose rows ``first_id..first_id+N-1`` come from a trainable parameter.

    ``first_id`` is the id the tokenizer gave the first handle: the end of the vocabulary for
    CLIP (the handle rows are appended), or inside a padded matrix (T5's 32100-token tokenizer
    over 32128 rows), where the handle rows stand in for unused ones.
    """

    def __init__(self, base: nn.Embedding, init: torch.Tensor, first_id: int | None = None):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.num_base = base.num_embeddings
        self.first_id = self.num_base if first_id is None else first_id
        self.handles = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, as a plain ``nn.Embedding`` would have it (for export and inspection)."""
        rows = self.handles.to(self.base.weight.dtype)
        if self.first_id == self.num_base:
            return torch.cat([self.base.weight, rows], dim=0)
        weight = self.base.weight.detach().clone()
        if self.num_embeddings > self.num_base:
            weight = torch.cat([weight, weight.new_zeros(self.num_embeddings - self.num_base, weight.shape[1])])
        return torch.cat([weight[: self.first_id], rows, weight[self.first_id + rows.shape[0]:]])

    @property
    def num_embeddings(self) -> int:
        return max(self.num_base, self.first_id + self.handles.shape[0])

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.handles.shape[0]
        is_handle = (input_ids >= self.first_id) & (input_ids < self.first_id + n)
        base = self.base(input_ids.clamp(max=self.num_base - 1))
        handles = F.embedding((input_ids - self.first_id).clamp(min=0, max=n - 1), self.handles.to(base.dtype))
        return torch.where(is_handle.unsqueeze(-1), handles, base)

    def to_embedding(self) -> nn.Embedding:
        """A plain embedding with the handle rows in place (what a saved pipeline holds)."""
        weight = self.weight.detach()
        emb = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        emb.weight.data.copy_(weight)
        return emb


def add_handles(encoders, n: int, init_words: list[str] | None = None) -> tuple[list[str], list[list[int]], list[HandleEmbedding]]:
    """Add ``<asset0>``.. to every encoder's tokenizer and wrap each encoder's token embedding.

    ``encoders`` are :class:`bas.core.family.TextEncoder` s.  Each handle starts, in each encoder,
    as the first sub-token embedding of its initializer word.  Returns the tokens, their ids in
    each tokenizer and each encoder's :class:`HandleEmbedding`.
    """
    tokens = handle_tokens(n)
    words = init_words or [DEFAULT_INIT_TOKEN] * n
    for encoder in encoders:  # every check before any tokenizer changes
        tokenizer, base = encoder.tokenizer, encoder.model.get_input_embeddings()
        if len(tokenizer) > base.num_embeddings:
            raise BasError(
                f"The {encoder.tokenizer_name} has {len(tokenizer)} tokens but the {encoder.name} has {base.num_embeddings} embedding rows; "
                "--model must be an unmodified base pipeline, not the output of an earlier run."
            )
        if any(t in tokenizer.get_vocab() for t in tokens):
            raise BasError(f"The model's {encoder.tokenizer_name} already has <asset...> tokens; start from the base model, not a bas output.")
    check_init_words(words)
    # each word's row is looked up in the vocabulary as it was before any handle was added
    init_ids = [[first_subtoken_id(encoder, word) for word in words] for encoder in encoders]
    all_ids, embeddings = [], []
    for encoder, word_ids in zip(encoders, init_ids):
        tokenizer, base = encoder.tokenizer, encoder.model.get_input_embeddings()
        first = len(tokenizer)
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(first, first + n)):
            raise BasError(f"The {encoder.tokenizer_name} did not give the handles consecutive new ids; use the model's own tokenizer.")
        init = [base.weight.data[i].float() for i in word_ids]
        embedding = HandleEmbedding(base, torch.stack(init), first_id=first)
        encoder.model.set_input_embeddings(embedding)
        all_ids.append(ids)
        embeddings.append(embedding)
    return tokens, all_ids, embeddings


def check_init_words(words) -> None:
    """Refuse an init word that names a handle: a handle is the new token being trained, so it
    cannot also be the known word its embedding starts from."""
    for word in words:
        if HANDLE_PATTERN.search(str(word)):
            raise BasError(f"--init-token '{word}' is a handle, the new word bas trains, not a word it can start from; "
                           "give a plain word the model knows, such as 'dog'.")


def first_subtoken_id(encoder, word: str) -> int:
    """The id of ``word``'s first sub-token, which must have a row in the encoder's embedding."""
    sub = encoder.tokenizer.encode(word, add_special_tokens=False)
    if not sub or sub[0] >= encoder.model.get_input_embeddings().num_embeddings:
        raise BasError(f"--init-token '{word}' is not in the model's vocabulary; pick a plain English word such as 'dog'.")
    return sub[0]


# -- handles.safetensors -----------------------------------------------------------------------
# One row per handle and text encoder.  The first encoder's rows are keyed by the bare token
# ({"<asset0>": tensor[D]}: a one-encoder run's file is a textual-inversion file as diffusers
# writes it); another encoder's rows by "<component>.<token>" ("text_encoder_2.<asset0>").
HANDLE_KEY = re.compile(r"(?:([a-z][a-z0-9_]*)\.)?(<asset(\d+)>)")


def handle_key(encoder_index: int, encoder_name: str, token: str) -> str:
    return token if encoder_index == 0 else f"{encoder_name}.{token}"


def handles_file_state(tokens: list[str], encoder_names: list[str], rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``handles.safetensors``'s content from each encoder's ``(N, D_i)`` handle rows."""
    return {handle_key(i, name, token): r[k].detach().float().cpu().clone()
            for i, (name, r) in enumerate(zip(encoder_names, rows)) for k, token in enumerate(tokens)}


def split_handles(state: dict[str, torch.Tensor], encoder_names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{encoder name: {token: row}}`` from a handles file, every name checked; every encoder
    must have the same handles."""
    tokens = check_handle_names(state)
    by_encoder: dict[str, dict[str, torch.Tensor]] = {name: {} for name in encoder_names}
    for key, row in state.items():
        component, token, _ = HANDLE_KEY.fullmatch(key).groups()
        name = component or encoder_names[0]
        if name not in by_encoder or (component is not None and name == encoder_names[0]):
            raise BasError(f"The handles file holds {key!r}, but the model family's text encoders are {', '.join(encoder_names)}: "
                           "the run's files and the family run.json names disagree; re-create the run with `bas run`.")
        by_encoder[name][token] = row
    for name, rows in by_encoder.items():
        if sorted(rows) != sorted(tokens):
            raise BasError(f"The handles file has no rows for {name} of every handle; re-create it with `bas run`.")
    return {name: {t: rows[t] for t in tokens} for name, rows in by_encoder.items()}


def check_handle_names(names) -> list[str]:
    """The distinct handles named by a handles file's keys, checked, in index order: they end up in
    prompts and file names."""
    bad = [n for n in names if not HANDLE_KEY.fullmatch(n)]
    if bad:
        raise BasError(f"The handles file holds an invalid handle name {bad[0]!r} (handles are <asset0>, <asset1>, ...); re-create it with `bas run`.")
    tokens = {HANDLE_KEY.fullmatch(n).group(2) for n in names}
    return sorted(tokens, key=lambda t: int(HANDLE_PATTERN.fullmatch(t).group(1)))


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


def install_handles(encoders, state: dict[str, torch.Tensor]) -> None:
    """Add a handles file's rows to a loaded pipeline's tokenizers and text encoders (for generation).

    ``encoders``: the pipeline's :class:`bas.core.family.TextEncoder` s.  Encoders whose tokenizer
    already knows the handles (a full fine-tune's saved pipeline) are left as they are.
    """
    by_encoder = split_handles(state, [e.name for e in encoders])
    for encoder in encoders:
        tokenizer, rows = encoder.tokenizer, by_encoder[encoder.name]
        missing = [t for t in rows if t not in tokenizer.get_vocab()]
        if not missing:
            continue
        tokenizer.add_tokens(missing)
        size = max(len(tokenizer), encoder.model.get_input_embeddings().num_embeddings)
        resize_token_embeddings(encoder.model, size)  # rows are overwritten below
        weight = encoder.model.get_input_embeddings().weight
        with torch.no_grad():
            for token in missing:
                weight[tokenizer.convert_tokens_to_ids(token)] = rows[token].to(weight.dtype)


def check_prompt_handles(prompt: str, known: list[str]) -> None:
    for match in HANDLE_PATTERN.finditer(prompt):
        if match.group(0) not in known:
            raise BasError(
                f"The prompt names {match.group(0)} but this run has {len(known)} handles ({', '.join(known)}); use one of those."
            )
