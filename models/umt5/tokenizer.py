"""The umT5 tokenizer from a pipeline's `tokenizer/tokenizer.json`, with the `tokenizers` library alone.

transformers' `T5Tokenizer` (what `AutoTokenizer` gives the Wan pipeline) does not run tokenizer.json as
written: it keeps the Unigram vocabulary, only the SentencePiece `Precompiled` part of the normalizer, and
the post-processor, and pre-tokenizes with whitespace splitting followed by Metaspace ("▁" prepended to
every word). `load_tokenizer` rebuilds the same pipeline, so ids equal transformers' (tested on a tiny
tokenizer with odd characters, entities and truncation).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

FILE = "tokenizer.json"
SUBFOLDER = "tokenizer"
PAD, EOS = "<pad>", "</s>"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read `path/tokenizer/tokenizer.json` (a pipeline root) or `path/tokenizer.json`, T5-style."""
    root = Path(path)
    file = next((f for f in (root / SUBFOLDER / FILE, root / FILE) if f.is_file()), None)
    if file is None:
        raise ValueError(f"{root}: no {FILE} (looked in {root / SUBFOLDER} and {root}); the tokenizer folder must "
                         "hold the fast-tokenizer file tokenizer.json (e.g. google/umt5-xxl's)")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # json, decoding, and tokenizers' own (plain Exception) errors alike
        raise ValueError(f"{file}: not a readable tokenizers file ({err})") from err
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "Unigram":
        raise ValueError(f"{file}: model type {model_type!r}; umT5 tokenizers are SentencePiece 'Unigram' models")
    for special in (PAD, EOS):
        if tok.token_to_id(special) is None:
            raise ValueError(f"{file}: vocabulary lacks the special token {special!r} that umT5 needs")
    tok.normalizer = _precompiled(spec.get("normalizer"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    if tok.post_processor is None:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                           special_tokens=[(EOS, tok.token_to_id(EOS))])
    tok.no_padding()
    tok.no_truncation()
    return tok


def _precompiled(spec: dict | None):
    """The SentencePiece `Precompiled` normalizer inside tokenizer.json's normalizer, or None."""
    if not spec:
        return None
    parts = spec["normalizers"] if spec.get("type") == "Sequence" else [spec]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return normalizers.Precompiled(base64.b64decode(part["precompiled_charsmap"]))
    return None


def tokenize(tokenizer: Tokenizer, prompts: str | list[str], max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, max_length) int32: </s> appended, truncated, right-padded with <pad>.

    As the Wan pipeline calls transformers (padding="max_length", truncation=True, add_special_tokens=True):
    a prompt longer than max_length keeps its first max_length - 1 tokens and then </s>.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r:.80}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length={max_length!r}: need an int >= 2 (room for a token and </s>)")
    pad = tokenizer.token_to_id(PAD)
    if pad is None:
        raise ValueError(f"tokenizer has no {PAD!r} token; load it with load_tokenizer")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad, pad_token=PAD)
    try:
        enc = tokenizer.encode_batch(list(prompts), add_special_tokens=True)
    finally:
        tokenizer.no_padding()
        tokenizer.no_truncation()
    ids = np.asarray([e.ids for e in enc], np.int32)
    mask = np.asarray([e.attention_mask for e in enc], np.int32)
    return ids, mask
