"""MYOW, "Mine Your Own vieW: Self-Supervised Learning Through Across-Sample Prediction"
(Azabou et al., 2021, arXiv:2102.10106), as one readable file.

BYOL-style learning from two augmented views of a sample, plus a third view that is *mined*: for
each anchor, one of its k nearest neighbours (by cosine) among L candidate samples in the target
network's representation space, predicted through a second, cascaded projector/predictor.

    python myow.py                                            # synthetic reaching, CPU, ~1 min
    python myow.py --dataset chewie1 --data-dir ../shared/data   # monkey reach (Table 3)
    python myow.py --dataset mouse --data-dir ../shared/data     # mouse CA1 arousal state (Fig. 4)
    python myow.py --dataset chewie1 --method byol               # the same code without mining

The last line on stdout is one JSON object with the metrics (in %) and the seconds spent.
Measured results and the map from Algorithm 1 to the functions below are in README.md.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import neural_data

# =============================================================================================
# Configuration
# =============================================================================================


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    dataset: str = arg("synthetic", "synthetic | chewie1 | chewie2 | mihi1 | mouse | npz")
    data_dir: str = arg("data", "folder holding the published files (downloaded there if missing)")
    data_file: str = arg("", "with --dataset npz: your recording (see README)")
    method: str = arg("myow", "myow | byol (the same code with lambda = 0 and no mining) | "
                              "supervised (the encoder trained on the labels, sec. 3.3)")
    seed: int = arg(0, "random seed of initialisation, batches, augmentations and mining")
    out: str = arg("", "folder for config.json, log.jsonl, checkpoint.pt, results.json; empty: none")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")
    overwrite: bool = arg(False, "replace the run already in --out")
    ckpt_every: int = arg(100, "write --out/checkpoint.pt every this many epochs, and at the end")
    # -- optimisation (Appendix D.1 "Training") --
    epochs: int = arg(1000, "training epochs (App. D: 1000)")
    batch_size: int = arg(512, "B, anchors per step (App. D: 512)")
    lr: float = arg(0.02, "eta, AdamW learning rate (App. D: 0.02 monkeys, 0.001 rodents)")
    weight_decay: float = arg(2e-5, "AdamW weight decay (App. D: 2e-5)")
    warmup_epochs: int = arg(100, "linear lr warm-up, then cosine decay to 0 (App. D: 100)")
    tau: float = arg(0.98, "tau, EMA momentum at step 0, cosine-increased to 1 (App. D: 0.98)")
    # -- mining (section 2.2, Appendix B) --
    pool_size: int = arg(1024, "L, candidates drawn per step, shared by all anchors (App. D: 1024)")
    k: int = arg(5, "k, mined view drawn uniformly from the k nearest candidates (App. D: 5)")
    mining_weight: float = arg(1.0, "lambda, weight of the mined-view loss (App. D: 1)")
    mining_ramp_epochs: int = arg(10, "lambda ramps linearly from 0 over this many epochs (App. D: 10)")
    pool: str = arg("fresh", "fresh: L candidates from an independent sampler (App. B); batch: "
                             "the 2B target views of the batch itself, L = 2B, no extra forward")
    anchor_view: str = arg("new", "new: a third view x_m = t_m(s) is the mining anchor (Alg. 1); "
                                  "shared: x serves as x_m (valid when T_m = T), one view less")
    mine_in: str = arg("target", "candidates' representations from the target or online network (App. F)")
    min_gap_s: float = arg(math.inf, "mine only other trials, or the same trial >= this many s away "
                                     "(App. D.2: 1800 s for sleep; inf: other trials only, App. D.1)")
    # -- network (Appendix D.1 "Network Architecture") --
    hidden: int = arg(64, "width of the 4 encoder blocks Linear+BN+ReLU (App. D: 64)")
    rep_dim: int = arg(32, "representation size of y = f(x) (App. D.1: 32 monkeys; D.2: 64 rodents)")
    pred_hidden: int = arg(128, "hidden width of the predictors q and r, MLP(rep, 128, rep) (App. D)")
    # -- augmentations for spiking data (Appendix D.1, J), drawn per sample --
    jitter_s: float = arg(0.2, "temporal jitter: a sample of the same trial within this many s "
                               "(App. D.1: 0.2 s reach; D.2: 12 s sleep)")
    dropout_max: float = arg(0.2, "dropout rate drawn uniformly in [0, this] per sample (App. D.1)")
    noise_std: float = arg(1.5, "std of additive Gaussian noise, Hz (App. D.1: 1.5)")
    noise_p: float = arg(0.5, "probability a sample gets Gaussian noise (App. D.1: 0.5)")
    pepper_value: float = arg(1.5, "pepper: Hz added to a neuron (App. D.1: 1.5)")
    pepper_rate: float = arg(0.3, "pepper: probability per neuron (App. D.1: 0.3)")
    pepper_p: float = arg(0.5, "probability a sample gets pepper (App. D.1: 0.5)")
    # -- linear evaluation (Appendix D.1 "Evaluation Procedure") --
    eval_epochs: int = arg(100, "epochs of the linear readout (App. D: 100)")
    eval_lr: float = arg(0.01, "AdamW lr of the linear readout (App. D: 0.01)")
    eval_batch_size: int = arg(512, "batch of the linear readout (not given in the paper)")
    eval_wd_exponents: str = arg("-10:10", "readout weight decays 2^a..2^b, chosen on validation (App. D)")
    # -- supervised baseline (sec. 3.3: "weight regularization and dropout"; values not given) --
    sup_dropout: float = arg(0.2, "dropout after each encoder block of the supervised baseline")
    sup_weight_decay: float = arg(1e-3, "AdamW weight decay of the supervised baseline")
    # -- run --
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")
    log_every: int = arg(0, "print progress every this many epochs (0: about 20 lines a run)")
    save_embeddings: bool = arg(False, "write --out/embeddings.tsv + metadata.tsv (TensorBoard projector)")


# Per-dataset defaults in one table; a flag given on the command line always wins.
MONKEY = {}                                                       # Appendix D.1 = Config defaults
PRESETS = {
    "synthetic": dict(MONKEY, epochs=300),                        # quick offline default
    "chewie1": MONKEY, "chewie2": MONKEY, "mihi1": MONKEY, "npz": MONKEY,
    "mouse": dict(lr=0.001, rep_dim=64, jitter_s=12.0, min_gap_s=1800.0),   # Appendix D.2
}


class ConfigError(Exception):
    """A configuration the run cannot honour: the message names the flag and what to do."""


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=None,
                                help=f"{help} [{f.default}, or the dataset's preset]")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    dataset = given.get("dataset", Config.dataset)
    if dataset not in PRESETS:
        raise ConfigError(f"unknown --dataset {dataset!r}; choose one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[dataset], **given})


# =============================================================================================
# Data and augmentations for neural activity (Appendix D.1, J)
# =============================================================================================


class NeuralSplit:
    """One split of a recording as tensors on the device, so batches are indexed, not loaded."""

    def __init__(self, rec, idx, keep, mean, std, cfg, device):
        self.x = torch.as_tensor(rec.rates[idx][:, keep], device=device)          # (N, D) Hz
        self.mean, self.std = mean.to(device), std.to(device)                   # (D,) train stats
        self.trial = torch.as_tensor(rec.trial[idx], device=device)             # (N,)
        self.time = torch.as_tensor(rec.time[idx], dtype=torch.float32, device=device)  # (N,) s
        self.labels = None if rec.labels is None else torch.as_tensor(rec.labels[idx], device=device)
        self.task = rec.task
        lo, hi = neural_data.jitter_bounds(rec.trial[idx], rec.time[idx], cfg.jitter_s)
        self.jitter_lo = torch.as_tensor(lo, device=device)
        self.jitter_n = torch.as_tensor(hi - lo + 1, device=device)          # samples in window

    def __len__(self):
        return len(self.x)

    def normalized(self):
        return (self.x - self.mean) / self.std


def augment_neural(data, idx, cfg):
    """One view t(s) per index, every random choice drawn per sample (Appendix D.1, J):
    temporal jitter -> randomized dropout -> Gaussian noise -> pepper -> normalization."""
    n, D = len(idx), data.x.shape[1]
    dev = data.x.device
    j = data.jitter_lo[idx] + (torch.rand(n, device=dev) * data.jitter_n[idx]).long()
    x = data.x[j]                                                                 # (n, D) Hz
    p_drop = torch.rand(n, 1, device=dev) * cfg.dropout_max                      # rate per sample
    x.mul_(torch.rand(n, D, device=dev) >= p_drop)
    noisy = torch.nonzero(torch.rand(n, device=dev) < cfg.noise_p)[:, 0]         # rows with noise
    x.index_add_(0, noisy, torch.randn(len(noisy), D, device=dev), alpha=cfg.noise_std)
    pep = torch.nonzero(torch.rand(n, device=dev) < cfg.pepper_p)[:, 0]          # rows with pepper
    x.index_add_(0, pep, (torch.rand(len(pep), D, device=dev) < cfg.pepper_rate).float(),
                 alpha=cfg.pepper_value)
    return x.sub_(data.mean).div_(data.std)


def load_neural(cfg, device):
    rec = neural_data.load_recording(cfg.dataset, cfg.data_dir, cfg.data_file)
    if not np.isfinite(rec.rates).all():
        bad = np.argwhere(~np.isfinite(rec.rates))[0]
        raise neural_data.DataError(f"{rec.name}: firing rate at bin {bad[0]}, neuron {bad[1]} is "
                                    f"{rec.rates[tuple(bad)]}; remove or interpolate non-finite values")
    if rec.labels is not None and (rec.labels.min() < 0 or (rec.task == "reach" and rec.labels.max() > 7)):
        bad = rec.labels[(rec.labels < 0) | ((rec.labels > 7) & (rec.task == "reach"))][0]
        raise neural_data.DataError(f"{rec.name}: label {bad} is out of range; labels must be integer "
                                    f"classes 0, 1, 2, ... (reach directions 0..7)")
    splits = neural_data.temporal_split(rec.trial)
    train = rec.rates[splits[0]]
    std = train.std(0)
    keep = std > 0          # neurons silent throughout training carry nothing (data README)
    mean = torch.as_tensor(train.mean(0)[keep])
    std = torch.as_tensor(std[keep])
    return rec, [NeuralSplit(rec, i, keep, mean, std, cfg, device) for i in splits], splits


# =============================================================================================
# Networks: encoder f, projectors g and h, predictors q and r
# =============================================================================================


def mlp(i, h, o):
    """MLP(i, h, o) of Appendix C: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))


