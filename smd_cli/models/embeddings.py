"""Textual-inversion embeddings: a file's vectors join a family's tokenizers and text encoders.

The family says which encoders an embedding extends and under which key a file holds each one's
vectors (`Family.embedding_encoders`: SD 1.x/2.x files hold one set; SDXL's hold `clip_l` and
`clip_g`); diffusers' loader does the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smd_cli.core.errors import ModelError
from smd_cli.models.loading import _loading

if TYPE_CHECKING:
    from smd_cli.families import Family


def load_embedding(family: Family, path: str, token: str) -> None:
    """The embedding file at `path` under `token`: a prompt that says the token then reads its
    vectors; an embedding of several vectors is spelt out in the prompt as diffusers' pipelines
    spell it (`Family.spelt`)."""
    if family.embeddings.get(token) == path:
        return
    encoders = family.embedding_encoders()
    if token in family.embeddings or token in encoders[0][0].get_vocab():
        taken = f"the embedding {family.embeddings[token]}" if token in family.embeddings else "a word of the tokenizer"
        raise ModelError(f"token '{token}' is already {taken}; give this embedding another token")
    loader = family.loras.loader()
    with _loading(path, "embedding"):
        try:
            if len(encoders) == 1:
                loader.load_textual_inversion(path, token=token)
            else:
                from safetensors.torch import load_file

                vectors = load_file(path)
                keys = [key for _, _, key in encoders]
                if any(key not in vectors for key in keys):
                    raise ModelError(f"embedding {path} is not for {family.label}: an {family.label} embedding "
                                     f"holds {' and '.join(keys)}")
                for tokenizer, encoder, key in encoders:
                    loader.load_textual_inversion(vectors[key], token=token, tokenizer=tokenizer, text_encoder=encoder)
        except ValueError as exc:
            if "incorrect shape" not in str(exc):
                raise
            raise ModelError(f"embedding {path} does not fit this {family.label} model: its vectors have another "
                             "width (an embedding for another model family?)") from None
    family.embeddings[token] = path
