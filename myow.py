"""MYOW, "Mine Your Own vieW: Self-Supervised Learning Through Across-Sample Prediction"
(Azabou et al., 2021, arXiv:2102.10106): BYOL's two augmented views of a sample, plus a third view
*mined* among other samples (one of the k nearest in the target network's representation space),
predicted through a second, cascaded projector and predictor. The method comes first and runs alone;
the plumbing that makes it a tool follows one banner below it.

    python myow.py                                              # synthetic reaching, CPU: 10 s
    python myow.py --dataset chewie1 --data-dir ../shared/data  # monkey reach (Table 3), CPU: 15 s
    python myow.py --dataset npz --data-file rec.npz            # your recording (README)
    python myow.py --dataset cifar10 --epochs 800 --download    # Table 1, Appendix C, one GPU
    torchrun --nproc_per_node 4 myow.py --dataset cifar10       # one process a GPU; B and L are global
"""
import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import neural_data

# ==== Configuration: every setting, where its default comes from, and what it may be ===============
def arg(default, help, check):
    """A field: its default where the data set's preset gives none, its --help, and what a value may be:
    a tuple of choices, a rule in words (checked below the banner), or FREE (switches, and paths)."""
    return field(default=None, metadata={"default": default, "help": help, "check": check})

FREE = None
INT1, INT0, POS, NONNEG = "an integer >= 1", "an integer >= 0", "a finite number > 0", "a finite number >= 0"
PROB, BELOW1, AREA = "a probability in [0, 1]", "in [0, 1)", "'lo:hi' with 0 < lo <= hi <= 1"

@dataclass
class Config:
    method: str = arg("myow", "myow | byol (lambda = 0, no mining) | supervised (sec. 3.3) | raw (the floor)",
                      ("myow", "byol", "supervised", "raw"))
    # -- optimisation (Appendix D.1 "Training"; Appendix C for images) --
    epochs: int = arg(1000, "training epochs (App. D: 1000); neural: at most 20,000 steps (README)", INT1)
    steps: int = arg(0, "training steps in all, instead of --epochs; 0: --epochs", INT0)
    batch_size: int = arg(512, "B, anchors per step (App. D: 512)", "an integer >= 2 (for BatchNorm)")
    optimizer: str = arg("adamw", "adamw (App. D, neural) or sgd (App. C, images)", ("adamw", "sgd"))
    lr: float = arg(0.02, "eta (App. D: AdamW 0.02 monkeys, 0.001 rodents; App. C: SGD 0.03)", POS)
    momentum: float = arg(0.9, "SGD momentum (App. C: 0.9)", BELOW1)
    weight_decay: float = arg(2e-5, "weight decay (App. D: 2e-5; App. C: 5e-4)", NONNEG)
    warmup_epochs: int = arg(100, "linear lr warm-up, then cosine decay to 0 (App. D: 100)", INT0)
    tau: float = arg(0.98, "tau, EMA momentum at step 0 (App. D: 0.98)", "in [0, 1]")
    tau_schedule: str = arg("cosine", "cosine: tau up to 1 (App. C, D); constant (authors' neural code)",
                            ("cosine", "constant"))
    # -- mining (section 2.2, Appendix B) --
    pool_size: int = arg(1024, "L with --pool fresh: candidates drawn per step (App. D: 1024)", INT1)
    k: int = arg(5, "k, mined view drawn uniformly from the k nearest candidates (App. D: 5)", INT1)
    mining_weight: float = arg(1.0, "lambda, weight of the mined-view loss (App. D: 1)", NONNEG)
    mining_ramp_epochs: int = arg(10, "lambda ramps linearly from 0 over this many epochs (App. D: 10)", INT0)
    pool: str = arg("batch", "batch: L = B, the batch's views x' (sec. 2.2); fresh: L new samples (App. B)",
                    ("batch", "fresh"))
    anchor_view: str = arg("shared", "shared: x is the anchor (T_m = T, App. D.1); new: x_m = t_m(s), Alg. 1",
                           ("shared", "new"))
    mine_in: str = arg("target", "candidates' representations from the target or online network (App. F)",
                       ("target", "online"))
    min_gap_s: float = arg(math.inf, "mine other trials, or the same trial >= this many s away (App. B); "
                           "inf: other trials, or 1/24 of a recording split in time", "seconds >= 0, or inf")
    # -- network (Appendix D.1 "Network Architecture", Appendix C "Architecture") --
    arch: str = arg("mlp", "encoder f: mlp (App. D.1), resnet18 / resnet50 (App. C), convnet (small, CPU)",
                    ("mlp", "convnet", "resnet18", "resnet50"))
    hidden: int = arg(64, "mlp: width of its 4 blocks (App. D: 64); convnet: of its first block", INT1)
    rep_dim: int = arg(32, "mlp: size of y = f(x) (App. D.1: 32 monkeys; D.2: 64 rodents)", INT1)
    proj_hidden: int = arg(0, "hidden width of g and h, MLP(., 4096, 256) (App. C); 0: none (App. D.1)", INT0)
    proj_dim: int = arg(256, "output size of g and h (App. C: 256)", INT1)
    pred_hidden: int = arg(128, "hidden width of q and r (App. D: MLP(32, 128, 32); App. C: 4096)", INT1)
    layout: str = arg("cascaded", "v = h(g(y)) cascaded (sec. 2.1), h(y) parallel, g(y) single (App. G)",
                      ("cascaded", "parallel", "single"))
    context_s: float = arg(0.1, "mlp: x is the bin and those before it within this many s (App. D: one bin "
                           "of 0.1 s; finer bins: a window, README)", NONNEG)
    # -- augmentations for spiking data (Appendix D.1, J), drawn per sample --
    jitter_s: float = arg(0.2, "temporal jitter: x' is a bin of the anchor's trial within this many s (App. "
                          "D.1: 0.2 s reach; D.2: 12 s sleep)", NONNEG)
    dropout_max: float = arg(0.2, "dropout rate drawn uniformly in [0, this] per sample (App. D.1)", PROB)
    noise_std: float = arg(1.5, "std of additive Gaussian noise, Hz (App. D.1: 1.5)", NONNEG)
    noise_p: float = arg(0.5, "probability a sample gets Gaussian noise (App. D.1: 0.5)", PROB)
    pepper_value: float = arg(1.5, "pepper: Hz added to a neuron (App. D.1: 1.5)", NONNEG)
    pepper_rate: float = arg(0.3, "pepper: probability per neuron (App. D.1: 0.3)", PROB)
    pepper_p: float = arg(0.5, "probability a sample gets pepper (App. D.1: 0.5)", PROB)
    # -- augmentations for images (Appendix C "Class of transformations"), drawn per sample --
    image_size: int = arg(32, "views are resized (bicubic) to this size (App. C: 32)", "an integer >= 8")
    crop_area: str = arg("0.2:1.0", "T: random resized crop, area range (App. C: 0.2-1.0)", AREA)
    mined_crop_area: str = arg("0.8:1.0", "T_m: crop only, area range (App. C: 0.8-1.0)", AREA)
    color_jitter: str = arg("0.4,0.4,0.4,0.1", "brightness, contrast, saturation, hue (App. C)",
                            "four numbers 'b,c,s,h', each >= 0, hue h <= 0.5")
    color_p: float = arg(0.8, "probability of color jitter (App. C: 0.8)", PROB)
    gray_p: float = arg(0.1, "probability of grayscale (App. C: 0.1)", PROB)
    flip_p: float = arg(0.5, "probability of a horizontal flip in T (App. C: 0.5; T_m has none)", PROB)
    # -- linear evaluation (Appendix D.1 "Evaluation Procedure", Appendix C "Evaluation Protocol") --
    eval_epochs: int = arg(100, "epochs of the linear readout (App. D: 100; App. C: 200)", INT1)
    eval_lr: float = arg(0.01, "lr of the linear readout (App. D: AdamW 0.01; App. C: SGD 0.4)", POS)
    eval_milestones: str = arg("", "SGD readout: epochs dividing lr by 10 (App. C: 140,190)",
                               "epochs 'm1,m2,...' (integers >= 1), or empty")
    eval_batch_size: int = arg(512, "batch of the linear readout (not given in the paper)", INT1)
    eval_steps: int = arg(3000, "the readout stops at this many steps (a large recording); 0: none", INT0)
    eval_wd_exponents: str = arg("-10:10", "readout weight decays 2^a..2^b, chosen on validation (App. D); "
                                 "empty: none (App. C)", "'a:b' with integers a <= b, or empty")
    # -- supervised baseline (sec. 3.3: "weight regularization and dropout"; values not given) --
    sup_dropout: float = arg(0.5, "dropout after each block of the supervised encoder (README)", BELOW1)
    # -- data --
    dataset: str = arg("synthetic", "synthetic | chewie1 | chewie2 | mihi1 | mouse | npz | phy | dsprites | "
                       "cifar10 | cifar100 | mnist | fashion-mnist | tiny-imagenet | random32",
                       "a data set named in --help")
    data_dir: str = arg("data", "folder holding the published files (downloaded there if missing)", FREE)
    data_file: str = arg("", "--dataset npz: your recording; phy: a Kilosort / Phy folder (README)", FREE)
    bin_s: float = arg(0.01, "--dataset phy: bin width in s", POS)
    units: str = arg("good", "--dataset phy: the units of these Phy groups", ("good", "good,mua"))
    sample_rate: float = arg(0.0, "--dataset phy: samples a second in spike_times; 0: params.py's", NONNEG)
    size: str = arg("", "--dataset synthetic: 'T,N', T bins of 10 ms x N neurons coding a velocity (README: "
                    "scale); empty: 240 reaches", "'T,N', integers T >= 100 and N >= 1, or empty")
    train_fraction: float = arg(0.3, "dsprites: r, the share of kept images trained on (App. I)", "in (0, 1)")
    pretrain_on: str = arg("train+val", "what training sees (labels unused)", ("train+val", "train"))
    # -- run (what only the command line needs: Run, below the banner) --
    seed: int = arg(0, "seed of initialisation, batches, augmentations and mining", "an integer in [0, 2^63)")
    compile: bool = arg(False, "torch.compile the online and target networks and the views", FREE)
    precision: str = arg("auto", "auto: bf16 autocast on CUDA for image encoders, fp32 for the MLP (README)",
                         ("auto", "bf16", "fp32"))

    def __post_init__(self):
        """A setting not given takes the data set's preset (PRESETS), else its default."""
        default = {f.name: f.metadata["default"] for f in fields(self)}
        given = {k: v for k, v in vars(self).items() if v is not None}
        preset = PRESETS.get(given.get("dataset", default["dataset"]), {})
        for k, v in {**default, **{k: v for k, v in preset.items() if k in default}, **given}.items():
            setattr(self, k, v)

