"""Backbone registry. Importing this package registers every built-in family."""
from .base import Backbone, StageInfo, create_backbone, dry_run, head_input, head_keep, list_backbones, register_backbone
from . import alexnet, mobilenet, resnet, small, vgg, vit  # noqa: F401  (registration side effects)

__all__ = ["Backbone", "StageInfo", "create_backbone", "dry_run", "head_input", "head_keep", "list_backbones",
           "register_backbone"]
