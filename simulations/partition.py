"""Split one labelled dataset across virtual clients: IID or Dirichlet(alpha) label skew.

Both are deterministic for a seed and put every sample in exactly one client.
"""

from __future__ import annotations

import numpy as np

MAX_DIRICHLET_DRAWS = 1000


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    if num_clients > num_samples:
        raise ValueError(f"clients = {num_clients}: cannot split {num_samples} samples among "
                         f"{num_clients} clients, one at least each; accepted: clients ≤ "
                         f"{num_samples}")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_samples: int = 10
) -> list[np.ndarray]:
    """Label skew: for each class, split its samples by proportions drawn from Dir(alpha).

    Small alpha gives clients few classes each. The draw is repeated (with the same
    generator, so still deterministic) until every client holds at least `min_samples`.
    """
    if alpha <= 0:
        raise ValueError(f"partition.alpha must be > 0, got {alpha}")
    if num_clients * min_samples > len(labels):
        raise ValueError(
            f"partition.min_samples = {min_samples}: {len(labels)} samples cannot give "
            f"{num_clients} clients {min_samples} each; accepted: partition.min_samples ≤ "
            f"{len(labels) // num_clients} for {num_clients} clients, or fewer clients"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    best = 0  # the most clients one draw gave min_samples: said if no draw gives all
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        enough = sum(len(p) >= min_samples for p in merged)
        if enough == num_clients:
            return merged
        best = max(best, enough)
    lower = " a lower partition.min_samples," if min_samples > 1 else ""
    raise ValueError(
        f"partition.alpha = {alpha:g}: no Dirichlet draw in {MAX_DIRICHLET_DRAWS} gave all "
        f"{num_clients} clients at least partition.min_samples = {min_samples} samples (the "
        f"best gave {best} of them that many); accepted: a higher partition.alpha,{lower} or "
        "fewer clients"
    )


def partition(
    labels: np.ndarray, num_clients: int, kind: str, alpha: float, seed: int, min_samples: int = 10
) -> list[np.ndarray]:
    if kind == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_samples)
    raise ValueError(f"unknown partition.kind {kind!r}; accepted: iid, dirichlet")
