"""CLIP model (ViT or ModifiedResNet image tower), prompt learner and checkpoint loading (no TensorFlow)."""

from dspt_jax.models.clip import CLIPConfig, CLIPModule, TextConfig, VisionConfig, clip_logits, l2_normalize
from dspt_jax.models.loading import CLIP, CheckpointNotFoundError, init_clip, load_clip, save_clip
from dspt_jax.models.resnet import ResNetConfig

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPModule",
    "CheckpointNotFoundError",
    "ResNetConfig",
    "TextConfig",
    "VisionConfig",
    "clip_logits",
    "init_clip",
    "l2_normalize",
    "load_clip",
    "save_clip",
]
