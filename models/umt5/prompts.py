"""The Wan pipeline's prompt handling: clean, tokenize, encode, zero past each prompt's length.

Equal to diffusers' `WanPipeline._get_t5_prompt_embeds` (and official Wan2.1): prompts are cleaned with
ftfy and a double HTML unescape, whitespace runs become one space, the umT5 output is kept up to each prompt's
true token count (</s> included) and zero after it, padded to `max_length` (512 in Wan).
"""

from __future__ import annotations

import html
import re

import ftfy
import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer

from models.umt5.encoder import UMT5Encoder
from models.umt5.tokenizer import tokenize

MAX_LENGTH = 512
# What diffusers' `regex.sub(r"\s+", ...)` treats as whitespace: Unicode White_Space. Python's `re` would
# also match the separators \x1c-\x1f, so the class is spelled out (checked against `regex` in the tests).
WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def prompt_clean(text: str) -> str:
    """ftfy.fix_text, HTML-unescape twice, strip, collapse whitespace runs to one space, strip."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string; got {type(text).__name__}")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return WHITESPACE.sub(" ", text).strip()


@nnx.jit
def _encode(encoder: UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    out = encoder(ids, mask)
    return jnp.where(mask[..., None] > 0, out, jnp.zeros((), out.dtype))


def encode_prompts(encoder: UMT5Encoder, tokenizer: Tokenizer, prompts: str | list[str],
                   max_length: int = MAX_LENGTH) -> jax.Array:
    """Text context for Wan: (B, max_length, d_model) in the encoder's dtype, zero past each prompt's tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r:.80}")
    ids, mask = tokenize(tokenizer, [prompt_clean(p) for p in prompts], max_length)
    if ids.max() >= encoder.cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {int(ids.max())} but the encoder's vocab_size is "
                         f"{encoder.cfg.vocab_size}: tokenizer and text encoder do not belong together")
    return _encode(encoder, jnp.asarray(ids), jnp.asarray(mask))
