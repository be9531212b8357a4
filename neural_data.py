"""Neural recordings for MYOW: binning, temporal splits, mining masks, the published data sets.

Every recording becomes a `Recording`: firing rates (T, N) in Hz, plus for each bin the trial it
belongs to and its time in seconds. Those two arrays are all that temporal jitter (Appendix J),
the mining mask (Appendix B) and a window of bins need, so reach trials and a continuous 12 h sleep
recording are handled by the same code: a continuous recording is one long trial, and a clock that
restarts within it begins another (a segment). Spike sorters' folders are read as they are found.

Published files (Azabou et al. 2021, data of nerdslab/myow-neuro) are downloaded on demand into
`data_dir` and checked against their SHA-256. The reach pickles were written with torch_geometric;
they are read with a restricted unpickler that admits only the handful of names they use.
`load_neural` turns a recording into the split tensors training reads (`NeuralSplit`).
"""
import ast
import hashlib
import io
import math
import os
import pickle
import shutil
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

class DataError(Exception):
    """Bad or missing data: the message says what was wrong and what to do."""

@dataclass
class Recording:
    name: str
    rates: np.ndarray       # (T, N) float32 firing rates in Hz, recording order
    trial: np.ndarray       # (T,) int64 trial id; a continuous recording is a single trial 0
    time: np.ndarray        # (T,) float64 seconds (from the trial's start for trial data)
    labels: np.ndarray | None  # (T,) int64 class (reach direction 0..7, arousal state), or (T, d)
    task: str               # float32 behaviour: 'reach' (8 directions), 'state', 'continuous' or 'none'
    bin_s: float            # bin width in seconds
    about: str = ""         # what the first line of a run should say of it (the labels read, the segments)

# ==== Binning and splits ===========================================================================
def bin_spikes(spike_times, units, n_units, edges, rate=False):
    """Spike counts (T, N) of spikes at `spike_times` (s) from `units` (ids 0..n_units-1) in the
    bins [edges[i], edges[i+1]); spikes outside the edges are ignored. rate=True divides by the
    bin width to give Hz. One `bincount` over (bin, unit) pairs, no Python loop over spikes."""
    spike_times, units, edges = np.asarray(spike_times), np.asarray(units), np.asarray(edges, float)
    b = np.searchsorted(edges, spike_times, side="right") - 1  # bin index of each spike
    keep = (b >= 0) & (b < len(edges) - 1) & (spike_times < edges[-1])
    counts = np.bincount(b[keep] * n_units + units[keep], minlength=(len(edges) - 1) * n_units)
    counts = counts.reshape(len(edges) - 1, n_units).astype(np.float32)
    return counts / np.diff(edges)[:, None].astype(np.float32) if rate else counts

FEW_TRIALS = 10    # fewer trials than this: one continuous recording, or a few sessions back to back

def temporal_split(trial, fractions=(0.7, 0.1, 0.2)):
    """Train/validation/test sample indices in recording order (Appendix D: 70/10/20). Whole trials go
    to one split; a recording of fewer than FEW_TRIALS trials is split by time instead."""
    trial = np.asarray(trial)
    groups = trial if len(np.unique(trial)) >= FEW_TRIALS else np.arange(len(trial))   # unit of splitting
    order = np.unique(groups, return_index=True)[1]
    ids = groups[np.sort(order)]                                  # groups in recording order
    n_train = int(round(fractions[0] * len(ids)))
    n_val = int(round(fractions[1] * len(ids)))
    parts = np.split(ids, [n_train, n_train + n_val])
    return tuple(np.flatnonzero(np.isin(groups, p)) for p in parts)

TICK = 1e-6     # seconds: times, windows and gaps are compared in whole microseconds, since in
                # floats 0.3 - 0.2 < 0.1 and a bin exactly 200 ms away would fall out of the window

def ticks(seconds):
    """Seconds as int64 microseconds (np.inf stays out: callers handle an infinite gap)."""
    return np.round(np.asarray(seconds, np.float64) / TICK).astype(np.int64)

