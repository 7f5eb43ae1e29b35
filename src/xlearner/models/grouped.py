"""The T branches of a frozen expansion model run side by side as one grouped network.

The squeeze teacher runs stages 1..3 of every task backbone on every batch, then the
reconciliations between them: at the ``gpu`` preset's small batches that step is bound by how many
kernels it launches, not by their arithmetic (docs/performance.md). Branches of the same
architecture on inputs of the same shape can instead run as ONE network whose channels are the
branches' side by side: every conv becomes a grouped conv (``groups`` x T) and every BatchNorm
one BatchNorm over T x C channels. Both are exact: a grouped conv is the T convs, and BatchNorm
normalises each channel on its own, so each branch keeps its own (batch) statistics. The
reconciliations R_{t<-u} of one stage become one grouped 1x1 conv (group u gives every R_{t<-u}),
one BatchNorm, and a sum over u of the blocks of each target t.

For frozen nets only: the copy is taken once and does not follow later changes of the net's
weights (``stale()`` says whether there were any).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from xlearner.models.reconciliation import Reconciliation

# parameter-free leaves that act on every channel alone: a grouped copy keeps them as they are
CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)


class NotGroupable(ValueError):
    """The modules cannot run as one grouped module (a layer that mixes channels other than by a conv)."""


def _grouped_conv(convs: list[nn.Conv2d], inputs: int | None = None) -> nn.Conv2d:
    """The convs side by side, reading ``inputs`` inputs side by side (default: one each; fewer: the
    convs of each run of ``len(convs) // inputs`` share one input, as the stems of branches do)."""
    c, g = convs[0], len(convs)
    k = g if inputs is None else inputs
    out = nn.Conv2d(c.in_channels * k, c.out_channels * g, c.kernel_size, c.stride, c.padding, c.dilation,
                    c.groups * k, c.bias is not None, c.padding_mode, device=c.weight.device, dtype=c.weight.dtype)
    # cat keeps the weights' memory format (channels_last on a GPU)
    out.weight = nn.Parameter(torch.cat([m.weight for m in convs]), requires_grad=False)
    if c.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias for m in convs]), requires_grad=False)
    return out


def _grouped_bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b = bns[0]
    if b.track_running_stats and b.training:
        raise NotGroupable("a train-mode BatchNorm that updates its running statistics")
    ref = b.weight if b.affine else b.running_mean
    out = nn.BatchNorm2d(b.num_features * len(bns), b.eps, b.momentum, b.affine, b.track_running_stats,
                         device=ref.device, dtype=ref.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(out, name, None) is not None:
            getattr(out, name).copy_(torch.cat([getattr(m, name) for m in bns]))
    out.train(b.training)
    return out


@torch.no_grad()
def grouped_copy(modules: list[nn.Module], inputs: int | None = None) -> nn.Module:
    """One module whose input and output are the ``modules``' side by side on the channel axis (with
    ``inputs``: whose first conv reads that many inputs side by side, each shared by a run of modules).

    The modules must share one architecture made of Conv2d, BatchNorm2d and channel-wise leaves
    (``CHANNELWISE``) joined by any container or block whose forward only chains, adds or
    multiplies them (a ResNet block): otherwise ``NotGroupable``."""
    out = copy.deepcopy(modules[0])
    parts = [dict(m.named_modules()) for m in modules]
    first = inputs
    for name, m in list(out.named_modules()):
        if any(m.__class__ is not p.get(name).__class__ for p in parts):
            raise NotGroupable(f"module {name!r} differs between the branches")
        if isinstance(m, nn.Conv2d):
            new, first = _grouped_conv([p[name] for p in parts], first), None
        elif isinstance(m, nn.BatchNorm2d):
            new = _grouped_bn([p[name] for p in parts])
        elif next(m.children(), None) is not None or isinstance(m, CHANNELWISE):
            continue
        else:
            raise NotGroupable(f"module {name!r} ({type(m).__name__}) may mix channels")
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, new)
    if isinstance(out, (nn.Conv2d, nn.BatchNorm2d)):  # a single layer: the loop replaced nothing above it
        raise NotGroupable("pass a container, not a single layer")
    return out


