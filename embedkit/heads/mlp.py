"""``mlp``: a small torch MLP with early stopping on held-out tracks; numpy inference."""

from __future__ import annotations

import copy

import numpy as np

from .base import _encode, _NumpyClassifier, _torch_threads, _torch_view, _validate, auto_threads, holdout_indices


class TorchMLP(_NumpyClassifier):
    """Small MLP (Linear-ReLU-Dropout blocks) trained with AdamW and early stopping.

    ``fit(X, y, groups=None)``: ``val_fraction`` of the rows - whole groups when ``groups``
    (track ids) are given - is held out; training stops after ``patience`` epochs without a
    lower validation loss and the best epoch's weights are kept. Fitted: ``classes_``,
    ``coefs_`` (list of [in, out]), ``intercepts_``, ``n_epochs_``, ``best_epoch_``,
    ``loss_curve_`` / ``val_loss_curve_`` / ``val_accuracy_curve_`` per epoch.
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = (256,),
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        max_epochs: int = 60,
        patience: int = 3,
        val_fraction: float = 0.1,
        n_jobs: int | None = None,
        random_state: int = 0,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        X, y = _validate(self, X, y)
        with _torch_threads(auto_threads(*X.shape, self.n_jobs)):
            return self._fit(X, y, groups)

    def _fit(self, X, y, groups):
        import torch
        import torch.nn.functional as F
        from torch import nn

        self.classes_, yi = _encode(y)
        n, d = X.shape
        tr, va = holdout_indices(
            yi, None if groups is None else np.asarray(groups), self.val_fraction, self.random_state
        )
        with torch.random.fork_rng(devices=[]):  # seeded init and shuffling, global RNG untouched
            torch.manual_seed(self.random_state)
            sizes = [d, *map(int, self.hidden)]
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(self.dropout)]
            layers.append(nn.Linear(sizes[-1], len(self.classes_)))
            net = nn.Sequential(*layers)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            Xt, yt = _torch_view(X), torch.from_numpy(yi)
            tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
            best, best_state, bad = np.inf, None, 0
            self.loss_curve_, self.val_loss_curve_, self.val_accuracy_curve_ = [], [], []
            self.best_epoch_ = 0
            for epoch in range(self.max_epochs):
                net.train()
                perm = tr_t[torch.randperm(len(tr_t))]
                total = 0.0
                for i in range(0, len(perm), self.batch_size):
                    rows = perm[i : i + self.batch_size]
                    loss = F.cross_entropy(net(Xt[rows]), yt[rows])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach().item() * len(rows)
                self.loss_curve_.append(total / max(len(perm), 1))
                if len(va_t) == 0:
                    continue
                net.eval()
                with torch.inference_mode():
                    logits = torch.cat([net(Xt[va_t[i : i + 8192]]) for i in range(0, len(va_t), 8192)])
                    vloss = float(F.cross_entropy(logits, yt[va_t]))
                    vacc = float((logits.argmax(1) == yt[va_t]).float().mean())
                self.val_loss_curve_.append(vloss)
                self.val_accuracy_curve_.append(vacc)
                if vloss < best - 1e-4:
                    best, bad, self.best_epoch_ = vloss, 0, epoch
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
        self.n_epochs_ = len(self.loss_curve_)
        linears = [m for m in net if isinstance(m, nn.Linear)]
        self.coefs_ = [m.weight.detach().numpy().T.copy() for m in linears]
        self.intercepts_ = [m.bias.detach().numpy().copy() for m in linears]
        return self

    def _logits(self, X) -> np.ndarray:
        h = self._check_X(X)
        for i, (W, b) in enumerate(zip(self.coefs_, self.intercepts_)):
            h = h @ W + b
            if i < len(self.coefs_) - 1:
                np.maximum(h, 0, out=h)  # ReLU; dropout is the identity at inference
        return h

    @property
    def n_params_(self) -> int:
        return int(sum(w.size + b.size for w, b in zip(self.coefs_, self.intercepts_)))