# Per-dataset defaults in one table (run settings too: Run's, below the banner); a setting given wins.
NEURAL_STEPS = 20000      # a neural run's steps without --steps (README: scale; App. D's Mouse-CA1: 16,000)
MONKEY = {}                                     # Appendix D.1 = Config defaults (README "Departures")
IMAGES = dict(optimizer="sgd", lr=0.03, weight_decay=5e-4, warmup_epochs=10, tau=0.996, epochs=800,
              pool="fresh", anchor_view="new", pretrain_on="train", pool_size=512, k=1, mining_weight=0.1,
              arch="resnet18", proj_hidden=4096, pred_hidden=4096, ckpt_every=10, eval_epochs=200,
              eval_lr=0.4, eval_milestones="140,190", eval_wd_exponents="", eval_steps=0)      # App. B, C
SMALL = dict(IMAGES, arch="convnet", hidden=16, batch_size=256, pool_size=256, proj_hidden=512,
             proj_dim=64, pred_hidden=512, warmup_epochs=2, eval_epochs=30, eval_milestones="20,27",
             eval_lr=0.05)                                 # readout lr: validation (README)
PRESETS = {
    "synthetic": dict(MONKEY, epochs=300),        # offline default: 300 epochs, a few seconds
    "chewie1": MONKEY, "chewie2": MONKEY, "mihi1": MONKEY, "npz": MONKEY, "phy": MONKEY,
    "mouse": dict(lr=0.001, rep_dim=64, jitter_s=12.0, min_gap_s=1800.0, sup_dropout=0.2),   # App. D.2
    "cifar10": IMAGES, "cifar100": IMAGES, "mnist": IMAGES, "random32": IMAGES,
    "tiny-imagenet": dict(IMAGES, image_size=64),
    "dsprites": dict(SMALL, epochs=12),             # App. I at r = 0.3; README: epochs x 0.3 / r
    "fashion-mnist": dict(SMALL, image_size=28, epochs=10),
}

# ==== Augmentations: t ~ T for neural activity (Appendix D.1, J) and images (Appendix C) ============
def augment(data, idx, cfg, t_m=False):
    """One view per index: t ~ T, or t_m ~ T_m with t_m=True (neural data: T_m = T, App. D.1)."""
    if isinstance(data, neural_data.NeuralSplit):
        return augment_neural(data, idx, cfg)
    return augment_images(data, idx, cfg, t_m)

def augment_neural(data, idx, cfg):
    """Every random choice drawn per sample (Appendix D.1, J): randomized dropout -> Gaussian noise
    -> pepper -> normalization, on the sample's window of W bins (one bin: the paper's), a neuron
    dropped or peppered in all of them. Temporal jitter chooses which samples idx are (`nearby`)."""
    x = data.x[data.window(idx)]                                       # (n, W, units) Hz
    n, W, n_units = x.shape
    dev = x.device
    p_drop = torch.rand(n, 1, 1, device=dev) * cfg.dropout_max                   # rate per sample
    x.mul_(torch.rand(n, 1, n_units, device=dev).ge_(p_drop))  # in-place 0/1: no bool tensor
    noisy = torch.nonzero(torch.rand(n, device=dev) < cfg.noise_p)[:, 0]         # rows with noise
    x.index_add_(0, noisy, torch.randn(len(noisy), W, n_units, device=dev), alpha=cfg.noise_std)
    pep = torch.nonzero(torch.rand(n, device=dev) < cfg.pepper_p)[:, 0]          # rows with pepper
    pepper = torch.rand(len(pep), 1, n_units, device=dev).lt_(cfg.pepper_rate)
    x.index_add_(0, pep, pepper.expand(-1, W, -1), alpha=cfg.pepper_value)
    return x.sub_(data.mean).div_(data.std).flatten(1)                 # (n, W x units)

def crop_flip_params(n, area, flip_p, device):
    """Per-sample random resized crop (torchvision's: area fraction, log-uniform aspect 3/4..4/3, the
    first of 10 tries that fits, else the whole image) and flip, as (n, 2, 3) affine_grid matrices."""
    a = torch.empty(n, 10, device=device).uniform_(*area)
    ratio = torch.empty(n, 10, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    sw, sh = (a * ratio).sqrt(), (a / ratio).sqrt()               # crop sides, fractions of the image
    fits = (sw <= 1) & (sh <= 1)
    first = fits.float().argmax(1, keepdim=True)
    sw, sh = (torch.where(fits.any(1), side.gather(1, first)[:, 0], 1.0) for side in (sw, sh))
    cx, cy = (torch.rand(2, n, device=device) * 2 - 1) * (1 - torch.stack([sw, sh]))   # crop centres
    sx = sw * torch.where(torch.rand(n, device=device) < flip_p, -1.0, 1.0)
    zero = torch.zeros_like(sw)
    return torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1)

def gray(x):
    """Luminance (n, 1, H, W), torchvision's weights as scalars (a tensor would be copied to the GPU)."""
    return x if x.shape[1] == 1 else (0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])

def shift_hue(x, shift):
    """torchvision's adjust_hue for a batch: RGB -> HSV, h + shift (mod 1), HSV -> RGB (the hexcone
    formulas, as its _rgb2hsv and _hsv2rgb). x (n, 3, H, W) in [0, 1], shift (n, 1, 1) in turns."""
    red, green, blue = x.unbind(1)
    mn, v = x.aminmax(dim=1)                                               # (n, H, W)
    c = v - mn                                                             # chroma
    s = c / torch.where(c > 0, v, 1.0)
    hue = torch.where(v == red, green - blue,
                      torch.where(v == green, blue - red + 2 * c, red - green + 4 * c))
    hue = (hue / (6 * torch.where(c > 0, c, 1.0)) + shift).remainder(1)   # (n, H, W) in turns
    sector = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)   # R, G, B
    k = (6 * hue[:, None] + sector).remainder(6)                          # (n, 3, H, W)
    return v[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))

def color_jitter(x, strengths, p, order=None, factors=None):
    """torchvision's ColorJitter(b, c, s, h) applied with probability p, batched: every sample
    draws its own four factors and its own order of the four operations. Brightness, contrast and
    saturation blend the image with black, its mean luminance, its luminance; hue shifts in HSV.
    `order` (n, 4) and `factors` (n, 4) may be given (tests compare with torchvision)."""
    n, dev = len(x), x.device
    if order is None:
        ranges = [(max(0.0, 1 - v), 1 + v) for v in strengths[:3]] + [(-strengths[3], strengths[3])]
        factors = torch.stack([torch.empty(n, device=dev).uniform_(*r) for r in ranges], 1)  # (n, 4)
        order = torch.rand(n, 4, device=dev).argsort(1)     # (n, 4) operation at each position
    y = x
    # Each sample's k-th operation, for all samples at once; the hue shift is computed at every k and
    # kept where it is the k-th operation (simpler than splitting the blends around it, and cheap)
    for k in range(4):
        op = order[:, k].view(n, 1, 1, 1)
        f = factors.gather(1, order[:, k:k + 1]).view(n, 1, 1, 1)
        lum = gray(y)
        ref = torch.where(op == 0, 0.0, torch.where(op == 1, lum.mean((1, 2, 3), keepdim=True), lum))
        hue = shift_hue(y, f[:, 0]) if y.shape[1] == 3 else y                 # grey images: no hue
        y = torch.where(op == 3, hue, torch.lerp(ref, y, f).clamp_(0, 1))     # _blend of torchvision
    return torch.where(torch.rand(n, 1, 1, 1, device=dev) < p, y, x)

def augment_images(data, idx, cfg, t_m):
    """T (App. C): crop (area 0.2-1) + flip as one bicubic affine warp, color jitter, grayscale.
    T_m: the crop alone, area 0.8-1 (App. C, H). Every parameter is drawn per sample."""
    n = len(idx)
    x = data.x[idx].float().div_(255)                                        # (n, C, H, W)
    lo, hi = (float(v) for v in (cfg.mined_crop_area if t_m else cfg.crop_area).split(":"))
    affine = crop_flip_params(n, (lo, hi), 0.0 if t_m else cfg.flip_p, x.device)
    grid = F.affine_grid(affine, [n, x.shape[1], data.size, data.size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False).clamp_(0, 1)
    if not t_m:
        x = color_jitter(x, [float(v) for v in cfg.color_jitter.split(",")], cfg.color_p)
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < cfg.gray_p, gray(x).expand_as(x), x)
    return ((x - data.mean) / data.std).contiguous(memory_format=torch.channels_last)

# ==== Networks: encoder f, projectors g and h, predictors q and r ===================================
def mlp(n_in, width, n_out):
    """MLP(in, width, out) of Appendix C: Linear, BatchNorm, ReLU, Linear. A Linear followed by BatchNorm
    needs no bias (BatchNorm subtracts it again); leaving it out saves a copy and a sum per step."""
    return nn.Sequential(nn.Linear(n_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, n_out))

