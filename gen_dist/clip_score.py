"""CLIP score (Hessel et al. 2021): how well images match their prompts, 100 x max(cos(image, text), 0) with a
CLIP model's image and text embeddings, summed here and averaged over all ranks' samples by the caller."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gen_dist.dist import whole_pretrained_loads
from gen_dist.schema import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The pixel statistics CLIP's image encoders were trained with."""


class ClipScore:
    """A transformers CLIPModel (a local directory or hub id) and its tokenizer."""

    def __init__(self, source: str, device: torch.device) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        whole_pretrained_loads()
        where = str(Path(source).expanduser()) if Path(source).expanduser().exists() else source
        try:
            self.net = transformers.CLIPModel.from_pretrained(where).to(device).eval().requires_grad_(False)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as e:
            raise ConfigError(f"eval.clip_model: {source} is not a CLIP model that loads "
                              f"({str(e).splitlines()[0]})") from None
        self.device = device
        self.size = self.net.config.vision_config.image_size
        self.length = self.net.config.text_config.max_position_embeddings

    @staticmethod
    def _pooled(out: object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def sum(self, images: torch.Tensor, prompts: list[str]) -> float:
        """The summed CLIP score of uint8 images (N C H W) against their prompts."""
        x = images.to(self.device, torch.float32) / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 1)
        x = (x - torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)) / torch.tensor(
            CLIP_STD, device=self.device).view(1, 3, 1, 1)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.length,
                                return_tensors="pt").to(self.device)
        image = self._pooled(self.net.get_image_features(pixel_values=x))
        text = self._pooled(self.net.get_text_features(**tokens))
        cos = F.cosine_similarity(image.float(), text.float(), dim=1)
        return float((100 * cos.clamp(min=0)).sum())
