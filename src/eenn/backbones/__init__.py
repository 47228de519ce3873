"""Backbone registry. Importing this package registers every built-in family."""
from .base import (Backbone, StageInfo, create_backbone, default_head, dry_run, head_input, head_keep, list_backbones,
                   register_backbone)
from . import alexnet, mobilenet, msdnet, resnet, small, vgg, vit  # noqa: F401  (registration side effects)

__all__ = ["Backbone", "StageInfo", "create_backbone", "default_head", "dry_run", "head_input", "head_keep", "list_backbones",
           "register_backbone"]
