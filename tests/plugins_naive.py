"""Literal, loop-by-loop implementations of published selection rules, used only as test references."""

import torch


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def naive_divprune(x, k):
    """DivPrune: first the token whose nearest neighbour is farthest, then max of min distance to the chosen."""
    n = x.shape[0]
    d = [[1 - _cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        best = max((i for i in range(n) if i not in chosen), key=lambda i: (min(d[i][s] for s in chosen), -i))
        chosen.append(best)
    return chosen


def naive_scope(x, cls, k, alpha):
    """SCOPE: greedy argmax of coverage gain Σ_j max(0, sim(j, i) − cur_j) times cls_i^α."""
    n = x.shape[0]
    sim = [[_cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    cur = [0.0] * n
    chosen = []
    while len(chosen) < k:
        def score(i):
            gain = sum(max(0.0, sim[j][i] - cur[j]) for j in range(n) if j not in chosen)
            return (max(gain, 0.0) * float(cls[i]) ** alpha, -i)
        best = max((i for i in range(n) if i not in chosen), key=score)
        chosen.append(best)
        cur = [max(cur[j], sim[j][best]) for j in range(n)]
    return chosen


def naive_visionzip(x, cls, keys, k, contextual):
    """VisionZip as its official code computes it on patch tokens: dominant = the top k − contextual by [CLS]
    attention; the rest, in sequence order, give `contextual` targets at the stride max(1, rest // contextual); each
    other token joins its most key-cosine-similar target (the first on ties); a contextual value is its target plus
    the mean of the tokens that joined it. Returns the kept places in sequence order and, aligned with them, the
    official sequence [dominant tokens in sequence order, contextual tokens in target order] and merged flags."""
    n = x.shape[0]
    dominant = sorted(sorted(range(n), key=lambda i: (-float(cls[i]), i))[: k - contextual])
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // contextual)
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    joined = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            sims = [_cos(keys[i], keys[t]) for t in targets]
            joined[targets[sims.index(max(sims))]].append(i)
    values = [x[i] for i in dominant]
    for t in targets:
        values.append(x[t] + torch.stack([x[j] for j in joined[t]]).mean(0) if joined[t] else x[t])
    merged = [False] * len(dominant) + [bool(joined[t]) for t in targets]
    return sorted(dominant + targets), values, merged