def neural_encoder(n_in, hidden, rep_dim, blocks=4, dropout=0.0):
    """Appendix D.1: 4 blocks of Linear(hidden)+BN+ReLU, then a linear layer to the representation.
    dropout > 0 only for the supervised baseline (sec. 3.3)."""
    layers, width = [], n_in
    for _ in range(blocks):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, rep_dim))


class Network(nn.Module):
    """The part with a target copy: encoder f, projector g, second projector h (cascaded after g).
    For neural data the paper uses no projectors (App. D.1): g and h are identities."""

    def __init__(self, f, g, h):
        super().__init__()
        self.f, self.g, self.h = f, g, h


class MYOW(nn.Module):
    """Online network theta = (f, g, h) and the dual predictors q (augmented) and r (mined).
    One forward over all online views, so it is a single call for DistributedDataParallel."""

    def __init__(self, net, q, r):
        super().__init__()
        self.net, self.q, self.r = net, q, r

    def forward(self, x, n_aug, anchors=None):
        """x: online views [x, x', (x_m)]; the first n_aug rows are augmented views and the rows
        `anchors` (a slice) are the mining anchors; anchors=None: BYOL, no mining branch."""
        y = self.net.f(x)                                     # (2B [+ B], D) representations
        z = self.net.g(y)                                     # (2B [+ B], Dz) projections
        p = self.q(z[:n_aug])                                 # (2B, Dz) q(z), q(u')
        if anchors is None:
            return y, p, None
        v = self.net.h(z[anchors])                            # (B, Dv) v = h(g(y_m))
        return y, p, self.r(v)                                # r(v)


