"""Analytic FLOPs of a pre-training step, and model FLOPs utilisation (MFU, as in PaLM appendix B).

Counted per layer, matmuls only (2 FLOPs per multiply-add): per token of a block, the QKV and output
projections (4·D²), the FFN (2·D·H) and the attention scores and weighted sum (2·S·D for a sequence of S
tokens). A step is 3× the forward pass (backward ≈ 2× forward). Padding is counted (sequences are padded
to the text length), and frozen weights count as trained, which slightly overstates the unimodal stages.
LayerNorm, softmax, GELU and the optimizer are left out, as usual for MFU.
"""

from __future__ import annotations

import torch

from ..models.vlmo import ModelConfig

# Dense bf16 tensor-core peak per device, FLOP/s (vendor data sheets; SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
             "V100": 125e12}


def block_flops(seq: int, d: int, hidden: int) -> float:
    """Forward FLOPs of one block over one sequence of ``seq`` tokens."""
    return 2.0 * seq * (4 * d * d + 2 * d * hidden) + 4.0 * seq * seq * d


def forward_flops(c: ModelConfig, kind: str, batch: int, text_len: int, mlm_prob: float = 0.15) -> float:
    """Forward FLOPs of one step's objectives for ``batch`` pairs (see :class:`~.losses.PretrainObjective`).

    ``vl``: retrieval route for images and texts, fusion route on 3·batch ITM pairs and on batch MLM pairs,
    the MLM head on the masked tokens; ``image``: vision route and the MIM head; ``text``: language route
    and the MLM head.
    """
    d, h, n, m = c.embed_dim, c.mlp_hidden, c.depth, c.num_vl_layers
    img_seq, pix = c.num_patches + 1, c.patch_size**2 * c.in_chans
    patch_embed = 2.0 * c.num_patches * pix * d
    image_route = patch_embed + n * block_flops(img_seq, d, h)
    text_route = n * block_flops(text_len, d, h)
    mlm_head = mlm_prob * text_len * 2.0 * (d * d + d * c.vocab_size)
    if kind == "image":
        return batch * (image_route + 2.0 * c.num_patches * d * pix)
    if kind == "text":
        return batch * (text_route + mlm_head)
    if kind != "vl":
        raise ValueError(f"kind must be 'vl', 'image' or 'text', got {kind!r}")
    fusion = patch_embed + (n - m) * (block_flops(img_seq, d, h) + block_flops(text_len, d, h)) + m * block_flops(
        img_seq + text_len, d, h)
    # FLAVA-style multimodal encoder (fusion "encoder"): its projections and layers on [text; image; CLS]
    fusion += c.mm_depth * block_flops(img_seq + text_len + 1, d, h) + (2.0 * (img_seq + text_len) * d * d
                                                                         if c.mm_depth else 0.0)
    return batch * (image_route + text_route + 4 * fusion + mlm_head)


def train_flops(c: ModelConfig, kind: str, batch: int, text_len: int) -> float:
    """FLOPs of one optimizer step (forward + backward) over ``batch`` pairs."""
    return 3.0 * forward_flops(c, kind, batch, text_len)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one accelerator: the override, else looked up by CUDA device name; None on CPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
