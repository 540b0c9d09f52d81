"""Weighted k-nearest-neighbour classification of frozen features, as DINO evaluates a backbone without
training anything (Caron et al. 2021, Sec. 4.1 and its ``eval_knn.py``).

    f        = features / |features|                      every train and query feature L2-normalised
    sim      = f_query @ f_train^T                        cosine similarity
    N_k      = the k train features most similar to the query          (k = 20)
    score[c] = sum_{j in N_k, label_j = c} exp(sim_j / T)             (T = 0.07: one vote per neighbour)
    top-1    = argmax_c score[c];   top-5: the label is among the 5 best scores

The query set is processed in chunks so that the whole similarity matrix of every query against every
train image never has to exist at once. Imports torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

K = 20
TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, num_classes] of every query (module docstring)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and a positive temperature, got k={k}, T={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, train.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk):
        query = F.normalize(query_features[start:start + chunk].float(), dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = K,
                 temperature: float = TEMPERATURE) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN over the queries."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes, k, temperature)
    best = scores.topk(min(5, num_classes), dim=1).indices
    labels = query_labels.long().to(best.device)
    n = max(len(labels), 1)
    return {"top1": 100.0 * (best[:, 0] == labels).sum().item() / n,
            "top5": 100.0 * (best == labels[:, None]).any(1).sum().item() / n}