def trial_axis(trial, time, gap):
    """Each sample's position (int64 microseconds) on one axis on which consecutive trials lie more
    than `gap` seconds apart, so "same trial and less than gap apart" becomes |a - b| < gap. gap =
    inf: the trial's rank, so "same trial" becomes |a - b| < 1. Samples in recording order, trials
    contiguous."""
    rank = np.r_[0, np.cumsum(np.diff(trial) != 0)]              # trial's position in the recording
    if np.isinf(gap):
        return rank
    t = ticks(time)
    t -= t.min()
    return rank * (t.max() + ticks(gap) + 1) + t

def jitter_bounds(trial, time, window):
    """For each sample, the index range [lo, hi] of samples in the same trial at most `window`
    seconds away (temporal jitter, Appendix D/J). Samples in recording order, trials contiguous."""
    key, w = trial_axis(trial, time, window), ticks(window)      # increasing, integers
    lo = np.searchsorted(key, key - w, side="left")
    hi = np.searchsorted(key, key + w, side="right") - 1
    return lo, hi

def mining_mask(axis_a, axis_c, min_gap):
    """(B, L) True where candidate c may be mined for anchor a (Appendix B): another trial, or the
    same trial at least `min_gap` seconds away; axis from `trial_axis`, compared as integers."""
    return (axis_a[:, None] - axis_c[None, :]).abs_() >= (1 if math.isinf(min_gap) else int(ticks(min_gap)))

# ==== Published recordings: download, checksum, restricted unpickling ==============================
REACH_URL = "https://github.com/nerdslab/myow-neuro/raw/main/data/mihi-chewie/processed/"
RODENT_URL = "https://github.com/nerdslab/myow-neuro/raw/main/data/rodent/"
FILES = {  # name -> (url, sha256), from ../shared/data/README.md
    "full-chewie-10032013-bin0.10-vel_thresh5.00.pkl":
        (REACH_URL, "2bf23f43a2f8e5f7794e9d1e3604c1dd8b222edca6b9980dcb9605ad12997adb"),
    "full-chewie-12192013-bin0.10-vel_thresh5.00.pkl":
        (REACH_URL, "62057a140c8c0e660b8cca2515317d583f83d2e362d04b166c789ba57aeca9b3"),
    "full-mihi-03032014-bin0.10-vel_thresh5.00.pkl":
        (REACH_URL, "aa53dffd7c7fea6787843221f2d4d01881befbc4c53a655fa9989cd5c837f729"),
    "fr_bins_n_4full.npy":
        (RODENT_URL, "75eb62fecd81899be546cf4770c0cf66afe4ae9f957b9bfdd5ebe5d0a00317bc"),
    "behav_states_n_4full.npy":
        (RODENT_URL, "7d0679a2a1b3a221b060cd7aa76ac59d371d74a8aad4c496b2559c3e23abd1ca"),
}
REACH = {"chewie1": "full-chewie-10032013-bin0.10-vel_thresh5.00.pkl",
         "chewie2": "full-chewie-12192013-bin0.10-vel_thresh5.00.pkl",
         "mihi1": "full-mihi-03032014-bin0.10-vel_thresh5.00.pkl"}

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def fetch(name, data_dir, download=True):
    """Path of the published file `name` in `data_dir`, downloaded if missing; refuses a file
    whose SHA-256 differs from the published one."""
    url, expected = FILES[name]
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        if not download:
            raise DataError(f"{path} not found: download {url + name} and place it in {data_dir}")
        os.makedirs(data_dir, exist_ok=True)
        tmp = path + ".part"
        try:
            with urllib.request.urlopen(url + name, timeout=60) as r, open(tmp, "wb") as fh:
                shutil.copyfileobj(r, fh)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)                                   # no partial file left behind
            raise DataError(f"could not download {url + name} ({e}); without internet, download it "
                            f"elsewhere and place it in {data_dir}") from None
        if sha256(tmp) != expected:
            os.remove(tmp)
            raise DataError(f"download of {name} has the wrong SHA-256; try again later")
        os.replace(tmp, path)
    digest = sha256(path)
    if digest != expected:
        raise DataError(f"{path} has SHA-256 {digest[:12]}..., not the published {expected[:12]}...: "
                        f"the file is corrupt or not the published one; delete it to download again")
    return path