class GroupedReconciliation(nn.Module):
    """f_t + sum_{u != t} R_{t<-u}(f_u) for every t at once, on branches side by side (B, T*C, H, W),
    or on ``copies`` such sets side by side (one per input batch)."""

    def __init__(self, reconcilers: nn.ModuleDict, tasks: list[str], copies: int = 1):
        super().__init__()
        pairs = [(t, u) for u in tasks for t in tasks if t != u]  # grouped by the branch u they read
        rs = [reconcilers[f"{t}_from_{u}"] for t, u in pairs]
        if any(type(r) is not Reconciliation for r in rs):
            raise NotGroupable("only the 1x1 conv + BN reconciliation (reconcile_from: same) is grouped")
        n, c = len(tasks), rs[0].conv.out_channels
        with torch.no_grad():  # group u of each copy: branch u's C channels in, its (T-1) R_{t<-u} out
            self.conv = _grouped_conv([r.conv for r in rs] * copies, inputs=copies * n)
            self.bn = _grouped_bn([r.bn for r in rs] * copies)
        w = self.conv.weight
        # the BN's output channels in target-major order: the blocks (t, u), u != t, of each t of each copy
        blocks = [k * len(pairs) + pairs.index((t, u)) for k in range(copies) for t in tasks for u in tasks if u != t]
        self.register_buffer("order", torch.tensor([b * c + i for b in blocks for i in range(c)], device=w.device),
                             persistent=False)
        self.shape = (copies * n, n - 1, c)

    def forward(self, x: Tensor) -> Tensor:
        r = self.bn(self.conv(x)).index_select(1, self.order)
        b, _, h, w = r.shape
        t, k, c = self.shape
        return x + r.view(b, t, k, c, h, w).sum(2).view(b, t * c, h, w)


