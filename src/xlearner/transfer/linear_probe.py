"""Classification transfer, ``linear`` mode: the linear probe.

L2-regularised multinomial logistic regression (scikit-learn, lbfgs) on standardised, frozen,
pooled last-stage features. C is chosen among ``probe_C`` by top-1 on the val split (model fit
on train); the chosen C is refit on train + val; the test split is scored once. When val is the
scored split (``transfer.eval_split=val``), ``suite.probe_seed`` chooses C on part of train
instead. (``finetune``: the cls task's neck + head trained end to end, ``transfer.train``.)
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from xlearner.metrics import top1


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(),
                        LogisticRegression(C=float(C), solver="lbfgs", max_iter=1000, random_state=seed))
    # one BLAS thread: these matrices are small, and multi-threaded OpenBLAS was 13x slower here
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
          test: tuple[np.ndarray, np.ndarray], Cs: Sequence[float], seed: int = 0,
          refit: bool = True) -> dict[str, Any]:
    """Linear probe on precomputed features: returns {"top1", "C", "val_top1": {C: acc}}.

    With an empty val split (or a single C) the choice falls to the middle C without peeking at test.
    ``refit=False``: the probe scored is the one fitted on train alone.
    """
    (xtr, ytr), (xv, yv), (xte, yte) = train, val, test
    if len(np.unique(ytr)) < 2:
        raise ValueError("linear probe: the training split holds fewer than two classes")
    Cs = [float(c) for c in Cs]
    val_acc: dict[float, float] = {}
    if len(yv) > 0 and len(Cs) > 1:
        for c in Cs:
            val_acc[c] = top1(_fit(xtr, ytr, c, seed).predict(xv), yv)
        best = max(Cs, key=lambda c: (val_acc[c], -abs(np.log10(c))))  # ties: the moderate C
    else:
        best = Cs[len(Cs) // 2]
    if refit and len(yv):
        xtr, ytr = np.concatenate([xtr, xv]), np.concatenate([ytr, yv])
    clf = _fit(xtr, ytr, best, seed)
    return {"top1": top1(clf.predict(xte), yte), "C": best,
            "val_top1": {str(c): a for c, a in val_acc.items()}}
