"""The model side of an index: a (merged) model that embeds images and texts and knows its key.

:class:`Embedder` wraps ``(model, preprocess, tokenizer)`` with the adapter file hash. Its
:attr:`~Embedder.key` is read from the model each time (base fingerprint, adapter hash and
the alpha the adapters are merged at), so a model re-merged behind the embedder's back
cannot pass for the old alpha.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

import radapter
from radapter.data.sets import open_image

from .collection import ImageRef
from .errors import IndexStoreError
from .keys import ModelKey, file_sha256, normalize_alpha

QueryImage = ImageRef | Path | Image.Image | torch.Tensor


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: Sequence[ImageRef], transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_image(self.images[i]))


class Embedder:
    """Embeds images and texts with one merged model; ``key`` says which.

    ``adapter_sha256`` is the SHA-256 of the adapter file loaded into ``model`` (``None``
    when it has no adapters). Pass ``alpha`` to merge now; otherwise a model with adapters
    must already be merged.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, *,
                 adapter_sha256: str | None = None, alpha: float | None = None, model_name: str | None = None,
                 adapter_path: str | None = None, batch_size: int = 64, num_workers: int = 0) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.batch_size, self.num_workers = batch_size, num_workers
        # Called after every batch embedded into an index with (part, done, total): a server
        # building one in the background reports progress through it, and may block in it to
        # let a user's request have the CPU first.
        self.on_batch: Callable[[str, int, int], None] | None = None
        self.adapter_sha256, self.adapter_path = adapter_sha256, adapter_path
        info = getattr(model, "radapter_model_info", None)
        self.model_name = model_name or (info.name if info else type(model).__name__)
        if not radapter.has_adapters(model):
            if adapter_sha256 is not None or alpha is not None:
                raise IndexStoreError("the model has no adapters: an adapter hash or alpha makes no sense")
            self.base_fingerprint = radapter.compute_fingerprint(model)
        else:
            if adapter_sha256 is None:
                raise IndexStoreError("the model has adapters: give the adapter file's sha256 (adapter_sha256=)")
            self.base_fingerprint = radapter.base_fingerprint(model)
            if alpha is not None:
                radapter.merge_adapters(model, alpha)
            elif radapter.merged_alpha(model) is None:
                raise IndexStoreError("merge the adapters at an alpha first (or pass alpha=)")

    @classmethod
    def load(cls, model: str | None = None, *, pretrained: str | None = None, adapter: str | Path | None = None,
             alpha: float | None = None, device: str = "cpu", **kwargs: Any) -> Embedder:
        """Load a model (default: ``radapter.load_model()``), its adapter file, and merge at ``alpha``
        (default: the adapter's ``default_alpha``)."""
        m, preprocess, tokenizer = radapter.load_model(model, pretrained=pretrained, device=device)
        sha = None
        if adapter is not None:
            meta = radapter.load_adapters(m, adapter)
            sha = file_sha256(adapter)
            alpha = meta["default_alpha"] if alpha is None else alpha
        elif alpha is not None:
            raise IndexStoreError("--alpha needs --adapter (a model without adapters has no alpha)")
        return cls(m, preprocess, tokenizer, adapter_sha256=sha, alpha=alpha,
                   adapter_path=str(adapter) if adapter else None, **kwargs)

    # ------------------------------------------------------------------ identity
    @property
    def alpha(self) -> float | None:
        return normalize_alpha(radapter.merged_alpha(self.model)) if radapter.has_adapters(self.model) else None

    @property
    def key(self) -> ModelKey:
        """The model a query embedded now comes from (alpha read live from the model)."""
        if radapter.has_adapters(self.model) and radapter.merged_alpha(self.model) is None:
            raise IndexStoreError("the model's adapters are not merged: merge them at the index's alpha")
        return ModelKey(self.base_fingerprint, self.adapter_sha256, self.alpha)

    def set_alpha(self, alpha: float) -> None:
        """Re-merge the adapters at ``alpha`` (cheap: one add per adapted tensor)."""
        if not radapter.has_adapters(self.model):
            raise IndexStoreError("the model has no adapters: alpha cannot change")
        radapter.merge_adapters(self.model, alpha)

    def describe(self) -> dict[str, Any]:
        """Model facts for the manifest."""
        return {"name": self.model_name, "fingerprint": self.base_fingerprint,
                "adapter_sha256": self.adapter_sha256, "adapter_path": self.adapter_path, "alpha": self.alpha}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ embedding
    @torch.inference_mode()
    def image_batches(self, images: Sequence[ImageRef]) -> Iterator[np.ndarray]:
        """L2-normalised float32 embeddings of ``images``, one batch at a time, in order."""
        self.model.eval()
        loader = torch.utils.data.DataLoader(_Images(images, self.preprocess), batch_size=self.batch_size,
                                             num_workers=self.num_workers)
        for x in loader:
            yield self.model.encode_image(x.to(self.device), normalize=True).float().cpu().numpy()

    @torch.inference_mode()
    def text_batches(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
        """L2-normalised float32 embeddings of ``texts``, one batch at a time, in order."""
        self.model.eval()
        size = max(self.batch_size, 256)
        for i in range(0, len(texts), size):
            tokens = self.tokenizer(list(texts[i:i + size])).to(self.device)
            yield self.model.encode_text(tokens, normalize=True).float().cpu().numpy()

    def embed(self, part: str, items: Sequence[Any], *, progress: bool = False, desc: str | None = None) -> np.ndarray:
        """All embeddings of ``items`` (images or texts) as one ``(n, dim)`` float32 array."""
        batches = self.image_batches(items) if part == "image" else self.text_batches(items)
        out = []
        with tqdm(total=len(items), desc=desc or f"embedding {part}s", disable=not progress, leave=False) as bar:
            for b in batches:
                out.append(b)
                bar.update(len(b))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        """Embedding width (from one text through the model)."""
        if not hasattr(self, "_dim"):
            self._dim = int(next(self.text_batches(["a"])).shape[1])
        return self._dim

    def embed_queries(self, images: Sequence[QueryImage]) -> np.ndarray:
        """Embeddings of query images: paths, arrays, PIL images or preprocessed tensors."""
        tensors = []
        for img in images:
            if isinstance(img, torch.Tensor):
                tensors.append(img)
            elif isinstance(img, Image.Image):
                tensors.append(self.preprocess(img.convert("RGB")))
            else:
                tensors.append(self.preprocess(open_image(img)))
        with torch.inference_mode():
            self.model.eval()
            out = [self.model.encode_image(torch.stack(tensors[i:i + self.batch_size]).to(self.device),
                                           normalize=True).float().cpu().numpy()
                   for i in range(0, len(tensors), self.batch_size)]
        return np.concatenate(out)