class GroupedBranches(nn.Module):
    """An ExpandedNet's branch features, its branches side by side: the features of
    ``ExpandedNet.branch_features`` / ``all_branch_features`` in fewer, wider operators.

    ``features`` takes one batch, or several batches of one shape side by side: each keeps its own
    BatchNorm statistics. Every ``layouts`` entry (one keep per batch: a task, or None for all
    branches) is built once from the frozen net, in its current device and dtypes, and checked
    against it; a layout not built runs its batches one at a time. ``NotGroupable`` where the
    net's layers do not allow grouping, or where grouped features differ from the net's."""

    def __init__(self, net: nn.Module, layouts: list[tuple[str | None, ...]] = (), check_size: int = 64):
        super().__init__()
        from xlearner.models.nets import ExpandedNet

        if type(net) is not ExpandedNet:
            raise NotGroupable(f"{type(net).__name__}: only ExpandedNet's reconciliation is grouped")
        self.tasks = list(net.tasks)
        self.channels = list(net.channels)
        self.last = net.last_shared_stage
        object.__setattr__(self, "net", net)  # not a submodule: the copies below are what is used
        self.shared = nn.ModuleDict()  # str(K): the stages up to the last exchange for K batches
        self.tails = nn.ModuleDict()   # layout: the stages after it
        for layout in {(t,) for t in self.tasks} | {(None,)} | {tuple(lay) for lay in layouts}:
            self._build(layout)
        self.requires_grad_(False)
        for layout in {tuple(lay) for lay in layouts}:
            self._check(layout, check_size)
        self._versions = self._weight_versions()

    def _weight_versions(self) -> list[int]:
        return [t._version for t in (*self.net.parameters(), *self.net.buffers())]

    def stale(self) -> bool:
        """Whether a weight of the net changed in place since the copy (then build a new one: for the
        squeeze teacher, ``SqueezeStage.refresh_teacher()``)."""
        return self._weight_versions() != self._versions

    @staticmethod
    def _name(layout) -> str:
        return ",".join(t or "*" for t in layout)

    def _kept(self, layout) -> list[str]:
        return [u for t in layout for u in (self.tasks if t is None else [t])]

    @torch.no_grad()
    def _build(self, layout: tuple[str | None, ...]) -> None:
        branches = [self.net.backbones[t] for t in self.tasks]
        n, k = len(branches[0].stages), len(layout)
        if str(k) not in self.shared:
            stages = [grouped_copy([b.stages[i] for _ in range(k) for b in branches], inputs=k if i == 0 else None)
                      for i in range(self.last)]
            recs = [GroupedReconciliation(self.net.reconcilers[f"s{s}"], self.tasks, k)
                    if s in self.net.reconcile_after else nn.Identity() for s in range(1, self.last + 1)]
            self.shared[str(k)] = nn.ModuleList(nn.Sequential(a, b) for a, b in zip(stages, recs))
        kept = self._kept(layout)
        if len(kept) == 1:  # one batch, one branch: the net's own modules
            tail = list(self.net.backbones[kept[0]].stages[self.last:])
        else:
            tail = [grouped_copy([self.net.backbones[t].stages[i] for t in kept],
                                 inputs=k if i == 0 and self.last == 0 else None) for i in range(self.last, n)]
        self.tails[self._name(layout)] = nn.ModuleList(tail)

    @torch.no_grad()
    def _check(self, layout, size: int) -> None:
        p = next(self.net.parameters())
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(2, 3, size, size, generator=g).to(p.device) for _ in layout]
        with torch.autocast(p.device.type, dtype=p.dtype, enabled=p.dtype != torch.float32):
            got = self.features(images, list(layout))
            for x, t, out in zip(images, layout, got):
                want = self.net.all_branch_features(x) if t is None else {t: self.net.branch_features(x, t)}
                for u in out:
                    for i, (a, b) in enumerate(zip(want[u], out[u])):
                        err = (a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-6)
                        if not err < (1e-4 if a.dtype == torch.float32 else 5e-2):
                            raise NotGroupable(f"branch {u}, stage {i + 1}: grouped features differ by "
                                               f"{float(err):.2g} (relative to the largest)")

    @torch.no_grad()
    def features(self, images: list[Tensor], keep: list[str | None]) -> list[dict[str, list[Tensor]]]:
        """Features C2..C5 of branch ``keep[k]`` (None: of every branch) for each batch ``images[k]``.
        Batches of one shape whose layout was built run side by side, others one by one."""
        layout = tuple(keep)
        if self._name(layout) not in self.tails or len({x.shape for x in images}) > 1:
            return [self.features([x], [t])[0] for x, t in zip(images, keep)]
        k = len(images)
        outs: list[dict[str, list[Tensor]]] = [{u: [] for u in self._kept([t])} for t in keep]
        x = images[0] if k == 1 else torch.cat(images, dim=1)
        for i, stage in enumerate(self.shared[str(k)] if self.last else ()):
            x = stage(x)
            parts = x.split(self.channels[i], dim=1)  # (batch, branch) side by side
            for j, out in enumerate(outs):
                for u in out:
                    out[u].append(parts[j * len(self.tasks) + self.tasks.index(u)])
        tail = self.tails[self._name(layout)]
        if self.last:
            kept = [parts[j * len(self.tasks) + self.tasks.index(u)] for j, out in enumerate(outs) for u in out]
            x = kept[0] if len(kept) == 1 else (x if len(kept) == len(parts) else torch.cat(kept, dim=1))
        names = [(j, u) for j, out in enumerate(outs) for u in out]
        for i, stage in enumerate(tail, start=self.last):
            x = stage(x)
            for (j, u), part in zip(names, x.split(self.channels[i], dim=1)):
                outs[j][u].append(part)
        return outs
