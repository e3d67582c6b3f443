"""Reusable training components: config, data, an exact resumable trainer, and the SFT recipe.

Recipes (SFT here, the VLsI steps in `vlsi_model.distill`) build an objective module and a
dataset and call `train`; see trainer.py for the loop's contract and checkpoint format.
"""

from vlsi_model.data.llava import DatasetError
from vlsi_model.training.config import ConfigError, TrainConfig, dataclass_from_dict, load_yaml_config
from vlsi_model.training.dataset import ConversationDataset, make_collate_fn
from vlsi_model.training.trainer import GlobalBatchSampler, TrainResult, list_checkpoints, train

__all__ = [
    "ConfigError",
    "ConversationDataset",
    "DatasetError",
    "GlobalBatchSampler",
    "TrainConfig",
    "TrainResult",
    "dataclass_from_dict",
    "list_checkpoints",
    "load_yaml_config",
    "make_collate_fn",
    "train",
]