def neural_encoder(n_in, hidden, rep_dim, blocks=4, dropout=0.0):
    """Appendix D.1: 4 blocks of Linear(hidden)+BN+ReLU, then a linear layer to the representation.
    dropout > 0 only for the supervised baseline (sec. 3.3)."""
    layers, width = [], n_in
    for _ in range(blocks):
        layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, rep_dim))

def convnet(c_in, width=16):
    """A small CNN for CPU runs: 4 blocks of 3x3 conv + BN + ReLU with 2x2 max-pools; y is the last
    map pooled to 3 x 3, not to 1 x 1, so that a coarse layout of the image stays in y (README)."""
    layers, w = [], c_in
    for i, o in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [nn.Conv2d(w, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if i < 3 else [nn.AdaptiveAvgPool2d(3), nn.Flatten()]
        w = o
    return nn.Sequential(*layers), 9 * w                                    # D = 9 * 8 * width

def cifar_resnet(name, c_in):
    """torchvision's ResNet-18/50, CIFAR variant (App. C): 3x3 stride-1 first convolution and no
    max-pool; y is the average-pool output (512-d ResNet-18, 2048-d ResNet-50)."""
    import torchvision
    net = getattr(torchvision.models, name)()
    net.conv1 = nn.Conv2d(c_in, 64, 3, 1, 1, bias=False)
    net.maxpool, dim, net.fc = nn.Identity(), net.fc.in_features, nn.Identity()
    return net, dim

def encoder(cfg, c_in, dropout=0.0):
    """The encoder f of --arch for c_in neurons or image channels, and the size D of y = f(x)."""
    if cfg.arch == "mlp":
        return neural_encoder(c_in, cfg.hidden, cfg.rep_dim, dropout=dropout), cfg.rep_dim
    return convnet(c_in, cfg.hidden) if cfg.arch == "convnet" else cifar_resnet(cfg.arch, c_in)

class Network(nn.Module):
    """The part with a target copy: encoder f, projector g, second projector h. For neural data
    the paper uses no projectors (App. D.1): g and h are identities."""

    def __init__(self, f, g, h, layout):
        super().__init__()
        self.f, self.g, self.h, self.layout = f, g, h, layout

    def mined_space(self, y, z):
        """v = h(g(y)) cascaded (sec. 2.1), h(y) parallel, g(y) single (h = identity) (App. G)."""
        return self.h(y if self.layout == "parallel" else z)

class MYOW(nn.Module):
    """Online network theta = (f, g, h) and the dual predictors q (augmented) and r (mined); one
    forward over all online views, so that it is a single call for DistributedDataParallel."""

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
        v = self.net.mined_space(y[anchors], z[anchors])      # (B, Dv) v = h(g(y_m))
        return y, p, self.r(v)                                # r(v)

def build_networks(cfg, data):
    """Online model (theta plus predictors) and the target network xi, an exact copy at start."""
    f, D = encoder(cfg, data.n_in)
    P = cfg.proj_dim if cfg.proj_hidden else D                              # size of z and v
    g = mlp(D, cfg.proj_hidden, P) if cfg.proj_hidden else nn.Identity()
    h = (mlp(D if cfg.layout == "parallel" else P, cfg.proj_hidden, P)
         if cfg.proj_hidden and cfg.layout != "single" and cfg.method == "myow" else nn.Identity())
    net = Network(f, g, h, cfg.layout)
    q = mlp(P, cfg.pred_hidden, P)
    r = mlp(P, cfg.pred_hidden, P) if cfg.method == "myow" else None         # BYOL has no r
    return MYOW(net, q, r), copy.deepcopy(net).requires_grad_(False)        # init xi <- theta

# ==== The method: loss, mining, target update, schedules ============================================
def d(p, z):
    """Equation (1): negative cosine similarity, per sample. z comes from the target (no grad)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1)

def nearest(y_anchor, y_pool, allowed, k):
    """N_k(y_m): for each anchor the k candidates of highest cosine similarity, the `allowed` first.
    y_anchor (B, D), y_pool (L, D), allowed (B, L) bools, or 1/0 floats that become the similarities
    (one (B, L) tensor less). Returns (B, k) scores, cosine + 3 where allowed, and (B, k) pool indices."""
    with torch.autocast(y_anchor.device.type, enabled=False):      # rank in float32, also on GPU
        # 3 * allowed + cosine in one matrix product: allowed candidates score >= 2, the others <= 1
        sim = allowed.float().addmm_(F.normalize(y_anchor.float(), dim=1),
                                     F.normalize(y_pool.float(), dim=1).T, beta=3)     # (B, L)
    return sim.topk(k, dim=1)                                                       # (B, k)

def mine(y_anchor, y_pool, allowed, k):
    """Section 2.2 / Algorithm 1 'Find N_k(y_m) in S, randomly select y'_m': one of the k nearest allowed
    candidates, uniformly. Returns the pool index (B,) and 1.0 where the anchor had an allowed candidate
    (B,): one with fewer than k chooses among those it has, one with none gets no mined view."""
    top_sim, top_idx = nearest(y_anchor, y_pool, allowed, k)                        # (B, k)
    eligible = top_sim.gt_(1.5)                         # 1/0: allowed (>= 2 in nearest), ones first
    pick = (torch.rand(len(top_sim), device=top_sim.device) * eligible.sum(1)).long()   # uniform rank
    return top_idx.gather(1, pick[:, None])[:, 0], eligible[:, 0]

def all_gather(x):
    """Concatenate a tensor from all ranks, in rank order (the global mining pool, sec. 2.3)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)

def ema_tensors(net):
    """The tensors eq. (2) averages: parameters and BatchNorm statistics."""
    return [p for p in list(net.parameters()) + list(net.buffers()) if p.is_floating_point()]

@torch.no_grad()
def update_target(xi, theta, tau):
    """Equation (2): xi <- tau * xi + (1 - tau) * theta, one foreach lerp over all tensors."""
    torch._foreach_lerp_(xi, theta, 1.0 - tau)

def lr_at(step, total, warmup, base):
    """Linear warm-up to `base`, then cosine decay to 0 (App. C, D)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

def tau_at(step, total, tau_base, tau_final=1.0):
    """tau from tau_base (step 0) to tau_final (last step) along a cosine (BYOL, App. C, D)."""
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * step / total) + 1) / 2

def lambda_at(step, ramp, weight):
    """lambda ramped linearly from 0 to `weight` over `ramp` steps (section 2.1)."""
    return weight * min(1.0, step / ramp) if ramp > 0 else weight

def schedule(cfg, n):
    """Steps an epoch (full batches of B from n samples), epochs, steps in all, warm-up and lambda-ramp
    steps: --steps, or --epochs passes up to NEURAL_STEPS for neural data; warm-up and ramp keep their
    share of the run (App. D: 100 and 10 of 1000 epochs)."""
    per_epoch = n // cfg.batch_size
    total = cfg.steps or cfg.epochs * per_epoch
    if not cfg.steps and cfg.arch == "mlp":
        total = min(total, NEURAL_STEPS)
    warmup, ramp = (total * e // cfg.epochs for e in (cfg.warmup_epochs, cfg.mining_ramp_epochs))
    return per_epoch, -(-total // per_epoch), total, warmup, ramp   # exact when total = epochs * per_epoch

def pool_size(cfg):
    """L, the candidates per step: --pool-size fresh ones, or the batch's own views (L = B)."""
    return cfg.pool_size if cfg.pool == "fresh" else cfg.batch_size

# ==== Training: the optimiser, one step and the loop of Algorithm 1 =================================
def rank_world():
    """This process's rank and the number of processes (torchrun), or 0 and 1."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def optimizer(cfg, model):
    """App. C: SGD with momentum for images, weight decay on weight matrices and kernels only (the
    1-d tensors, BatchNorm's and biases, undecayed as in BYOL). App. D: AdamW, decay on everything."""
    if cfg.optimizer == "adamw":
        # foreach: a few operations over all tensors a step (on CPU torch loops over them by default)
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    params = list(model.parameters())
    return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1]},
                            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

def autocast_for(cfg, device):
    """bfloat16 autocast on CUDA for image encoders; the small MLP of neural data stays in float32
    (bf16 cost it accuracy and saved no time: README)."""
    bf16 = cfg.precision == "bf16" or cfg.precision == "auto" and cfg.arch != "mlp"
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" and bf16 else nullcontext()

def setup_training(cfg, data, device):
    """The online model (theta: f, g, h and q, r), the target xi and the optimiser on the device, and
    the online model as a step calls it: under DDP with torchrun (gradients averaged), or compiled."""
    torch.manual_seed(cfg.seed)                                   # same initial theta everywhere
    model, target = build_networks(cfg, data)
    fmt = torch.channels_last if cfg.arch != "mlp" else torch.contiguous_format
    model, target = model.to(device, memory_format=fmt), target.to(device, memory_format=fmt)
    if dist.is_initialized() and device.type == "cuda":   # BatchNorm over the global batch (GPU only)
        model, target = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (model, target))
    opt = optimizer(cfg, model)
    online = model
    if dist.is_initialized():
        ids = [device] if device.type == "cuda" else None
        online = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        online = torch.compile(online)
        target.f.compile()                        # in place: its state_dict keeps its names
    return model, online, target, opt

