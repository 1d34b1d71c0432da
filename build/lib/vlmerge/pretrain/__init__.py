"""VL pre-training of the VLMo family: objectives, recipes (scratch / seed / stagewise), the DDP engine.

>>> from vlmerge.pretrain import load_config, pretrain, evaluate_retrieval
>>> final = pretrain(load_config("configs/micro.yaml"), "runs/micro")    # -> runs/micro/final
"""

from .config import PretrainConfig, load_config, validate_config
from .engine import pretrain
from .evaluate import evaluate_retrieval
from .inputs import PretrainData, build_data
from .recipes import RECIPES, Stage, is_trainable, plan_stages

__all__ = [
    "RECIPES", "PretrainConfig", "PretrainData", "Stage", "build_data", "evaluate_retrieval", "is_trainable",
    "load_config", "plan_stages", "pretrain", "validate_config",
]
