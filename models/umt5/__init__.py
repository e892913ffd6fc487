"""umT5 text encoder (Wan2.1's) in Flax NNX: config presets, the encoder, its safetensors loader, the tokenizer
read with `tokenizers` alone, and the Wan pipeline's prompt cleaning and encoding.

    encoder = load_umt5("Wan2.1-T2V-1.3B-Diffusers")          # text_encoder/ of a pipeline folder
    tokenizer = load_tokenizer("Wan2.1-T2V-1.3B-Diffusers")   # tokenizer/tokenizer.json
    context = encode_prompts(encoder, tokenizer, ["a cat on the beach"])   # (1, 512, 4096), zero-padded
"""

from models.umt5.config import PRESETS, UMT5Config, umt5_tiny, umt5_xxl
from models.umt5.encoder import UMT5Encoder, abstract_umt5, count_params, init_umt5, relative_position_buckets
from models.umt5.loader import load_umt5
from models.umt5.prompts import MAX_LENGTH, encode_prompts, prompt_clean
from models.umt5.tokenizer import load_tokenizer, tokenize

__all__ = ["MAX_LENGTH", "PRESETS", "UMT5Config", "UMT5Encoder", "abstract_umt5", "count_params", "encode_prompts",
           "init_umt5", "load_tokenizer", "load_umt5", "prompt_clean", "relative_position_buckets", "tokenize",
           "umt5_tiny", "umt5_xxl"]