def build_networks(cfg, n_in):
    """Online model (theta plus predictors) and the target network xi, an exact copy at start."""
    f = neural_encoder(n_in, cfg.hidden, cfg.rep_dim)
    net = Network(f, nn.Identity(), nn.Identity())
    q = mlp(cfg.rep_dim, cfg.pred_hidden, cfg.rep_dim)
    r = mlp(cfg.rep_dim, cfg.pred_hidden, cfg.rep_dim)
    return MYOW(net, q, r), copy.deepcopy(net).requires_grad_(False)        # init xi <- theta


# =============================================================================================
# The method: loss, mining, target update, schedules
# =============================================================================================


def d(p, z):
    """Equation (1): negative cosine similarity, per sample. z comes from the target (no grad)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1)


def mine(y_anchor, y_pool, allowed, k):
    """Section 2.2 / Algorithm 1 'Find N_k(y_m) in S, randomly select y'_m': for each anchor, the
    k candidates of highest cosine similarity among those `allowed`, and one of them uniformly.
    y_anchor (B, D), y_pool (L, D), allowed (B, L) bool. Returns the chosen pool index (B,) and
    whether the anchor had any allowed candidate (B,); an anchor with fewer than k allowed
    candidates chooses among those it has, and one with none gets no mined view."""
    sim = F.normalize(y_anchor.float(), dim=1) @ F.normalize(y_pool.float(), dim=1).T   # (B, L)
    sim = sim.masked_fill(~allowed, -math.inf)
    top_sim, top_idx = sim.topk(k, dim=1)                                           # (B, k)
    eligible = top_sim > -math.inf
    pick = torch.rand(eligible.shape, device=sim.device).masked_fill(~eligible, -1).argmax(1)
    return top_idx.gather(1, pick[:, None])[:, 0], eligible.any(1)


def ema_tensors(net):
    """The tensors eq. (2) averages: parameters and BatchNorm statistics."""
    return [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]


@torch.no_grad()
def update_target(xi, theta, tau):
    """Equation (2): xi <- tau * xi + (1 - tau) * theta, one foreach lerp over all tensors."""
    torch._foreach_lerp_(xi, theta, 1.0 - tau)


def lr_at(step, total, warmup, base):
    """Linear warm-up to `base`, then cosine decay to 0 (App. C, D)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def tau_at(step, total, tau_base):
    """tau from tau_base (step 0) to 1 (last step) along a cosine (BYOL, App. C, D)."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total) + 1) / 2


def lambda_at(step, ramp, weight):
    """lambda ramped linearly from 0 to `weight` over `ramp` steps (section 2.1)."""
    return weight * min(1.0, step / ramp) if ramp > 0 else weight


# =============================================================================================
# Linear evaluation (Appendix D): all weight decays of the sweep trained at once
# =============================================================================================


def angle_error(pred, labels):
    """|angle(pred) - angle of direction l|, wrapped to [0, pi]; pred (..., n, 2) = (cos, sin)."""
    angle = torch.atan2(pred[..., 1], pred[..., 0])
    diff = torch.remainder(angle - labels * (2 * math.pi / 8) + math.pi, 2 * math.pi) - math.pi
    return diff.abs()


def weighted_f1(pred, labels, n_classes):
    """Per-class F1 weighted by class support (sklearn's 'weighted'); pred (S, n) -> (S,)."""
    f1 = 0
    for c in range(n_classes):
        tp = ((pred == c) & (labels == c)).sum(-1).float()
        fp = ((pred == c) & (labels != c)).sum(-1).float()
        fn = ((pred != c) & (labels == c)).sum(-1).float()
        f1 = f1 + (labels == c).float().mean() * 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return f1


def class_weights(labels, n_classes):
    """Class-balanced training of the state readout: weight n / (C n_c) for class c."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


def decoding_loss(out, labels, task, class_w=None):
    """Reach: MSE to (cos, sin) of the direction (App. D.1); states: class-weighted mean
    cross-entropy. out (..., n, O) -> one loss per readout (...)."""
    if task == "reach":
        angle = labels * (math.pi / 4)
        return ((out - torch.stack([torch.cos(angle), torch.sin(angle)], -1)) ** 2).mean((-2, -1))
    ce = F.cross_entropy(out.flatten(0, -2), labels.expand(out.shape[:-1]).flatten(), class_w,
                         reduction="none")
    return ce.view(out.shape[:-1]).sum(-1) / class_w[labels].sum()


def scores(out, labels, task, n_classes):
    """Metrics in % for each of the S readouts: out (S, n, O)."""
    if task == "reach":
        err = angle_error(out, labels)
        return {"acc": 100 * (err < math.pi / 8).float().mean(-1),           # nearest direction
                "delta_acc": 100 * (err < 3 * math.pi / 16).float().mean(-1)}  # App. D, Fig. S2
    pred = out.argmax(-1)
    return {"f1": 100 * weighted_f1(pred, labels, n_classes), "acc": 100 * (pred == labels).float().mean(-1)}


def linear_eval(feats, labels, task, cfg):
    """Train one linear readout per weight decay 2^a (a in the sweep) on frozen train features,
    pick the best on validation, report it on test. Reach: (cos, sin) of the direction with MSE;
    states: class-balanced cross-entropy. feats/labels: [train, val, test] tensors."""
    a, b = (int(v) for v in cfg.eval_wd_exponents.split(":"))
    wd = 2.0 ** torch.arange(a, b + 1, dtype=torch.float32, device=feats[0].device)    # (S,)
    S, D = len(wd), feats[0].shape[1]
    n_classes = 8 if task == "reach" else int(max(l.max() for l in labels)) + 1
    O = 2 if task == "reach" else n_classes
    g = torch.Generator(device=feats[0].device).manual_seed(cfg.seed)
    bound = 1 / math.sqrt(D)                                       # nn.Linear's initialisation
    W = ((torch.rand(D, O, generator=g, device=wd.device) * 2 - 1) * bound).repeat(S, 1, 1)
    bias = torch.zeros(S, 1, O, device=wd.device)
    W.requires_grad_(), bias.requires_grad_()
    opt = torch.optim.Adam([W, bias], lr=cfg.eval_lr)
    X, Y = feats[0], labels[0]
    class_w = class_weights(Y, n_classes)
    for _ in range(cfg.eval_epochs):
        for i in torch.randperm(len(X), generator=g, device=X.device).split(cfg.eval_batch_size):
            out = X[i] @ W + bias                                  # (S, b, O)
            loss = decoding_loss(out, Y[i], task, class_w).sum()   # readouts are independent
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():                                  # AdamW: decoupled decay first
                W.mul_(1 - cfg.eval_lr * wd[:, None, None])
                bias.mul_(1 - cfg.eval_lr * wd[:, None, None])
            opt.step()
    with torch.no_grad():
        val = scores(feats[1] @ W + bias, labels[1], task, n_classes)
        test = scores(feats[2] @ W + bias, labels[2], task, n_classes)
    key = "acc" if task == "reach" else "f1"
    best = int(torch.nan_to_num(val[key], nan=-1).argmax())
    res = {f"test_{m}": round(float(v[best]), 2) for m, v in test.items()}
    res.update({f"val_{m}": round(float(v[best]), 2) for m, v in val.items()})
    res["eval_weight_decay"] = float(wd[best])
    return res


@torch.no_grad()
def representations(f, splits):
    f.eval()
    feats = [f(s.normalized()).float() for s in splits]
    f.train()
    return feats


# =============================================================================================
# Distributed training hooks (torchrun) and checkpoints
# =============================================================================================


def setup_distributed(cfg):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_gather(t):
    """Concatenate a tensor from all ranks, in rank order (the global mining pool, sec. 2.3)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


RUN_FIELDS = {"out", "resume", "overwrite", "device", "log_every", "ckpt_every", "data_dir"}


def rng_states(index_gen):
    states = {"torch": torch.get_rng_state(), "index": index_gen.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if dist.is_initialized():                     # every rank has its own augmentation stream
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states)
        return gathered
    return [states]


def save_checkpoint(path, state):
    """Atomic: write a temporary file, flush it to disk, rename. A kill at any moment leaves the
    previous checkpoint readable."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}), perhaps truncated; "
                          f"delete it and start again with --overwrite") from None
    now = dataclasses.asdict(cfg)
    differ = [k for k, v in state["config"].items() if k not in RUN_FIELDS and now.get(k) != v]
    if differ:
        k = differ[0]
        raise ConfigError(f"checkpoint {path} was written with --{k.replace('_', '-')} "
                          f"{state['config'][k]}, this run has {now.get(k)} ({len(differ)} field(s) differ: "
                          f"{', '.join(differ)}); resume with the same settings or use another --out")
    return state


# =============================================================================================
# Training loop (Algorithm 1)
# =============================================================================================


def check_config(cfg, data, world):
    if cfg.method not in ("myow", "byol", "supervised"):
        raise ConfigError(f"--method {cfg.method!r} is not known; choose myow, byol or supervised")
    if cfg.method == "supervised" and (data.labels is None or world > 1 or cfg.resume):
        raise ConfigError("--method supervised needs labels, one process and no --resume")
    if cfg.save_embeddings and not cfg.out:
        raise ConfigError("--save-embeddings writes into --out DIR; give one")
    if cfg.batch_size > len(data):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} training "
                          f"samples of {cfg.dataset}; use --batch-size {len(data)} or less")
    if cfg.batch_size % world or cfg.pool_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} and --pool-size {cfg.pool_size} are global "
                          f"and must divide by the {world} processes")
    for name in ("noise_p", "pepper_p", "pepper_rate", "dropout_max"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}; a probability "
                              f"must lie in [0, 1]")
    for name, choices in (("pool", ("fresh", "batch")), ("mine_in", ("target", "online")),
                          ("anchor_view", ("new", "shared"))):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose {' or '.join(choices)}")
    if cfg.method == "myow":
        L = cfg.pool_size if cfg.pool == "fresh" else 2 * cfg.batch_size
        # candidates each anchor may ever mine among the training samples, by the mask (App. B)
        eligible = torch.cat([neural_data.mining_mask(data.trial[i], data.time[i], data.trial,
                                                      data.time, cfg.min_gap_s).sum(1)
                              for i in torch.arange(len(data)).split(1024)])
        typical = int(eligible.median())
        if not 1 <= cfg.k <= min(L, typical):
            raise ConfigError(f"--k {cfg.k} is larger than the eligible pool: L = {L} candidates, and "
                              f"the mask (--min-gap-s {cfg.min_gap_s}) leaves a typical anchor {typical} "
                              f"of the {len(data)} training samples; lower --k or --min-gap-s")


def train(cfg, splits, device, log, rank=0, world=1, state=None):
    """Algorithm 1. Returns the online model and the last epoch's log record."""
    data = splits[0]
    torch.manual_seed(cfg.seed)                                   # same initial theta everywhere
    model, target = (m.to(device) for m in build_networks(cfg, data.x.shape[1]))
    if world > 1:
        if device.type == "cuda":                 # BatchNorm over the global batch (GPU only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    online = ddp if world > 1 else model
    xi, theta = ema_tensors(target), ema_tensors(model.net)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    N, B, L = len(data), cfg.batch_size, cfg.pool_size
    b, l = B // world, L // world                               # this rank's share
    mining = cfg.method == "myow"
    steps_per_epoch = N // B                                               # full batches only
    total = cfg.epochs * steps_per_epoch
    log_every = cfg.log_every or max(1, cfg.epochs // 20)
    index_gen = torch.Generator().manual_seed(cfg.seed)        # batches and pools: same on all ranks
    torch.manual_seed(cfg.seed + rank)                          # augmentations: one stream per rank
    start, last = 0, None
    if state is not None:                                       # --resume
        model.load_state_dict(state["model"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])
        start, last = state["epoch"], state["last"]
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        index_gen.set_state(rng["index"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    ckpt = os.path.join(cfg.out, "checkpoint.pt") if cfg.out else None
    stop = {"interrupted": False}

    def on_ctrl_c(*_):                          # first Ctrl-C: finish the epoch, save, exit
        if stop["interrupted"]:
            raise KeyboardInterrupt("interrupted twice; no checkpoint written for this epoch")
        stop["interrupted"] = True
    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    t0, step = time.time(), start * steps_per_epoch
    for epoch in range(start, cfg.epochs):
        stats = torch.zeros(5, device=device)     # loss, aug loss, mined loss, same-label, mined
        first_bad = torch.full((3,), -1.0, device=device)      # step, loss terms of a non-finite loss
        perm = torch.randperm(N, generator=index_gen).to(device)
        for it in range(steps_per_epoch):
            lr = lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            tau = tau_at(step, total, cfg.tau)
            lam = lambda_at(step, cfg.mining_ramp_epochs * steps_per_epoch, cfg.mining_weight)
            for group in opt.param_groups:
                group["lr"] = lr
            s = perm[it * B + rank * b:it * B + (rank + 1) * b]          # (b,) this rank's anchors
            if not mining:
                c = s[:0]
            elif cfg.pool == "fresh":   # an independent stream of permutations (App. B); L may exceed N
                pool = torch.cat([torch.randperm(N, generator=index_gen) for _ in range(-(-L // N))])
                c = pool[rank * l:(rank + 1) * l].to(device)
            else:                       # the batch's own target views x, x' are the candidates
                c = torch.cat([s, s])
            # Views: x = t(s), x' = t'(s), x_m = t_m(s), x_c = t_m(c); here T_m = T (App. D.1).
            fresh = c if cfg.pool == "fresh" else c[:0]
            third = mining and cfg.anchor_view == "new"         # else x doubles as x_m (T_m = T)
            views = augment_neural(data, torch.cat([s, s, s[:b if third else 0], fresh]), cfg)
            n_online = 3 * b if third else 2 * b
            x, x2, x_m, x_c = views[:b], views[b:2 * b], views[2 * b:n_online], views[n_online:]
            anchors = (slice(2 * b, 3 * b) if third else slice(0, b)) if mining else None
            with autocast:
                with torch.no_grad():                                      # target network xi
                    y_t = target.f(torch.cat([x, x2, x_c]))                # (2b + l, D)
                    z_t = target.g(y_t)
                    u, z2 = z_t[:b], z_t[b:2 * b]                          # u = g(f(x)), z' = g(f(x'))
                    first = 2 * b if cfg.pool == "fresh" else 0           # where the pool starts
                y, p, r_v = online(torch.cat([x, x2, x_m]), 2 * b, anchors)
                loss_aug = (d(p[:b], z2) + d(p[b:], u)).mean()             # d(q(z), z') + d(q(u'), u)
                loss_mine = torch.zeros((), device=device)
                if mining:
                    with torch.no_grad():
                        if cfg.mine_in == "target":
                            y_pool = y_t[first:]                           # (l, D) f_xi(x_c)
                        else:                                              # App. F: online space
                            y_pool = model.net.f(x_c) if cfg.pool == "fresh" else y[:2 * b]
                        c_all = all_gather(c)                              # (L,) global pool
                        y_pool = all_gather(y_pool)                        # (L, D)
                        v_pool = all_gather(target.h(z_t[first:]))         # (L, Dv) h(g(y'_c))
                        allowed = neural_data.mining_mask(data.trial[s], data.time[s], data.trial[c_all],
                                                          data.time[c_all], cfg.min_gap_s)   # (b, L)
                        j, has = mine(y[anchors], y_pool, allowed, cfg.k)
                    loss_mine = (d(r_v, v_pool[j]) * has).sum() / has.sum().clamp(min=1)
                    if data.labels is not None:
                        stats[3] += (data.labels[s] == data.labels[c_all[j]])[has].sum()
                    stats[4] += has.sum()
                loss = loss_aug + lam * loss_mine
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_target(xi, theta, tau)
            terms = torch.stack([loss.detach(), loss_aug.detach(), loss_mine.detach()])
            stats[:3] += terms
            bad = ~torch.isfinite(terms).all() & (first_bad[0] < 0)
            first_bad = torch.where(bad, torch.cat([torch.tensor([float(step)], device=device), terms[1:]]), first_bad)
            step += 1
        flags = torch.tensor([float(stop["interrupted"]), float(first_bad[0] >= 0)], device=device)
        if world > 1:                             # every rank stops together; logs cover all ranks
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            dist.all_reduce(stats)
            stats[:3] /= world
        if flags[1]:
            raise FloatingPointError(f"non-finite loss at step {int(first_bad[0])} (epoch {epoch + 1}): "
                                     f"augmented-view loss {first_bad[1]:.4g}, mined-view loss "
                                     f"{first_bad[2]:.4g}; lower --lr. The last good checkpoint is kept.")
        st = (stats / steps_per_epoch).tolist()
        last = {"epoch": epoch + 1, "loss": st[0], "loss_aug": st[1], "loss_mined": st[2] if mining else None,
                "lr": lr, "tau": tau, "lambda": lam,
                "mining_class_acc": 100 * stats[3].item() / max(1, stats[4].item()) if mining else None}
        done = epoch + 1 - start
        if rank == 0:
            log(last, print_line=(epoch + 1) % log_every == 0 or epoch + 1 == cfg.epochs,
                rate=done * steps_per_epoch * B / (time.time() - t0),
                eta=(time.time() - t0) / done * (cfg.epochs - epoch - 1))
        if ckpt and (flags[0] or (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs):
            state = {"model": model.state_dict(), "target": target.state_dict(), "opt": opt.state_dict(),
                     "epoch": epoch + 1, "last": last, "rng": rng_states(index_gen),
                     "config": dataclasses.asdict(cfg)}
            if rank == 0:
                save_checkpoint(ckpt, state)
        if flags[0]:
            raise KeyboardInterrupt(f"interrupted after epoch {epoch + 1}"
                                    + (f"; checkpoint written, continue with --resume --out {cfg.out}" if ckpt else ""))
    signal.signal(signal.SIGINT, previous_handler)
    return model, last


def train_supervised(cfg, splits, device, log):
    """The supervised baseline of Table 3: the same encoder with dropout after every block and
    weight decay, trained end to end on the labels through a linear head, on unaugmented data
    with the same optimiser and schedule. Returns the encoder f."""
    data, task = splits[0], splits[0].task
    torch.manual_seed(cfg.seed)
    n_out = 2 if task == "reach" else int(data.labels.max()) + 1
    f = neural_encoder(data.x.shape[1], cfg.hidden, cfg.rep_dim, dropout=cfg.sup_dropout).to(device)
    head = nn.Linear(cfg.rep_dim, n_out).to(device)
    params = list(f.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.sup_weight_decay)
    X, Y = data.normalized(), data.labels
    class_w = class_weights(Y, n_out) if task != "reach" else None
    N, B = len(X), cfg.batch_size
    steps_per_epoch, t0 = N // B, time.time()
    total = cfg.epochs * steps_per_epoch
    for epoch in range(cfg.epochs):
        loss_sum = torch.zeros((), device=device)
        for it, s in enumerate(torch.randperm(N, device=device)[:steps_per_epoch * B].split(B)):
            step = epoch * steps_per_epoch + it
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            loss = decoding_loss(head(f(X[s])), Y[s], task, class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        last = {"epoch": epoch + 1, "loss": loss_sum.item() / steps_per_epoch, "lr": opt.param_groups[0]["lr"]}
        if (epoch + 1) % (cfg.log_every or max(1, cfg.epochs // 20)) == 0:
            print(f"epoch {epoch + 1:4d}/{cfg.epochs} | supervised loss {last['loss']:.4f} | lr {last['lr']:.2e}"
                  f" | {(epoch + 1) * steps_per_epoch * B / (time.time() - t0):,.0f} samples/s", flush=True)
    return f


def save_embeddings(out, f, splits, rec, split_idx):
    """The representation of every bin with its labels, in the two tab-separated files the
    TensorBoard embedding projector (projector.tensorflow.org) loads."""
    feats = torch.cat(representations(f, splits)).cpu().numpy()          # (T, D) in split order
    order = np.concatenate(split_idx)                                    # recording index of each row
    names = ["train", "val", "test"]
    with open(os.path.join(out, "embeddings.tsv"), "w") as fh:
        fh.writelines("\t".join(f"{v:.5g}" for v in row) + "\n" for row in feats)
    label = {"reach": "direction", "state": "state"}.get(rec.task, "label")
    with open(os.path.join(out, "metadata.tsv"), "w") as fh:
        fh.write(f"split\ttrial\ttime_s\t{label}\n")
        for k, i in enumerate(order):
            split = names[int(np.searchsorted(np.cumsum([len(s) for s in split_idx]), k, side="right"))]
            lab = "" if rec.labels is None else int(rec.labels[i])
            fh.write(f"{split}\t{int(rec.trial[i])}\t{rec.time[i]:.2f}\t{lab}\n")


# =============================================================================================
# Entry point
# =============================================================================================


def make_logger(cfg):
    path = os.path.join(cfg.out, "log.jsonl") if cfg.out else None

    def log(rec, print_line, rate, eta):
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if print_line:
            mined = (f" mined {rec['loss_mined']:.3f} | class-acc {rec['mining_class_acc']:.1f}%"
                     if rec["mining_class_acc"] is not None else "")
            print(f"epoch {rec['epoch']:4d}/{cfg.epochs} | loss {rec['loss']:.3f} (aug {rec['loss_aug']:.3f}"
                  f"{mined}) | lr {rec['lr']:.2e} tau {rec['tau']:.4f} lambda {rec['lambda']:.2f} | "
                  f"{rate:,.0f} samples/s | ETA {eta:.0f}s", flush=True)
    return log


OUT_FILES = ("config.json", "log.jsonl", "results.json", "checkpoint.pt")


def prepare_out(cfg, rank):
    """Never overwrite a run silently: continue it (--resume) or replace it (--overwrite)."""
    if not cfg.out:
        if cfg.resume:
            raise ConfigError("--resume needs --out DIR, the folder of the run to continue")
        return None
    state = load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), cfg) if cfg.resume else None
    ours = [f for f in OUT_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if ours and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"--out {cfg.out} already holds a run ({', '.join(ours)}); continue it with "
                          f"--resume or replace it with --overwrite")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite and not cfg.resume:
            for f in ours:
                os.remove(os.path.join(cfg.out, f))
        log = os.path.join(cfg.out, "log.jsonl")
        if state and os.path.exists(log):          # drop epochs logged after the checkpoint
            keep = [l for l in open(log) if l.strip() and json.loads(l)["epoch"] <= state["epoch"]]
            with open(log + ".tmp", "w") as fh:
                fh.writelines(keep)
            os.replace(log + ".tmp", log)
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh, indent=1)
    return state


def run(cfg):
    t_start = time.time()
    rank, world, device = setup_distributed(cfg)
    rec, splits, split_idx = load_neural(cfg, device)
    check_config(cfg, splits[0], world)
    state = prepare_out(cfg, rank)
    if rank == 0:
        print(f"{rec.name}: {len(rec.rates)} bins x {splits[0].x.shape[1]} neurons, splits "
              f"{[len(s) for s in splits]}, {cfg.method} on {world} x {device}", flush=True)
    t0 = time.time()
    if cfg.method == "supervised":
        f, last = train_supervised(cfg, splits, device, make_logger(cfg)), {"mining_class_acc": None}
    else:
        model, last = train(cfg, splits, device, make_logger(cfg), rank, world, state)
        f = model.net.f
    train_seconds = time.time() - t0
    if rank != 0:
        return None
    t0 = time.time()
    feats = representations(f, splits)
    labels = [s.labels for s in splits]
    metrics = linear_eval(feats, labels, rec.task, cfg) if rec.labels is not None else {}
    result = {"dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "epochs": cfg.epochs,
              **metrics, "mining_class_acc": last["mining_class_acc"], "world_size": world,
              "train_seconds": round(train_seconds, 2), "eval_seconds": round(time.time() - t0, 2),
              "total_seconds": round(time.time() - t_start, 2)}
    if cfg.out:
        with open(os.path.join(cfg.out, "results.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        if cfg.save_embeddings:
            save_embeddings(cfg.out, f, splits, rec, split_idx)
    print(json.dumps(result), flush=True)
    return result


def main(argv=None):
    try:
        run(parse_config(argv))
    except (ConfigError, neural_data.DataError, FloatingPointError, KeyboardInterrupt) as e:
        sys.exit(f"error: {e}" if not isinstance(e, KeyboardInterrupt) else f"stopped: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