def myow_step(cfg, data, online, target, s_all, c_all, lam, views=augment):
    """The loss of Algorithm 1 for s_all (B,) anchors and c_all (L,) candidates, the same on every
    process, which makes the views of its share (b, l). Returns the loss, its augmented-view and mined-
    view parts, and the mining: anchors, their mined samples, 1.0 where one was found (App. F)."""
    rank, world = rank_world()
    b, l = len(s_all) // world, len(c_all) // world
    s, c = s_all[rank * b:(rank + 1) * b], c_all[rank * l:(rank + 1) * l]
    mining = cfg.method == "myow"
    fresh = mining and cfg.pool == "fresh"          # else the candidates are the batch's views x'
    new_anchor = mining and cfg.anchor_view == "new"   # else x is the anchor x_m (T_m = T)
    # x = t(s), x' = t'(s'), t, t' ~ T; neural: x is the anchor's own bin (with its window) and s' a bin
    # of the same trial at most --jitter-s away (temporal jitter, App. D.1); images: s' = s
    x, x2 = views(data, torch.cat([s, data.nearby(s)]), cfg).split(b)
    # T_m views in one call: x_m = t_m(s) (Alg. 1) and x_c = t_m(c) (fresh candidates, App. B)
    wanted = [s] * new_anchor + [c] * fresh
    x_m, x_c = (views(data, torch.cat(wanted), cfg, t_m=True).split([b * new_anchor, l * fresh]) if wanted
                else (x[:0], x[:0]))
    with autocast_for(cfg, x.device):
        with torch.no_grad():                                      # target network xi
            y_t = target.f(torch.cat([x, x2, x_c]))                # (2b [+ l], D)
            z_t = target.g(y_t)
            u, z2 = z_t[:b], z_t[b:2 * b]                          # u = g(f(x)), z' = g(f(x'))
        anchors = slice(2 * b, 3 * b) if new_anchor else slice(0, b)   # online rows of y_m
        y, p, r_v = online(torch.cat([x, x2, x_m]), 2 * b, anchors if mining else None)
        loss_aug = 2 * d(p, torch.cat([z2, u])).mean()             # d(q(z), z') + d(q(u'), u)
        if not mining:
            return loss_aug, loss_aug, torch.zeros((), device=x.device), None
        with torch.no_grad():
            cand = slice(2 * b, None) if fresh else slice(b, 2 * b)    # target rows of the candidates
            if cfg.mine_in == "target":
                y_pool = y_t[cand]                                 # (l, D) f_xi(x_c)
            elif fresh:                                            # App. F: the online space
                y_pool = getattr(online, "module", online).net.f(x_c)   # (DDP holds the model in .module)
            else:
                y_pool = y[cand]
            y_pool = all_gather(y_pool)                            # (L, D) the pool of all processes
            v_pool = all_gather(target.mined_space(y_t[cand], z_t[cand]))  # (L, Dv) v' of the candidates
            allowed = data.allowed(s, c_all)                       # (b, L) mask (App. B)
            j, has = mine(y[anchors], y_pool, allowed, cfg.k)
        loss_mined = (d(r_v, v_pool[j]) * has).sum() / has.sum().clamp(min=1)   # d(r(v), v'_m)
        return loss_aug + lam * loss_mined, loss_aug, loss_mined, (s, c_all[j], has)

