"""Visual prototypes: the mean raw (unnormalized, unaugmented) image feature of each base class."""

from __future__ import annotations

import numpy as np
import torch


def class_means(features, labels: np.ndarray, num_classes: int, chunk: int = 65536) -> torch.Tensor:
    """[num_classes, D] float64-accumulated means, streaming over row chunks of `features`."""
    labels = np.asarray(labels)
    dim = np.asarray(features[:1]).shape[-1]
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    for start in range(0, len(labels), chunk):
        block = torch.as_tensor(np.asarray(features[start : start + chunk], dtype=np.float64))
        index = torch.as_tensor(labels[start : start + chunk], dtype=torch.long)
        keep = index < num_classes
        sums.index_add_(0, index[keep], block[keep])
    counts = torch.as_tensor(np.bincount(labels, minlength=num_classes)[:num_classes])
    return (sums / counts.clamp(min=1).unsqueeze(1)).float()
