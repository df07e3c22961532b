"""The PyTorch reference step: per step, what CoOp's PyTorch trainer does (KaiyangZhou/CoOp, `trainers/coop.py`).

* The K class prompts are full 77-token sequences "X X ... X {classname}." (CoOp's `PromptLearner`): the
  frozen token embeddings of [SOS] and of the class-name suffix are kept as buffers and the n_ctx learned
  context vectors are spliced between them, for every class, every step.
* The text tower (`transformers`' PyTorch `CLIPModel` text encoder, causal mask) runs over all K x 77
  tokens; the feature is read at the end-of-text token, after the final layer norm, and projected.
* Image features: the image tower on the batch (`computed`, no gradient) or given (`cached`).
* Logits `exp(logit_scale) * cos`, then DSPT (`cross_entropy(softmax(logits), y)`) or cross-entropy, backward
  to the context only, SGD with momentum 0.9 and weight decay 5e-4 (CoOp's optimizer).

`python -m dspt_jax.bench --reference` runs it beside our step on the same shapes and weights. Needs torch and
transformers (the `test` extra). Not imported by the package.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import transformers


class CoOpStep:
    """One CoOp training step over fixed shapes.

    Args:
      hf_config: a transformers `CLIPConfig` dict (`dspt_jax.models.CLIPConfig.to_hf_dict()`).
      token_ids: int [K, 77] tokenized prompts "X ... X {name}." (n_ctx placeholder tokens after [SOS]).
      ctx: float [n_ctx, D] initial context.
      loss: "dspt" or "ce".
      dtype: torch dtype of the towers (the loss is computed in float32).
      device: where it runs ("cpu", "cuda"); the weights are initialized on the CPU either way.
    """

    def __init__(self, hf_config: dict, token_ids: np.ndarray, ctx: np.ndarray, loss: str = "dspt",
                 dtype=torch.float32, seed: int = 0, device: str = "cpu"):
        torch.manual_seed(seed)
        self.model = transformers.CLIPModel(transformers.CLIPConfig(**hf_config)).eval()
        self.model.requires_grad_(False)
        self.model.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device
        n_ctx = ctx.shape[0]
        self.token_ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=device)
        self.eot = self.token_ids.argmax(-1)
        with torch.no_grad():
            embedding = self.model.text_model.embeddings.token_embedding(self.token_ids)
        self.token_prefix = embedding[:, :1]  # [SOS]
        self.token_suffix = embedding[:, 1 + n_ctx :]  # class name, ".", [EOT], padding
        self.ctx = torch.nn.Parameter(torch.as_tensor(np.asarray(ctx), dtype=torch.float32, device=device))
        length = self.token_ids.shape[1]
        self.causal_mask = torch.full((length, length), float("-inf"), device=device).triu(1)[None, None].to(dtype)
        self.loss = loss
        self.optimizer = torch.optim.SGD([self.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """The CLIP weights, float32 numpy under transformers' names (for `torch_to_flax`)."""
        return {k: v.detach().float().cpu().numpy() for k, v in self.model.state_dict().items()}

    def class_features(self) -> torch.Tensor:
        k = self.token_ids.shape[0]
        ctx = self.ctx.to(self.dtype).unsqueeze(0).expand(k, -1, -1)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        text = self.model.text_model
        x = x + text.embeddings.position_embedding.weight[: x.shape[1]]
        x = text.encoder(inputs_embeds=x, attention_mask=self.causal_mask).last_hidden_state
        x = text.final_layer_norm(x)
        return self.model.text_projection(x[torch.arange(k), self.eot]).float()

    def image_features(self, pixels_nhwc: np.ndarray) -> torch.Tensor:
        pixels = torch.as_tensor(np.asarray(pixels_nhwc), device=self.device).permute(0, 3, 1, 2).to(self.dtype)
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled).float()

    def step(self, labels: np.ndarray, images: np.ndarray | None = None,
             image_features: np.ndarray | None = None) -> float:
        """One update; exactly one of `images` (NHWC, CLIP-normalized) or `image_features` [B, D]."""
        if images is not None:
            feats = self.image_features(images)
        else:
            feats = torch.as_tensor(np.asarray(image_features), dtype=torch.float32, device=self.device)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        text = self.class_features()
        scale = self.model.logit_scale.exp().float()
        logits = scale * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).t()
        if self.loss == "dspt":
            loss = F.cross_entropy(logits.softmax(-1), y)
        elif self.loss == "ce":
            loss = F.cross_entropy(logits, y)
        else:
            raise ValueError(f"the reference step knows losses 'dspt' and 'ce', not {self.loss!r}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()  # a sync per step, as CoOp's trainer logging the loss