def train(cfg, data, device, after_epoch=None, resume=None):
    """Algorithm 1 on the split `data`; returns the online model (theta and q, r). after_epoch(epoch,
    record, mining, state) sees each epoch's mean losses, schedules, mining and the state training
    changes (below the banner: log, checkpoint, signals); resume(state) loads a checkpoint's state and
    returns the epoch to go on from."""
    rank, world = rank_world()
    model, online, target, opt = setup_training(cfg, data, device)
    views = torch.compile(augment) if cfg.compile else augment      # their elementwise chains fuse
    xi, theta = ema_tensors(target), ema_tensors(model.net)
    N, B, L = len(data), cfg.batch_size, pool_size(cfg)
    steps_per_epoch, epochs, total, warmup, ramp = schedule(cfg, N)
    index_gen = torch.Generator(device).manual_seed(cfg.seed)  # batches and pools: same on all ranks
    torch.manual_seed(cfg.seed + rank)                          # augmentations: one stream per rank
    state = (model, target, opt, index_gen)
    start = resume(state) if resume else 0
    step = start * steps_per_epoch
    for epoch in range(start, epochs):
        losses, mining = torch.zeros(3, device=device), []    # sums of L, L_aug, L_mined over steps
        perm = torch.randperm(N, generator=index_gen, device=device)
        for it in range(min(steps_per_epoch, total - step)):             # the last may be short
            lr = lr_at(step, total, warmup, cfg.lr)
            tau = tau_at(step, total, cfg.tau, 1.0 if cfg.tau_schedule == "cosine" else cfg.tau)
            lam = lambda_at(step, ramp, cfg.mining_weight)
            for group in opt.param_groups:
                group["lr"] = lr
            s = perm[it * B:(it + 1) * B]                          # (B,) the global batch's anchors
            c = s                                                  # (L,) candidates: the batch's x'
            if cfg.method == "myow" and cfg.pool == "fresh":       # or an independent stream (App. B)
                c = torch.cat([torch.randperm(N, generator=index_gen, device=device)
                               for _ in range(-(-L // N))])[:L]                         # L may exceed N
            loss, loss_aug, loss_mined, mined = myow_step(cfg, data, online, target, s, c, lam, views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_target(xi, theta, tau)                                  # eq. (2)
            losses += torch.stack([loss, loss_aug, loss_mined]).detach()
            mining.append(mined)
            step += 1
        if after_epoch:
            record = dict(losses=losses / (it + 1), lr=lr, tau=tau, lam=lam, steps=it + 1)
            after_epoch(epoch, record, mining, state)
    return model

# ==== Linear evaluation (Appendix D): all weight decays of the sweep trained at once ================
def angle_error(pred, labels):
    """|angle(pred) - angle of direction l|, wrapped to [0, pi]; pred (..., n, 2) = (cos, sin)."""
    angle = torch.atan2(pred[..., 1], pred[..., 0])
    diff = torch.remainder(angle - labels * (2 * math.pi / 8) + math.pi, 2 * math.pi) - math.pi
    return diff.abs()

def weighted_f1(pred, labels, n_classes):
    """Per-class F1 = 2 TP / (predicted + actual), weighted by class support (sklearn's 'weighted');
    pred (S, n) -> (S,)."""
    C = max(n_classes, int(labels.max()) + 1)      # a class the readout never outputs: F1 0, still weighed
    p, t = F.one_hot(pred, C).float(), F.one_hot(labels, C).float()                   # (S, n, C), (n, C)
    f1 = 2 * (p * t).sum(-2) / (p.sum(-2) + t.sum(0)).clamp(min=1)                    # (S, C)
    return f1 @ t.mean(0)                                                             # (S,)

def decoding_loss(out, labels, task):
    """Reach: MSE to (cos, sin) of the direction (App. D.1); a continuous behaviour: MSE; classes:
    cross-entropy, not class-balanced (App. D.2 does not balance). out (..., n, O) -> one loss per readout."""
    if task == "reach":
        angle = labels * (math.pi / 4)
        labels = torch.stack([torch.cos(angle), torch.sin(angle)], -1)           # (cos, sin) of the direction
    if task in ("reach", "continuous"):
        return ((out - labels) ** 2).mean((-2, -1))
    ce = F.cross_entropy(out.flatten(0, -2), labels.expand(out.shape[:-1]).flatten(), reduction="none")
    return ce.view(out.shape[:-1]).mean(-1)

KEY = {"state": "f1", "continuous": "r2"}          # the metric that chooses a readout (else "acc")

def r2(out, labels):
    """R², the coefficient of determination of each of the S readouts and d dimensions: out (S, n, d)."""
    return 1 - ((out - labels) ** 2).sum(-2) / ((labels - labels.mean(0)) ** 2).sum(0)      # (S, d)

def scores(out, labels, task, n_classes):
    """Metrics in % (R²: a fraction, per dimension and mean) for each of the S readouts: out (S, n, O)."""
    if task == "continuous":
        return {"r2": r2(out, labels).mean(-1), "r2_dims": r2(out, labels)}
    if task == "reach":
        err = angle_error(out, labels)
        return {"acc": 100 * (err < math.pi / 8).float().mean(-1),           # nearest direction
                "delta_acc": 100 * (err < 3 * math.pi / 16).float().mean(-1)}  # App. D, Fig. S2
    pred = out.argmax(-1)
    return {"f1": 100 * weighted_f1(pred, labels, n_classes), "acc": 100 * (pred == labels).float().mean(-1)}

def ridge(feats, Y, wd, chunk=1 << 14):
    """Least squares with a penalty wd * |W|^2 per sample for all S penalties from one eigendecomposition
    of the (D, D) covariance (float64, over chunks of rows): feats (n, D), Y (n, d) -> W (S, D, d), bias."""
    n, mx, my = len(feats), feats.mean(0, dtype=torch.float64), Y.mean(0, dtype=torch.float64)
    cov = sum((x.double() - mx).T @ (x.double() - mx) for x in feats.split(chunk)) / n       # (D, D)
    xy = sum((x.double() - mx).T @ (y.double() - my) for x, y in zip(feats.split(chunk), Y.split(chunk))) / n
    e, V = torch.linalg.eigh(cov)                                  # cov = V diag(e) V^T
    W = V @ ((V.T @ xy) / (e[:, None] + wd.double()[:, None, None]))                     # (S, D, d)
    return W.float(), (my - mx @ W).float()[:, None]

def linear_eval(feats, labels, task, cfg):
    """One linear readout per weight decay 2^a of the sweep on frozen train features [train, val, test
    (, holes)], the best on validation reported on test. Reach and classes: mini-batches for --eval-epochs
    (at most --eval-steps); a continuous behaviour: ridge regression in closed form, scored with R²."""
    dev = feats[0].device
    if cfg.eval_wd_exponents:
        a, b = (int(v) for v in cfg.eval_wd_exponents.split(":"))
        wd = 2.0 ** torch.arange(a, b + 1, dtype=torch.float32, device=dev)          # (S,)
    else:
        wd = torch.zeros(1, device=dev)                            # App. C: no decay, no sweep
    if task == "continuous":
        W, bias = ridge(feats[0], labels[0], wd)
        return pick(feats, labels, task, W, bias, wd, 0)
    S, D = len(wd), feats[0].shape[1]
    n_classes = 8 if task == "reach" else int(max(l.max() for l in labels if l is not None)) + 1
    O = 2 if task == "reach" else n_classes
    gen = torch.Generator(device=feats[0].device).manual_seed(cfg.seed)
    bound = 1 / math.sqrt(D)                                       # nn.Linear's initialisation
    W = ((torch.rand(D, O, generator=gen, device=wd.device) * 2 - 1) * bound).repeat(S, 1, 1).requires_grad_()
    bias = torch.zeros(S, 1, O, device=wd.device, requires_grad=True)
    milestones = [int(v) for v in cfg.eval_milestones.split(",") if v]
    opt = (torch.optim.SGD([W, bias], lr=cfg.eval_lr, momentum=0.9) if milestones   # App. C
           else torch.optim.AdamW([W, bias], lr=cfg.eval_lr, weight_decay=0.0))   # App. D; decay below
    X, Y = feats[0], labels[0]
    batches = -(-len(X) // cfg.eval_batch_size)                   # a step a batch; at most --eval-steps
    epochs = min(cfg.eval_epochs, -(-cfg.eval_steps // batches)) if cfg.eval_steps else cfg.eval_epochs
    for epoch in range(epochs):
        opt.param_groups[0]["lr"] = cfg.eval_lr * 0.1 ** sum(epoch >= m for m in milestones)
        for i in torch.randperm(len(X), generator=gen, device=X.device).split(cfg.eval_batch_size):
            out = X[i] @ W + bias                                  # (S, b, O)
            loss = decoding_loss(out, Y[i], task).sum()            # readouts are independent
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():                                  # AdamW: decoupled decay first
                W.mul_(1 - cfg.eval_lr * wd[:, None, None])
                bias.mul_(1 - cfg.eval_lr * wd[:, None, None])
            opt.step()
    return pick(feats, labels, task, W.detach(), bias.detach(), wd, n_classes)

def pick(feats, labels, task, W, bias, wd, n_classes):
    """The readout of the weight decay best on validation, and its scores on test (and the holes)."""
    val = scores(feats[1] @ W + bias, labels[1], task, n_classes) if feats[1] is not None else {}
    tests = {name: scores(x @ W + bias, l, task, n_classes)        # dsprites: test and holes
             for name, x, l in zip(("test", "holes"), feats[2:], labels[2:])}
    key = KEY.get(task, "acc")
    best = int(torch.nan_to_num(val[key], nan=-1).argmax()) if val else 0
    digits = 4 if task == "continuous" else 2                     # R² a fraction, the rest in %

    def at_best(v):                                                # a figure, or one a dimension
        v = v[best].tolist()
        return [round(x, digits) for x in v] if isinstance(v, list) else round(v, digits)
    res = {f"{name}_{m}": at_best(v) for name, test in tests.items() for m, v in test.items()}
    res.update({f"val_{m}": at_best(v) for m, v in val.items()})
    res["eval_weight_decay"] = float(wd[best])
    return res

@torch.no_grad()
def representations(f, splits, chunk=1024):
    """y = f(x) of every unaugmented sample of each split (None stays None), BatchNorm in eval mode."""
    f.eval()
    feats = [None if s is None else
             torch.cat([f(s.inputs(i)).float() for i in torch.arange(len(s), device=s.x.device).split(chunk)])
             for s in splits]
    f.train()
    return feats

# ==== PLUMBING BELOW: the method ends here; a reader of the method may stop. =========================
# What follows makes it a tool: data loading, the baselines, checks, checkpoints, the command line.
import argparse
import dataclasses
import fcntl
import io
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np

NEURAL = {"synthetic", "chewie1", "chewie2", "mihi1", "mouse", "npz", "phy"}

@dataclass
class Run(Config):
    """Config and what only a run of the command line needs: the device, threads, files."""
    device: str = arg("auto", "auto (cuda if available), cpu or cuda", ("auto", "cpu", "cuda"))
    threads: int = arg(0, "CPU threads; 0: OMP_NUM_THREADS if set, else 1 for the MLP, torch's default for "
                       "images (README: measured)", INT0)
    download: bool = arg(False, "images: let torchvision download the data set into --data-dir", FREE)
    out: str = arg("", "folder for config, log, checkpoint, results and encoder.pt; empty: none", FREE)
    resume: bool = arg(False, "continue the run in --out from its checkpoint", FREE)
    overwrite: bool = arg(False, "replace the run already in --out", FREE)
    ckpt_every: int = arg(100, "write --out/checkpoint.pt every this many epochs, and at the end", INT1)

# ==== Data: images as one uint8 tensor on the device (neural recordings: neural_data.py) ===========
class ImageSplit:
    """A split as one uint8 tensor (N, C, H, W) on the device; no DataLoader, no per-image Python."""
    task, classes = "class", True

    def __init__(self, x, labels, mean, std, size, coarse=None):
        self.x, self.labels, self.mean, self.std, self.size, self.coarse = x, labels, mean, std, size, coarse
        self.n_in = x.shape[1]                                 # the encoder's input channels

    def __len__(self):
        return len(self.x)

    def inputs(self, idx):
        """Unaugmented images as the encoder sees them (evaluation): resized and normalised."""
        x = self.x[idx].float() / 255                                    # (n, C, H, W)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def nearby(self, idx):                                     # an image's views are of itself
        return idx

    def allowed(self, s, c):                                   # images need no mask (App. B), but a
        return (s[:, None] != c[None, :]).float()              # sample is not its own mined view

CIFAR20 = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13,
           15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4,
           17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13,
           15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]  # fine -> coarse
DSPRITES = (3, 6, 40, 16, 16)               # shapes, scales, orientations, x and y positions

def dsprites(fraction, seed=0, size=32, n_holes=10000):
    """dSprites (App. I) drawn procedurally, white on black, labelled by shape: 3 shapes x 6 scales x
    40 orientations x 16 x 16 positions (its 32 x 32 halved for a CPU). Half the scales and half the
    orientations are kept (by seed), training draws a fraction r of the kept images. Returns [train,
    test (the other kept), holes (n_holes of the removed values)] as (uint8 (n, 1, size, size), latents)."""
    gen = torch.Generator().manual_seed(seed)
    shape, scale, angle, px, py = (v.flatten() for v in torch.meshgrid(
        *(torch.arange(n) for n in DSPRITES), indexing="ij"))                   # latents of each image
    kept = (torch.isin(scale, torch.randperm(6, generator=gen)[:3])
            & torch.isin(angle, torch.randperm(40, generator=gen)[:20]))
    ours, holes = (torch.nonzero(m)[:, 0] for m in (kept, ~kept))
    ours = ours[torch.randperm(len(ours), generator=gen)]
    holes = holes[torch.randperm(len(holes), generator=gen)[:n_holes]]
    n_train = round(fraction * len(ours))
    grid = torch.linspace(-1, 1, size)

    def draw(i):                                            # (n,) indices -> (n, 1, size, size)
        radius = (0.2 + 0.05 * scale[i]).view(-1, 1, 1)       # dSprites' scales 0.5..1 x 0.45
        a = (angle[i] * (2 * math.pi / 40)).view(-1, 1, 1)
        X = grid.view(1, 1, -1) - (px[i] * 0.07 - 0.525).view(-1, 1, 1)     # centres in [-0.525, 0.525]
        Y = grid.view(1, -1, 1) - (py[i] * 0.07 - 0.525).view(-1, 1, 1)
        u, v = (a.cos() * X + a.sin() * Y) / radius, (a.cos() * Y - a.sin() * X) / radius
        w = 1.1 * v + 0.15                                                  # the heart, centred
        inside = torch.stack([torch.maximum(u.abs(), v.abs()) <= 0.8, u ** 2 + (v / 0.5) ** 2 <= 1,
                              ((1.1 * u) ** 2 + w ** 2 - 1) ** 3 <= (1.1 * u) ** 2 * w ** 3])
        return (inside[shape[i], torch.arange(len(i))] * 255).to(torch.uint8)[:, None]
    return [(torch.cat([draw(j) for j in i.split(4096)]), i)                 # 4,096 images at a time
            for i in (ours[:n_train], ours[n_train:], holes)]

def load_images(cfg, device):
    """[train, test] ImageSplits, the public split (App. C; dsprites: [train, test, holes]), on the device."""
    import torchvision
    name, root = cfg.dataset, cfg.data_dir
    if name == "dsprites":
        parts = [(x, i // math.prod(DSPRITES[1:]))                             # label: the shape
                 for x, i in dsprites(cfg.train_fraction, cfg.seed, cfg.image_size)]
    elif name == "random32":                                  # CIFAR-shaped noise: speed only
        gen = torch.Generator().manual_seed(0)
        parts = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (n,), generator=gen)) for n in (50000, 10000)]
    elif name == "tiny-imagenet":       # as unpacked: train/<wnid>/images/*.JPEG, val/val_annotations.txt
        base = os.path.join(root, "tiny-imagenet-200")
        if not os.path.isdir(os.path.join(base, "train")):
            raise neural_data.DataError(f"no {base}/train; unpack tiny-imagenet-200.zip into --data-dir")
        folder = torchvision.datasets.ImageFolder(os.path.join(base, "train"))     # classes: sorted wnids
        with open(os.path.join(base, "val", "val_annotations.txt")) as fh:
            val = [(os.path.join(base, "val", "images", name), folder.class_to_idx[wnid])
                   for name, wnid, *_ in (line.split("\t") for line in fh)]
        read = lambda p: torchvision.transforms.functional.pil_to_tensor(folder.loader(p))     # RGB
        parts = [(torch.stack([read(p) for p, _ in files]), torch.tensor([c for _, c in files]))
                 for files in (folder.samples, val)]
    else:
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
               "mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
        first = rank_world()[0] == 0
        if not first:
            dist.barrier()              # under torchrun rank 0 downloads and extracts alone, then all read
        try:
            sets = torchvision_sets(cls, root, cfg.download and first)
        finally:
            if first and dist.is_initialized():
                dist.barrier()
        xs = [torch.as_tensor(np.asarray(ds.data)) for ds in sets]     # (N, H, W) or (N, H, W, C)
        parts = [(x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2), torch.as_tensor(ds.targets))
                 for x, ds in zip(xs, sets)]
    train = parts[0][0].float() / 255
    mean, std = train.mean((0, 2, 3)), train.std((0, 2, 3))     # per channel, training images
    coarse = torch.tensor(CIFAR20, device=device) if name == "cifar100" else None
    return [ImageSplit(x.contiguous().to(device), y.long().to(device), mean.to(device)[:, None, None],
                       std.to(device)[:, None, None], cfg.image_size, coarse) for x, y in parts]

def torchvision_sets(cls, root, download):
    """The train and test sets of a torchvision data set in `root`; with `download`, fetched into a
    temporary folder and moved in when complete: a failed download leaves nothing that looks like one."""
    try:
        return [cls(root, train=part) for part in (True, False)]
    except RuntimeError as e:
        if not download:
            raise neural_data.DataError(f"{cls.__name__} is not in {root} ({e}); add --download (needs "
                                        f"internet) or place torchvision's standard layout there") from None
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        for part in (True, False):
            cls(tmp, train=part, download=True)
        shutil.copytree(tmp, root, dirs_exist_ok=True, copy_function=os.replace)    # moved, not copied
    except Exception as e:              # URLError, HTTPError, a bad archive, a full disk: all end here
        reason = " ".join(str(e).split())[:160]                      # one line
        raise neural_data.DataError(
            f"could not download {cls.__name__} ({type(e).__name__}: {reason}); where there is internet, run "
            f"torchvision.datasets.{cls.__name__}(DIR, download=True) and copy DIR's contents to {root}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [cls(root, train=part) for part in (True, False)]

# ==== Baselines: the supervised encoder (sec. 3.3); the raw inputs are read out in run ==============
def train_supervised(cfg, splits, device):
    """The supervised baseline of Table 3: the same encoder trained end to end through a linear head with
    the same optimiser and schedule, on views of T_m, dropout after every block and weight decay (sec.
    3.3); the encoder of the epoch best on validation (where there is one) is returned."""
    data, val, task = splits[0], splits[1], splits[0].task
    torch.manual_seed(cfg.seed)
    n_out = {"reach": 2, "continuous": data.labels.shape[-1]}.get(task, int(data.labels.max()) + 1)
    f, D = encoder(cfg, data.n_in, dropout=cfg.sup_dropout)
    model = nn.Sequential(f, nn.Linear(D, n_out)).to(device)
    opt = optimizer(cfg, model)
    N, B = len(data), cfg.batch_size
    steps_per_epoch, epochs, total, warmup, _ = schedule(cfg, N)
    best, best_f = -math.inf, None
    if val is not None:                                       # early stopping, on validation only
        x_val, key = val.inputs(torch.arange(len(val), device=device)), KEY.get(task, "acc")
    for epoch in range(epochs):
        n_steps = min(steps_per_epoch, total - epoch * steps_per_epoch)          # the last may be short
        for it, s in enumerate(torch.randperm(N, device=device)[:n_steps * B].split(B)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + it, total, warmup, cfg.lr)
            x = augment(data, data.nearby(s), cfg, t_m=True)      # labelled views, jitter included
            loss = decoding_loss(model(x), data.labels[s], task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None:
            with torch.no_grad():
                model.eval()
                score = scores(model(x_val)[None], val.labels, task, n_out)[key].item()
                model.train()
            if score > best:
                best, best_f = score, copy.deepcopy(f.state_dict())
        if epoch == 0 or (epoch + 1) % max(1, epochs // 20) == 0:
            print(f"epoch {epoch + 1:4d}/{epochs} | supervised loss {loss.item():.4f} | lr {group['lr']:.2e}"
                  + (f" | best validation {best:.2f}" if val is not None else ""), flush=True)
    if best_f is not None:
        f.load_state_dict(best_f)
    return f

# ==== Checks and parsing of the configuration: refusals are one line, exit status 2 ================
class ConfigError(Exception):
    """A configuration the run cannot honour: the message names the flag and what to do (exit 2)."""

class RunError(Exception):
    """A failure during the run (a write, memory): the message names what and what to do (exit 1)."""

class Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line and exit status 2, like every refusal
        raise ConfigError(f"{message} (python myow.py --help lists every flag)")

def parse_config(argv=None, arrays=False):
    """The flags given, over the data set's preset, over the defaults, all checked (arrays: from fit)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Run):
        flag, help, default = "--" + f.name.replace("_", "-"), f.metadata["help"], f.metadata["default"]
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help)
        else:
            parser.add_argument(flag, type=type(default), help=f"{help} [{default}, or the dataset's preset]")
    cfg = Run(**vars(parser.parse_args(argv)))             # flags not given are None: preset or default
    check_fields(cfg, arrays)
    return cfg

def is_area(v):                                         # 'lo:hi'
    lo, hi = (float(x) for x in v.split(":"))
    return 0 < lo <= hi <= 1

def is_jitter(v):                                       # 'b,c,s,h': four numbers or a ValueError
    b, c, s, h = (float(x) for x in v.split(","))
    return 0 <= min(b, c, s, h) and max(b, c, s) < math.inf and h <= 0.5

def is_size(v):                                         # 'T,N'
    T, N = (int(x) for x in v.split(","))
    return T >= 100 and N >= 1

def is_exponents(v):                                    # 'a:b'
    a, b = (int(x) for x in v.split(":"))
    return a <= b

# What each rule in words (the `check` of a Config field) accepts; a rule that raises refuses too.
RULES = {
    INT1: lambda v: v >= 1,
    INT0: lambda v: v >= 0,
    "an integer >= 2 (for BatchNorm)": lambda v: v >= 2,
    "an integer >= 8": lambda v: v >= 8,                 # the small CNN pools three times
    "an integer in [0, 2^63)": lambda v: 0 <= v < 2 ** 63,
    "a data set named in --help": lambda v: v in PRESETS,
    POS: lambda v: 0 < v < math.inf,
    NONNEG: lambda v: 0 <= v < math.inf,
    "seconds >= 0, or inf": lambda v: v >= 0,
    PROB: lambda v: 0 <= v <= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    BELOW1: lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    AREA: is_area,
    "four numbers 'b,c,s,h', each >= 0, hue h <= 0.5": is_jitter,
    "'T,N', integers T >= 100 and N >= 1, or empty": lambda v: not v or is_size(v),
    "epochs 'm1,m2,...' (integers >= 1), or empty": lambda v: not v or min(int(m) for m in v.split(",")) >= 1,
    "'a:b' with integers a <= b, or empty": lambda v: not v or is_exponents(v),
}

def existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path

def check_fields(cfg, arrays=False):
    """Every field against its `check`, then what depends on the data set and the machine: all before
    any data is loaded or any file is touched."""
    for f in dataclasses.fields(Run):
        v, check = getattr(cfg, f.name), f.metadata["check"]
        try:
            ok = check is FREE or (v in check if isinstance(check, tuple) else RULES[check](v))
        except (ValueError, TypeError):                            # a string of the wrong format
            ok = False
        if not ok:
            allowed = " or ".join(check) if isinstance(check, tuple) else check
            raise ConfigError(f"--{f.name.replace('_', '-')} {v!r}: must be {allowed}")
    neural = cfg.dataset in NEURAL
    if neural != (cfg.arch == "mlp"):
        raise ConfigError(f"--arch {cfg.arch!r}: {cfg.dataset} takes "
                          + ("mlp" if neural else "convnet, resnet18 or resnet50"))
    if not neural and cfg.pretrain_on != "train":
        raise ConfigError(f"--pretrain-on {cfg.pretrain_on!r}: images have no validation split; use train")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    if cfg.resume and not cfg.out:
        raise ConfigError("--resume needs --out DIR, the folder of the run to continue")
    out, data_dir = (existing_parent(p) for p in (cfg.out or ".", cfg.data_dir))    # what exists of them
    if cfg.out:
        try:                        # made and removed, not os.access: root passes that even in /proc
            os.rmdir(tempfile.mkdtemp(dir=out))
        except OSError as e:        # not writable, or a file ("Not a directory")
            raise ConfigError(f"--out {cfg.out}: {out} is not writable ({e.strerror}); use another") from None
    if not os.path.isdir(data_dir) or cfg.download and not os.access(data_dir, os.W_OK):
        raise ConfigError(f"--data-dir {cfg.data_dir}: {data_dir} is not a {'writable ' * cfg.download}"
                          f"folder; give the folder that holds the data (or will, with --download)")
    npz = arrays or cfg.data_file.endswith(".npz") and os.path.isfile(cfg.data_file)
    if cfg.dataset == "npz" and not npz:
        raise ConfigError(f"--data-file {cfg.data_file!r}: --dataset npz needs an existing .npz file "
                          f"(README: your own recording)")
    if cfg.dataset == "phy" and not os.path.isdir(cfg.data_file):
        raise ConfigError(f"--data-file {cfg.data_file!r}: --dataset phy needs a Kilosort or Phy folder")
    if cfg.size and cfg.dataset != "synthetic":
        raise ConfigError(f"--size {cfg.size!r}: only --dataset synthetic takes a size")

def largest_setting(cfg):
    """What to lower when memory runs out: the setting that sizes tensors furthest above its preset."""
    preset = Config(dataset=cfg.dataset)
    name = max(("batch_size", "pool_size", "eval_batch_size", "hidden", "rep_dim", "proj_hidden", "proj_dim",
                "pred_hidden", "image_size"), key=lambda f: getattr(cfg, f) / max(1, getattr(preset, f)))
    return f"--{name.replace('_', '-')} {getattr(cfg, name)}"

def check_config(cfg, data, world):
    """What depends on the loaded data and the number of processes (before --out is touched)."""
    if cfg.method == "supervised" and (data.labels is None or world > 1 or cfg.resume):
        raise ConfigError("--method supervised needs labels, one process and no --resume")
    if cfg.batch_size > len(data):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} samples of "
                          f"{cfg.dataset} that training sees; use --batch-size {len(data)} or less")
    if cfg.batch_size % world or (cfg.method == "myow" and pool_size(cfg) % world):
        raise ConfigError(f"--batch-size {cfg.batch_size} and the pool (L = {pool_size(cfg)}) are global "
                          f"and must divide by the {world} processes")
    if cfg.method == "myow":
        L = pool_size(cfg)
        # candidates each anchor may ever mine among the training samples, by the mask (App. B), in
        # chunks of candidates: 256 anchors x a million samples would be 2 GB at once
        every = torch.arange(len(data), device=data.x.device)
        some = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:256].to(every.device)
        typical = int(sum(data.allowed(some, c).sum(1) for c in every.split(1 << 14)).median())
        if not 1 <= cfg.k <= min(L, typical):
            raise ConfigError(f"--k {cfg.k} is larger than the eligible pool: L = {L} candidates, and "
                              f"the mask (--min-gap-s {cfg.min_gap_s}) leaves a typical anchor {typical} "
                              f"of the {len(data)} training samples; lower --k or --min-gap-s")

# ==== Processes (torchrun), signals, checkpoints ====================================================
def setup_distributed(cfg):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    torch.backends.cudnn.benchmark = cuda                # every shape in a run is fixed: autotune once
    if cfg.threads or "OMP_NUM_THREADS" not in os.environ and cfg.arch == "mlp":   # beside other work, 2
        torch.set_num_threads(cfg.threads or 1)          # threads took the MLP 2-2.4 x as long (README)
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))                 # processes on this machine
    if cuda and here > torch.cuda.device_count():                    # one GPU per process
        raise ConfigError(f"torchrun started {here} processes on a machine with {torch.cuda.device_count()} "
                          f"GPU(s); use --nproc_per_node {torch.cuda.device_count()}, or --device cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # Ctrl-C, a scheduler, a closed terminal

class Stopped(Exception):
    """Stopped(signum, when): a signal stopped the run; exit status 128 + signum (130 SIGINT, 143 SIGTERM)."""

@contextmanager
def stop_on_signals(first):
    """The first stop signal asks training to stop after the epoch, with a checkpoint (`first` holds its
    number and time); a second ends the run at once, but a repeat within a second is the same request
    (torchrun forwards to its workers what a terminal or scheduler also sends them)."""
    def handler(signum, frame):
        if first and time.time() - first[1] > 1:
            raise Stopped(signum, "a second time: stopped at once, without a checkpoint of this epoch")
        if not first:
            first.extend([signum, time.time()])
            print(f"{signal.Signals(signum).name}: stopping after this epoch (again to stop at once)",
                  file=sys.stderr, flush=True)
    before = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)

def train_logged(cfg, data, device, state=None):
    """train with what a tool adds: --resume from a checkpoint, and after each epoch the means over steps
    and processes, a stop on a non-finite loss, the log, the checkpoint and log.jsonl, and a stop when a
    signal came (every process at the same epoch). Returns the online model and the last log record."""
    rank, world = rank_world()
    epochs, signalled, book = schedule(cfg, len(data))[1], [], {"start": 0, "t0": time.time(), "log": []}

    def resume(training):
        model, target, opt, index_gen = training
        for module, key in ((model, "model"), (target, "target"), (opt, "opt")):
            module.load_state_dict(state[key])
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        index_gen.set_state(rng["index"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        book["start"], book["log"] = state["epoch"], state["log"]
        return state["epoch"]

    def after_epoch(epoch, record, mined, training):
        model, target, opt, index_gen = training
        stop = torch.tensor(float(signalled[0] if signalled else 0), device=device)
        losses, same, mining = record["losses"], torch.zeros(2, device=device), cfg.method == "myow"
        for s, c, has in mined if mining and data.classes else []:   # App. F: mined views of its label
            same += torch.stack([((data.labels[s] == data.labels[c]) * has).sum(), has.sum()])
        if world > 1:                             # every rank stops together; logs cover all ranks
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            dist.all_reduce(losses)
            dist.all_reduce(same)
            losses /= world
        loss, loss_aug, loss_mined = losses.tolist()
        if not all(map(math.isfinite, (loss, loss_aug, loss_mined))):   # a NaN anywhere stays in the mean
            raise FloatingPointError(f"non-finite loss in epoch {epoch + 1} (mean loss {loss:.4g}: augmented-"
                                     f"view loss {loss_aug:.4g}, mined-view loss {loss_mined:.4g}, lambda "
                                     f"{record['lam']:.4g}); lower --lr. The last good checkpoint is kept.")
        same_label = 100 * same[0].item() / max(1, same[1].item()) if mining and data.classes else None
        rec = {"epoch": epoch + 1, "loss": loss, "loss_aug": loss_aug,
               "loss_mined": loss_mined if mining else None, "lr": record["lr"], "tau": record["tau"],
               "lambda": record["lam"], "mining_class_acc": same_label}
        book["log"].append(rec)
        done, took = epoch + 1 - book["start"], time.time() - book["t0"]           # this run's epochs
        if rank == 0 and (done == 1 or (epoch + 1) % max(1, epochs // 20) == 0 or epoch + 1 == epochs):
            values = " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "epoch" and v is not None)
            rate = done * record["steps"] * cfg.batch_size / took
            print(f"epoch {epoch + 1:4d}/{epochs} | {values} | {rate:,.0f} samples/s | "
                  f"ETA {took / done * (epochs - epoch - 1):.0f}s", flush=True)
        if cfg.out and (stop or (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == epochs):
            ckpt = {"model": model.state_dict(), "target": target.state_dict(), "opt": opt.state_dict(),
                    "epoch": epoch + 1, "log": book["log"], "rng": rng_states(index_gen),
                    "config": dataclasses.asdict(cfg)}
            if rank == 0:                         # the log of the epochs the checkpoint holds, no more
                save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), ckpt)
                lines = "".join(json.dumps(r) + "\n" for r in book["log"])
                write_atomic(os.path.join(cfg.out, "log.jsonl"), lines.encode())
        if stop:
            raise Stopped(int(stop), f"after epoch {epoch + 1}")
    with stop_on_signals(signalled):
        return train(cfg, data, device, after_epoch, resume if state else None), book["log"][-1]

def rng_states(index_gen):                      # every generator, for every rank (each has its own stream)
    states = {"torch": torch.get_rng_state(), "index": index_gen.get_state(),
              **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    if not dist.is_initialized():
        return [states]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered

def write_atomic(path, data):
    """Every file of a run is written so: to a temporary file, flushed to disk, renamed. A kill leaves the
    previous file whole; a failed write (a full disk) leaves no temporary file and ends in one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:                     # a failed write, or a second signal stopping at once
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise RunError(f"could not write {path}: {e.strerror or e}; the files already there are kept "
                           f"(free space or fix the folder, then continue with --resume)") from None
        raise

def save_checkpoint(path, state):
    buffer = io.BytesIO()            # serialised first: a failing disk then fails in write_atomic
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer())

def load_checkpoint(path, cfg):
    if not os.path.exists(path):
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}), perhaps truncated; "
                          f"delete it and start again with --overwrite") from None
    world = rank_world()[1]
    if len(state["rng"]) != world:          # each process has its own augmentation stream
        raise ConfigError(f"checkpoint {path} was written by {len(state['rng'])} process(es), this run has "
                          f"{world}; resume with torchrun --nproc_per_node {len(state['rng'])}")
    now = dataclasses.asdict(cfg)          # a resume may change Run's settings and where the data are
    fixed = {f.name for f in dataclasses.fields(Config)} - {"data_dir"}
    differ = [k for k, v in state["config"].items() if k in fixed and now.get(k) != v]
    if differ:
        k = differ[0]
        raise ConfigError(f"checkpoint {path} was written with --{k.replace('_', '-')} "
                          f"{state['config'][k]}, this run has {now.get(k)} ({len(differ)} field(s) differ: "
                          f"{', '.join(differ)}); resume with the same settings or use another --out")
    return state

# ==== The trained encoder outside the run: encoder.pt, load_encoder and fit =========================
def encoder_state(f, cfg, data):
    """encoder.pt: f's weights and what rebuilding and feeding it needs (settings, neurons kept, window,
    training statistics, image size)."""
    inputs = {"c_in": data.n_in, "mean": data.mean.cpu(), "std": data.std.cpu()}
    if isinstance(data, neural_data.NeuralSplit):
        inputs["keep"], inputs["offsets"] = torch.as_tensor(data.keep), data.offsets.cpu()
    else:
        inputs["size"], inputs["hw"] = data.size, list(data.x.shape[-2:])
    return {"format": "myow encoder 1", "config": dataclasses.asdict(cfg), "inputs": inputs,
            "encoder": {k: v.cpu() for k, v in f.state_dict().items()}}

def load_encoder(path, device="cpu"):
    """The encoder of a finished run (encoder.pt, or its contents) as a function from raw inputs to
    y = f(x), (n, D): firing rates (T, N) in Hz of the training recording's N neurons (the silent ones
    are dropped as in training; each bin with the bins before it, as training's window, the first bin
    repeating at the start), or uint8 images (n, C, H, W). Normalised with the training statistics;
    BatchNorm in eval mode. `f = myow.load_encoder("runs/c1/encoder.pt"); y = f(rates)`."""
    try:
        saved = path if isinstance(path, dict) else torch.load(path, map_location="cpu", weights_only=True)
        assert saved["format"] == "myow encoder 1"
        names = {f.name for f in dataclasses.fields(Config)}        # what an older version had goes
        cfg, inputs = Config(**{k: v for k, v in saved["config"].items() if k in names}), saved["inputs"]
        f = encoder(cfg, inputs["c_in"], cfg.sup_dropout if cfg.method == "supervised" else 0.0)[0]
        f.load_state_dict(saved["encoder"])
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not an encoder.pt written by myow.py ({type(e).__name__}: {e}); "
                         f"give the encoder.pt in the --out folder of a finished run") from None
    f.to(device).eval()
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}     # once, not a call
    neural = "keep" in inputs
    n_in = len(inputs["keep"]) if neural else inputs["c_in"]
    want = (f"firing rates (T, {n_in}) in Hz, the training recording's neurons in its order" if neural else
            f"uint8 images (n, {n_in}, {', '.join(map(str, inputs.get('hw', ['H', 'W'])))})")

    @torch.no_grad()
    def embed(x):
        try:
            x = torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x), device=device)
        except (TypeError, ValueError, RuntimeError):      # None, strings, ragged lists, objects
            raise ValueError(f"this encoder takes {want}; got a {type(x).__name__} that is not an array "
                             f"of numbers") from None
        if x.dtype == torch.bool or x.is_complex() or not neural and x.dtype != torch.uint8:
            raise ValueError(f"this encoder takes {want}; got dtype {x.dtype}")
        if x.shape[1:] != ((n_in,) if neural else (n_in, *inputs.get("hw", x.shape[2:]))):   # (C, H, W)
            raise ValueError(f"this encoder takes {want}, as in training; got shape {tuple(x.shape)}")
        if neural:
            x = neural_data.rates_as_inputs(x, inputs)                                  # (T, W x units)
        else:
            x = ImageSplit(x, None, inputs["mean"], inputs["std"], inputs["size"]).inputs(slice(None))
        return torch.cat([f(c).float() for c in x.split(1024)])
    return embed

