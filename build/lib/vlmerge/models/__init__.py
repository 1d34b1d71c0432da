"""The VLMo model family: configs and presets, the model, checkpoints, HF importers, the param-role map."""

from .checkpoint import (
    CheckpointError,
    CheckpointReader,
    SafetensorsStreamWriter,
    check_checkpoint,
    load_model,
    load_model_config,
    save_checkpoint,
    save_model,
)
from .roles import MergeGroup, ParamRole, block_param_name, merge_groups, parse_param_name
from .vlmo import (
    ARCHS,
    PRESETS,
    ModelConfig,
    VLMo,
    count_params,
    maa_to_msa,
    merged_to_maa,
    param_shapes,
    preset_config,
)

__all__ = [
    "ARCHS", "PRESETS", "CheckpointError", "CheckpointReader", "MergeGroup", "ModelConfig", "ParamRole",
    "SafetensorsStreamWriter", "VLMo", "block_param_name", "check_checkpoint", "count_params", "load_model",
    "load_model_config",
    "maa_to_msa", "merge_groups", "merged_to_maa", "param_shapes", "parse_param_name", "preset_config",
    "save_checkpoint", "save_model",
]
