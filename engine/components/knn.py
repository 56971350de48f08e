"""Exact nearest-neighbour search (faiss on CPU, batched torch on CUDA)."""

from __future__ import annotations

import numpy as np
import torch


class NearestNeighbours:
    """Exact L2 k-NN against a fixed bank. search() returns Euclidean (not squared) distances."""

    def __init__(self, bank: torch.Tensor, device: str = "cpu"):
        """bank: (M, D) float."""
        self.bank = bank.float().contiguous()
        self.device = device
        self._index = None
        if not device.startswith("cuda"):
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())  # its own OpenMP runtime: match torch's threads
            self._index = faiss.IndexFlatL2(self.bank.shape[1])
            self._index.add(np.ascontiguousarray(self.bank.cpu().numpy()))

    def search(self, queries: torch.Tensor, k: int = 1, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (distances (Q, k), indices (Q, k) int64), nearest first."""
        k = min(k, self.bank.shape[0])
        if self._index is not None:
            d, i = self._index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
            return torch.from_numpy(d).clamp_min_(0).sqrt_(), torch.from_numpy(i)
        bank = self.bank.to(self.device)
        ds, idx = [], []
        for s in range(0, queries.shape[0], chunk):
            q = queries[s:s + chunk].to(self.device).float()
            d = torch.cdist(q, bank)
            v, i = torch.topk(d, k, dim=1, largest=False)
            ds.append(v.cpu())
            idx.append(i.cpu())
        return torch.cat(ds), torch.cat(idx)