def fit(rates, trial=None, time=None, labels=None, bin_s=None, **settings):
    """What `python myow.py --dataset npz` runs, on arrays in memory (a notebook): rates (T, N) in Hz and
    what an npz may hold beside them (README), settings by their flags' names (steps=150, out="runs/x").
    Returns the results (the JSON line's object) and the encoder as load_encoder returns it."""
    argv = ["--dataset", "npz"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    cfg = parse_config(argv, arrays=True)
    arrays = dict(firing_rates=rates, trial=trial, time=time, labels=labels, bin_s=bin_s)
    rec = neural_data.from_arrays("arrays", {k: np.asarray(v) for k, v in arrays.items() if v is not None})
    result, saved = run(cfg, rec)
    return result, saved and load_encoder(saved)

# ==== --out: the files of a run, never two runs in one folder nor one overwritten ===============
OUT_FILES = ("config.json", "log.jsonl", "results.json", "checkpoint.pt", "encoder.pt")

def prepare_out(cfg, rank):
    """One run a folder: rank 0 holds a lock on --out/.lock while it lives (the system releases it even at
    kill -9). A run is continued (--resume) or replaced (--overwrite), never overwritten silently; one
    stopped before its first checkpoint is started again. Returns the checkpoint to resume, the lock."""
    if not cfg.out:
        return None, None
    ours = [f for f in OUT_FILES if os.path.exists(os.path.join(cfg.out, f))]
    again = bool(ours) and set(ours) <= {"config.json", "log.jsonl"}      # started, nothing kept
    state = load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), cfg) if cfg.resume and not again else None
    if ours and not (cfg.resume or cfg.overwrite or again):
        raise ConfigError(f"--out {cfg.out} already holds a run ({', '.join(ours)}); continue it with "
                          f"--resume or replace it with --overwrite")
    lock = None
    if rank == 0:                                  # refusals above touch nothing; from here on, one run
        os.makedirs(cfg.out, exist_ok=True)
        lock = open(os.path.join(cfg.out, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)                           # the holder wrote its process id
            raise ConfigError(f"--out {cfg.out} is being written by another run (process "
                              f"{lock.read().strip()}); wait for it to end, or give another --out") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    if dist.is_initialized():
        dist.barrier()                             # every rank has looked before rank 0 writes
    if rank == 0:
        if cfg.overwrite and not cfg.resume or again:
            for f in ours:
                os.remove(os.path.join(cfg.out, f))
        config = json.dumps(dataclasses.asdict(cfg), indent=1)
        write_atomic(os.path.join(cfg.out, "config.json"), config.encode())
    return state, lock

def run(cfg, rec=None):
    """Data, checks, --out, the first line, training, the readout, the files, the JSON line (rec: from
    fit). Returns the results and encoder.pt's contents (rank 0; other ranks None)."""
    t_start = time.time()
    rank, world, device = setup_distributed(cfg)
    if cfg.dataset in NEURAL:
        rec, splits, _, pretrain = neural_data.load_neural(cfg, device, rec)
        about = neural_data.describe(rec, pretrain, cfg)
    else:
        splits = load_images(cfg, device)
        splits.insert(1, None)                                   # public train/test split, no validation
        pretrain = splits[0]
        about = f"images {tuple(splits[0].x.shape[1:])}"
    check_config(cfg, pretrain, world)
    state, lock = prepare_out(cfg, rank)
    with lock or nullcontext():                     # held until the run ends, however it ends
        trained_on = splits[0] if cfg.method == "supervised" else pretrain
        per_epoch, epochs, steps = schedule(cfg, len(trained_on))[:3]
        plan = f"; {steps:,} steps ({epochs:,} epochs of {per_epoch:,})" if cfg.method != "raw" else ""
        cpu = f" ({torch.get_num_threads()} CPU thread(s))" if device.type == "cpu" else ""
        if rank == 0:
            print(f"{cfg.dataset}: {about}, splits {[len(s) for s in splits if s]}, {cfg.method} on "
                  f"{world} x {device}{cpu}{plan}", flush=True)
        t0 = time.time()
        if cfg.method == "supervised":
            f, last = train_supervised(cfg, splits, device), {"mining_class_acc": None}
        elif cfg.method == "raw":                  # the floor: the same readout on the inputs themselves
            f, last = nn.Flatten(), {"mining_class_acc": None}
        else:
            model, last = train_logged(cfg, pretrain, device, state)
            f = model.net.f
        train_seconds = time.time() - t0
        if rank != 0:                    # wait for rank 0's evaluation: ranks that leave the process
            dist.barrier()               # group while another still works can abort at exit (gloo)
            return None
        t0 = time.time()
        feats = representations(f, splits)
        labels = [s and s.labels for s in splits]
        metrics = linear_eval(feats, labels, splits[0].task, cfg) if splits[0].labels is not None else {}
        if splits[0].task == "class" and splits[0].coarse is not None:          # CIFAR-20 (Table 1)
            coarse = [l if l is None else splits[0].coarse[l] for l in labels]
            metrics["test_acc_cifar20"] = linear_eval(feats, coarse, "class", cfg)["test_acc"]
        trained = cfg.method != "raw"                                  # the floor trains nothing
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # largest resident memory (Linux: KiB)
        result = {"dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "epochs": epochs * trained,
                  **metrics, "mining_class_acc": last["mining_class_acc"],
                  "world_size": world, "train_seconds": round(train_seconds, 2), "eval_seconds":
                  round(time.time() - t0, 2), "total_seconds": round(time.time() - t_start, 2),
                  "steps": steps * trained, "peak_host_mb": round(peak_kib / 2 ** 10)}
        if device.type == "cuda":
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        saved = encoder_state(f, cfg, pretrain) if trained else None        # raw has no encoder to keep
        if cfg.out:
            if saved:
                save_checkpoint(os.path.join(cfg.out, "encoder.pt"), saved)
            write_atomic(os.path.join(cfg.out, "results.json"), json.dumps(result, indent=1).encode())
        print(json.dumps(result), flush=True)
        if world > 1:
            dist.barrier()
        return result, saved

def stop_line(why, cfg, argv):
    """What a signal left: the checkpoint and the command that continues, or nothing and the same one."""
    here = [os.path.relpath(__file__)]
    if cfg and cfg.out and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        torchrun = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "1")]
        flags = [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
        command = shlex.join((torchrun if "RANK" in os.environ else ["python"]) + here + flags)
        return f"stopped: {why}; the checkpoint in {cfg.out} is kept; continue with: {command}"
    again = shlex.join(["python", *here, *argv])
    return f"stopped: {why}; nothing was kept yet; the same command starts again: {again}"

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = None

    def stop(signum, frame):                        # outside training, a signal stops at once
        raise Stopped(signum, "before the end of the run")
    before = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        cfg = parse_config(argv)
        run(cfg)
    except ConfigError as e:                    # a setting refused: argparse's status for usage errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (neural_data.DataError, RunError, FloatingPointError) as e:   # failed during the run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:                        # a signal: 128 + its number, as a shell reports
        signum, when = e.args
        if rank_world()[0] == 0:
            print(stop_line(f"{signal.Signals(signum).name} {when}", cfg, argv), file=sys.stderr)
        sys.exit(128 + signum)
    except RuntimeError as e:                   # out of memory: CUDA's own error, the CPU allocator's
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0]}); lower {largest_setting(cfg)}, the setting "
              f"that sizes this run's memory most; the last checkpoint in --out is kept", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