class _Record:
    """Stand-in for torch_geometric's Data and GlobalStorage: keeps the pickled state."""

    def __setstate__(self, state):
        self.__dict__.update(state)

class ReachUnpickler(pickle.Unpickler):
    """Admits only the globals the published reach pickles name; anything else is refused, so a
    crafted file cannot run code. Tensors inside are legacy torch.save blobs, read with
    torch.load(weights_only=True), which is itself restricted to tensor rebuilding."""

    def find_class(self, module, name):
        import torch  # only needed for the reach files
        import torch._utils
        allowed = {
            ("torch_geometric.data.data", "Data"): _Record,
            ("torch_geometric.data.storage", "GlobalStorage"): _Record,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch.storage", "_load_from_bytes"):
                lambda b: torch.load(io.BytesIO(b), weights_only=True, map_location="cpu"),
            ("collections", "OrderedDict"): OrderedDict,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a reach pickle")
        return allowed[(module, name)]

def load_reach(path, name):
    with open(path, "rb") as f:
        trials = ReachUnpickler(f).load()["data"]
    fields = [t._store._mapping for t in trials]               # one dict of tensors per trial
    rates = np.concatenate([d["x"].numpy() for d in fields]).astype(np.float32)
    steps = np.concatenate([d["timestep"].numpy() for d in fields])
    trial = np.concatenate([np.full(len(d["x"]), i) for i, d in enumerate(fields)])
    labels = np.concatenate([d["y"].numpy() for d in fields]).astype(np.int64)
    return Recording(name, rates, trial.astype(np.int64), steps * 0.1, labels, "reach", 0.1)

def load_mouse(data_dir, download=True):
    counts = np.load(fetch("fr_bins_n_4full.npy", data_dir, download), allow_pickle=False)
    states = np.load(fetch("behav_states_n_4full.npy", data_dir, download), allow_pickle=False)
    rates = counts.T.astype(np.float32) / 4.0                   # (T, N) Hz in 4 s bins
    t = np.arange(len(rates), dtype=np.float64) * 4.0
    return Recording("mouse", rates, np.zeros(len(rates), np.int64), t, states.astype(np.int64),
                     "state", 4.0)

def load_npz(path):
    """A user's recording as `np.savez` wrote it: the arrays of `from_arrays` (README: your own recording)."""
    if not os.path.exists(path):
        raise DataError(f"--data-file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            f = {k: z[k] for k in z.files}
    except (ValueError, OSError, TypeError, AttributeError, EOFError) as e:    # not a zip of plain arrays
        raise DataError(f"--data-file {path} is not a NumPy .npz archive of plain arrays "
                        f"({type(e).__name__}); write it with np.savez (README)") from None
    return from_arrays(path, f)

def from_arrays(path, f):
    """A recording from arrays: `firing_rates` (T, N) in Hz and `trial` ids or `time` stamps (s), optional
    `labels`: (T,) integer classes, or floats (T,) or (T, d) of a continuous behaviour (decoded with R²);
    optional `bin_s`. `path` names where they came from in messages."""
    if "firing_rates" not in f or not ({"trial", "time"} & f.keys()):
        raise DataError(f"{path} holds {sorted(f)}; it needs 'firing_rates' (T, N) and 'trial' or 'time'")
    rates = np.asarray(f["firing_rates"], np.float32)
    if rates.ndim != 2:
        raise DataError(f"firing_rates in {path} has shape {rates.shape}; expected (T, N)")
    T = len(rates)
    trial = np.asarray(f.get("trial", np.zeros(T)), np.int64)
    bin_s = float(f.get("bin_s", 1.0))
    time = (np.asarray(f["time"], np.float64) if "time" in f
            else (np.arange(T) - trial_bounds(trial)[0]) * bin_s)       # bins since the trial's start
    for k, v in (("trial", trial), ("time", time)):
        if v.shape != (T,):
            raise DataError(f"{k} in {path} has shape {v.shape}; expected ({T},) like firing_rates")
    same, step = np.diff(trial) == 0, np.diff(time)
    if "bin_s" not in f and (step > 0).any():
        bin_s = float(np.median(step[step > 0]))                 # the time stamps' step
    if (same & (step == 0)).any():
        i = np.flatnonzero(same & (step == 0))[0]
        raise DataError(f"{path}: bins {i} and {i + 1} of one trial have the same time {time[i]} s; give "
                        f"each bin its own time, or separate trials with 'trial'")
    restart = same & (step < 0)              # a clock that restarts: a new segment, as a new trial is
    first = np.argmax(restart) + 1
    about = f"{restart.sum() + 1} segments (time restarts at bin {first})" if restart.any() else ""
    trial = np.r_[0, np.cumsum(~same | restart)]                  # trials (segments) 0, 1, ... in order
    labels, task = f.get("labels"), "none"
    if labels is not None:
        continuous = labels.dtype.kind == "f"                  # a behaviour, decoded with R²
        if labels.shape[:1] != (T,) or labels.ndim > 1 + continuous:
            raise DataError(f"labels in {path} has shape {labels.shape}; expected ({T},) integer classes, "
                            f"or ({T},) or ({T}, d) floats")
        labels = labels.reshape(T, -1).astype(np.float32) if continuous else labels.astype(np.int64)
        task = "continuous" if continuous else "state"
    return Recording(os.path.basename(path), rates, trial, time, labels, task, bin_s, about)

def trial_bounds(trial):
    """Each sample's first and last sample of its trial (trials contiguous)."""
    start = np.r_[0, np.flatnonzero(np.diff(trial)) + 1]       # first bin of each trial
    n = np.diff(np.r_[start, len(trial)])
    return np.repeat(start, n), np.repeat(start + n - 1, n)

def label_table(folder):
    """The cluster labels of a sorter's folder: {cluster id: label} from the first table found, a curated
    one (column `group`: Phy's cluster_group.tsv, cluster_info.tsv, Phy 1's cluster_groups.csv) before
    Kilosort's own (column `KSLabel`: its cluster_group.tsv copy, cluster_KSLabel.tsv), and its name;
    ({}, None) where there is none. Tab or comma separated; a blank label stays blank."""
    found = []
    for name in ("cluster_group.tsv", "cluster_info.tsv", "cluster_groups.csv", "cluster_KSLabel.tsv"):
        if os.path.exists(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as fh:
                rows = [line.rstrip("\r\n").replace(",", "\t").split("\t") for line in fh if line.strip()]
            head = [h.strip() for h in rows[0]] if rows else []
            ids = [c for c in ("cluster_id", "id") if c in head]
            found += [(column != "group", name, rows, head.index(ids[0]), head.index(column))
                      for column in ("group", "KSLabel") if column in head and ids]
    if not found:
        return {}, None
    _, name, rows, i, j = min(found, key=lambda t: t[0])                 # curated first, then in order
    try:
        return {int(r[i]): r[j].strip() if len(r) > j else "" for r in rows[1:]}, name
    except (ValueError, IndexError):
        raise DataError(f"{os.path.join(folder, name)}: a row without a whole-number cluster id; give the "
                        f"table Kilosort or Phy wrote") from None

def load_phy(folder, bin_s, groups=("good",), sample_rate=0.0):
    """A spike sorter's folder (Kilosort, Phy) binned at `bin_s` s: spike_times.npy in samples, (n,) or
    (n, 1), spike_clusters.npy (else spike_templates.npy), the sampling rate from params.py (read as data,
    never run) or `sample_rate` (--sample-rate; it wins). Units: the clusters the label table (label_table)
    names one of `groups`, in cluster-id order (a cluster it leaves out or blank is unsorted); with no
    table, every cluster. One continuous trial."""
    def path(*names):
        found = [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
        if not found:
            raise DataError(f"{folder} holds no {' or '.join(names)}: give the folder Kilosort or Phy wrote")
        return found[0]
    params = {}
    if os.path.exists(os.path.join(folder, "params.py")):
        for line in open(os.path.join(folder, "params.py")):
            key, _, value = line.partition("=")
            try:
                params[key.strip()] = ast.literal_eval(value.strip())   # literals only: nothing runs
            except (ValueError, SyntaxError):
                pass
    rate = sample_rate or params.get("sample_rate")
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise DataError(f"{folder} gives no sampling rate (no params.py with sample_rate); give the rate "
                        f"spike_times.npy counts samples at: --sample-rate HZ (Neuropixels: 30000)")
    samples = np.load(path("spike_times.npy"), allow_pickle=False).ravel().astype(np.int64)
    clusters = np.load(path("spike_clusters.npy", "spike_templates.npy"), allow_pickle=False).ravel()
    if len(samples) != len(clusters) or samples.min(initial=0) < 0:
        raise DataError(f"{folder}: {len(samples)} spike times (samples >= 0) and {len(clusters)} cluster "
                        f"ids; the files do not belong together")
    labels, table = label_table(folder)
    if table:
        units = np.array(sorted(c for c, g in labels.items() if g in groups), np.int64)
        counts = [f"{sum(labels[u] == g for u in units)} {g}" for g in groups]
        about = f"{table}: {' + '.join(counts)} units"
    else:
        units = np.unique(clusters).astype(np.int64)
        about = f"no cluster labels: all {len(units)} clusters"
    if not len(units):
        raise DataError(f"{folder}: no cluster is labelled {' or '.join(groups)} in {table}; try --units "
                        f"good,mua")
    unit = np.searchsorted(units, clusters)                      # position of each spike's unit
    mine = (unit < len(units)) & (units[np.minimum(unit, len(units) - 1)] == clusters)
    per_bin = float(rate) * bin_s                                # samples a bin: whole samples are
    per_bin = round(per_bin) if abs(per_bin - round(per_bin)) < 1e-6 else per_bin   # divided as integers
    b = (samples[mine] // per_bin).astype(np.int64)              # bins from the recording's first sample
    order = np.argsort(b, kind="stable")                         # unsorted times are sorted here
    b, unit, n, T = b[order], unit[mine][order], len(units), int(samples.max() // per_bin) + 1
    rates = np.empty((T, n), np.float32)
    for a in range(0, T, 1 << 14):                              # counts in chunks of bins: int64 counts
        lo, hi = np.searchsorted(b, [a, a + (1 << 14)])          # of a whole session would be 2 x the rates
        rates[a:a + (1 << 14)] = np.bincount((b[lo:hi] - a) * n + unit[lo:hi],
                                             minlength=min(1 << 14, T - a) * n).reshape(-1, n)
    rates /= bin_s
    return Recording(os.path.basename(os.path.normpath(folder)), rates, np.zeros(T, np.int64),
                     np.arange(T) * bin_s, None, "none", bin_s, about)

# ==== Synthetic center-out reaching (offline default) ==============================================
def synthetic_reach(seed=0, n_trials=240, n_neurons=96, bin_s=0.1):
    """Center-out reaches to 8 targets by cosine-tuned Poisson neurons (Georgopoulos et al. 1982):
    rate = baseline + gain * speed(t) * depth * cos(theta_target - theta_preferred). Each trial
    has a bell-shaped speed profile of random duration; the population gain drifts slowly from
    trial to trial, so that nearby trials look alike and distant ones do not (the nuisance that
    mining across trials has to see through). Deterministic by seed."""
    rng = np.random.default_rng(seed)
    preferred = rng.uniform(0, 2 * np.pi, n_neurons)
    baseline = rng.uniform(2, 15, n_neurons)                    # Hz
    depth = rng.uniform(5, 25, n_neurons)                       # Hz at peak speed
    targets = rng.integers(0, 8, n_trials)
    drift = 1 + 0.4 * np.sin(np.linspace(0, 3 * np.pi, n_trials) + rng.uniform(0, 2 * np.pi))
    rates, trial, time, labels = [], [], [], []
    for i, k in enumerate(targets):
        n_bins = rng.integers(5, 10)
        s = np.sin(np.linspace(0, np.pi, n_bins + 2)[1:-1]) ** 2         # speed profile, peak 1
        tuning = np.cos(2 * np.pi * k / 8 - preferred)                   # (N,)
        lam = baseline * drift[i] + drift[i] * s[:, None] * depth * tuning
        counts = rng.poisson(np.clip(lam, 0, None) * bin_s)
        rates.append(counts / bin_s)
        trial += [i] * n_bins
        time.append(np.arange(n_bins) * bin_s)
        labels += [k] * n_bins
    return Recording("synthetic", np.concatenate(rates).astype(np.float32), np.array(trial),
                     np.concatenate(time), np.array(labels), "reach", bin_s)

def synthetic_session(n_bins, n_neurons, seed=0, bin_s=0.01, chunk=1 << 14):
    """A laboratory's session at scale, with known structure: one continuous recording of n_bins bins
    of 10 ms from n_neurons Poisson neurons tuned to a smooth 2-D velocity (sums of slow sinusoids,
    0.05-0.5 Hz), rate = gain(t) * (baseline + depth * (v . preferred direction)), the gain drifting
    over 10 min. labels: the velocity (T, 2), decoded with R². Built in chunks of bins, whose float64
    temporaries stay small beside the float32 rates (16,384 bins x 1,000 neurons: 128 MB each)."""
    rng = np.random.default_rng(seed)
    preferred = rng.normal(size=(2, n_neurons)).astype(np.float32)
    preferred /= np.linalg.norm(preferred, axis=0)
    baseline, depth = rng.uniform(2, 15, n_neurons), rng.uniform(5, 25, n_neurons)   # Hz
    freq, phase = rng.uniform(0.05, 0.5, (2, 8)), rng.uniform(0, 2 * np.pi, (2, 8))
    t = np.arange(n_bins) * bin_s
    v = np.stack([np.sin(2 * np.pi * t[:, None] * f + p).sum(1) / 2 for f, p in zip(freq, phase)], 1)
    gain = 1 + 0.4 * np.sin(2 * np.pi * t / 600 + rng.uniform(0, 2 * np.pi))
    rates = np.empty((n_bins, n_neurons), np.float32)
    for a in range(0, n_bins, chunk):
        lam = gain[a:a + chunk, None] * (baseline + depth * (v[a:a + chunk] @ preferred))
        rates[a:a + chunk] = rng.poisson(np.clip(lam, 0, None) * bin_s) / bin_s
    return Recording("synthetic", rates, np.zeros(n_bins, np.int64), t, v.astype(np.float32), "continuous",
                     bin_s)

def validate(rec):
    """Refuse non-finite rates or behaviour and labels that are not classes 0, 1, 2, ... (reach: 0..7).
    In chunks of bins: a copy of a large recording would cost more than the recording."""
    for name, values, column in (("firing rate", rec.rates, "neuron"), ("behaviour", rec.labels, "column")):
        for start in range(0, len(values) if values is not None and values.dtype.kind == "f" else 0, 1 << 16):
            bad = np.argwhere(~np.isfinite(values[start:start + (1 << 16)]))   # (T, N) or (T, d)
            if len(bad):
                t, n = bad[0, 0] + start, bad[0, 1]
                raise DataError(f"{rec.name}: {name} at bin {t}, {column} {n} is {values[t, n]}; "
                                f"remove or interpolate non-finite values")
    if rec.labels is not None and rec.task != "continuous":
        bad = (rec.labels < 0) | ((rec.labels > 7) & (rec.task == "reach"))
        if bad.any():
            raise DataError(f"{rec.name}: label {rec.labels[bad][0]} is out of range; labels must be "
                            f"integer classes 0, 1, 2, ... (reach directions 0..7)")
    return rec

def load_recording(name, data_dir="data", data_file=None, seed=0, download=True, size="", bin_s=0.01,
                   units="good", sample_rate=0.0):
    """The recording called `name` (synthetic, chewie1, chewie2, mihi1, mouse, npz, phy); synthetic with
    a size 'T,N' is a continuous session (synthetic_session)."""
    if name == "synthetic":
        return synthetic_session(*map(int, size.split(",")), seed) if size else synthetic_reach(seed)
    if name == "phy":
        return load_phy(data_file, bin_s, units.split(","), sample_rate)
    if name in REACH:
        return load_reach(fetch(REACH[name], data_dir, download), name)
    if name == "mouse":
        return load_mouse(data_dir, download)
    if name == "npz":
        if not data_file:
            raise DataError("--dataset npz needs --data-file PATH.npz (see README, 'Your own recording')")
        return load_npz(data_file)
    raise DataError(f"unknown neural dataset {name!r}; choose synthetic, chewie1, chewie2, mihi1, mouse, npz "
                    f"or phy")

# ==== The splits as training sees them: tensors on the device ======================================
class NeuralSplit:
    """One split of a recording as tensors on the device, so batches are indexed, not loaded; with
    what temporal jitter (Appendix J), the mining mask (Appendix B) and a window of bins need."""

    def __init__(self, rec, idx, keep, mean, std, jitter_s, min_gap_s, context, device):
        # rec.rates holds the kept neurons only (load_neural drops the silent ones once): a view, no copy
        self.x = torch.as_tensor(rec.rates[rows(idx)], device=device)            # (N, units) Hz
        self.keep = keep                                   # (neurons,) bool: not silent in training
        self.mean, self.std = mean.to(device), std.to(device)       # (units,) of what training sees
        self.labels = None if rec.labels is None else torch.as_tensor(rec.labels[idx], device=device)
        self.task, self.min_gap_s = rec.task, min_gap_s
        self.classes = rec.labels is not None and rec.task != "continuous"   # labels to compare
        lo, hi = jitter_bounds(rec.trial[idx], rec.time[idx], jitter_s)
        self.axis = torch.as_tensor(trial_axis(rec.trial[idx], rec.time[idx], min_gap_s),
                                    device=device)         # (N,) int64, for the mask (microseconds)
        self.jitter_lo = torch.as_tensor(lo, device=device)                  # first sample in window
        self.jitter_n = torch.as_tensor(hi - lo + 1, device=device)          # samples in window
        first, last = trial_bounds(rec.trial[idx])                    # in this split: its trial's bounds
        self.first, self.last = torch.as_tensor(first, device=device), torch.as_tensor(last, device=device)
        self.offsets = torch.arange(1 - context, 1, device=device)    # (W,) the bin and those before it
        self.n_in = context * self.x.shape[1]                     # the encoder's inputs: W bins x units

    def __len__(self):
        return len(self.x)

    def window(self, idx):
        """(n, W) the samples each sample's input is made of: its bin and the W - 1 bins before it, in its
        trial and this split (at their start the first bin repeats). Causal: an embedding can run online."""
        return torch.minimum(idx[:, None] + self.offsets, self.last[idx, None]).maximum(self.first[idx, None])

    def inputs(self, idx):                                     # unaugmented, for evaluation: (n, W x units)
        return ((self.x[self.window(idx)] - self.mean) / self.std).flatten(1)

    def nearby(self, idx):
        """Temporal jitter (App. D.1, J): for each sample, a sample of the same trial at most
        jitter_s away, before or after, uniformly (the sample itself included)."""
        u = torch.rand(len(idx), device=self.x.device)
        return self.jitter_lo[idx] + (u * self.jitter_n[idx]).long()

    def allowed(self, s, c):                                   # (B, L) mining mask (App. B)
        return mining_mask(self.axis[s], self.axis[c], self.min_gap_s)

def rates_as_inputs(x, inputs):
    """A user's firing rates x (T, neurons) in Hz as training fed its samples to the encoder, by encoder.pt's
    `inputs` (on x's device): the neurons kept, z-scored with training's statistics, each bin with the bins
    before it (the first bin repeating at the start). Returns (T, W x units)."""
    if not torch.isfinite(x).all():
        t, n = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise ValueError(f"firing rate at row {t}, neuron {n} is {x[t, n].item()}; remove or interpolate "
                         f"non-finite values")
    x = (x.float()[:, inputs["keep"]] - inputs["mean"]) / inputs["std"]                     # (T, units)
    offsets = inputs.get("offsets", torch.zeros(1, dtype=torch.long, device=x.device))       # (W,) <= 0
    return x[(torch.arange(len(x), device=x.device)[:, None] + offsets).clamp(min=0)].flatten(1)

def rows(idx):
    """A split's sample indices as a slice where they are contiguous, as splits in recording order are:
    indexing then gives a view of the recording, not a copy (a large recording is one copy in memory)."""
    return slice(idx[0], idx[-1] + 1) if len(idx) and idx[-1] - idx[0] + 1 == len(idx) else idx

def describe(rec, split, cfg):
    """What the first line of a run says of a recording as `split` (training's) sees it: its size, what
    the recording said of itself, the window of bins, the gap of a recording split in time."""
    W, gap = len(split.offsets), split.min_gap_s
    about = [f"{len(rec.rates)} bins x {split.x.shape[1]} neurons", rec.about,
             f"x: the bin and {W - 1} before it (--context-s {cfg.context_s})" if W > 1 else "",
             f"split in time: mined views >= {gap:.4g} s away (--min-gap-s)" if gap != cfg.min_gap_s else ""]
    return ", ".join(a for a in about if a)

def load_neural(cfg, device, rec=None):
    """The recording (or `rec`, one given as arrays), its [train, val, test] splits, their sample indices,
    and the split that self-supervised training sees (train, or train + val without labels: --pretrain-on).
    A recording split in time (fewer than FEW_TRIALS trials) has few other trials to mine: with
    --min-gap-s inf its mask keeps samples of a trial 1/24 of its length apart (App. D.2: 30 min of 12 h)."""
    rec = validate(rec or load_recording(cfg.dataset, cfg.data_dir, cfg.data_file, size=cfg.size,
                                         bin_s=cfg.bin_s, units=cfg.units, sample_rate=cfg.sample_rate))
    # bins in the encoder's window; the raw floor reads out the bin's own rates (a window of them would
    # be T x W x N floats: 8 GB at a million bins of 200 neurons, killed for memory here)
    context = 1 if cfg.method == "raw" else max(1, round(cfg.context_s / rec.bin_s))
    idx = temporal_split(rec.trial)
    seen = np.concatenate(idx[:2]) if cfg.pretrain_on == "train+val" else idx[0]   # labels unused
    gap = cfg.min_gap_s
    if math.isinf(gap) and len(np.unique(rec.trial)) < FEW_TRIALS:     # split in time: 1/24 of its length
        gap = float(sum(np.ptp(rec.time[rec.trial == t]) for t in np.unique(rec.trial))) / 24
    # z-scored with the statistics of the samples training sees (never test), as the authors' code;
    # on Mouse-CA1 validation +0.8 F1 over train-only statistics (README)
    rec.rates = np.ascontiguousarray(rec.rates)     # a sample a row (Mouse-CA1's is transposed): splits
    rates = rec.rates[rows(seen)]                   # are contiguous views, statistics as on a copy
    std = rates.std(0)
    keep = std > 0          # neurons silent throughout training carry nothing (data README)
    mean, std = torch.as_tensor(rates.mean(0)[keep]), torch.as_tensor(std[keep])
    if not keep.all():
        rec.rates = rec.rates[:, keep]                          # one copy, once; the full one goes
    splits = [NeuralSplit(rec, i, keep, mean, std, cfg.jitter_s, gap, context, device) for i in idx]
    pretrain = splits[0]
    if cfg.pretrain_on == "train+val":
        pretrain = NeuralSplit(rec, seen, keep, mean, std, cfg.jitter_s, gap, context, device)
    return rec, splits, idx, pretrain
