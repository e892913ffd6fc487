"""How the Wan VAE lays out on a (data, fsdp, seq) mesh (`vidaccel.parallel`).

`VAE_RULES` names every parameter: the convolution kernels of the residual, resampling and attention
blocks (up to 384 x 384 x 27 each) are FSDP-sharded over their input-channel dim; biases, RMS-norm gains
and the four thin end convolutions (conv_in / conv_out of the encoder and decoder, quant_conv,
post_quant_conv) are replicated.

Only the weights and the batch are split: a decode sharded by these rules splits its latents by batch
over (data, fsdp) where the batch divides and otherwise runs the whole clip on every device. Tokens
(frames, height, width) of this convolutional, frame-causal VAE are not split, so with batch 1 a mesh
saves weight memory (0.5 GB in fp32 at Wan2.1's size) but not the decode's activation memory.
"""

from __future__ import annotations

from vidaccel.parallel import FSDP

_BLOCK = r"(encoder/down_blocks/\d+|decoder/up_blocks/\d+/resnets/\d+|(encoder|decoder)/mid_block/resnets/\d+)"
_CONV3 = (None, None, None, FSDP, None)           # (kt, kh, kw, in, out) over `in`
_CONV2 = (None, None, FSDP, None)                 # (kh, kw, in, out) over `in`

VAE_RULES = (
    (_BLOCK + r"/(conv1|conv2|conv_shortcut)/kernel", _CONV3),
    (r"(encoder/down_blocks/\d+|decoder/up_blocks/\d+/upsamplers/\d+)/time_conv/kernel", _CONV3),
    (r"(encoder/down_blocks/\d+|decoder/up_blocks/\d+/upsamplers/\d+)/resample/kernel", _CONV2),
    (r"(encoder|decoder)/mid_block/attentions/\d+/(to_qkv|proj)/kernel", _CONV2),
    (r"((encoder|decoder)/conv_(in|out)|quant_conv|post_quant_conv)/kernel", (None,) * 5),
    (r".*/(bias|gamma)", (None,)),
)

__all__ = ["VAE_RULES"]
