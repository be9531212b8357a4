"""Properties of MYOW that fail when the method is wrong. Run: python -m pytest -q test_myow.py"""
import copy
import dataclasses
import errno
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import myow
import neural_data as nd

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")


def run_cli(*args, timeout=240):
    p = subprocess.run([sys.executable, os.path.join(HERE, "myow.py"), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=HERE)
    return p


def cli(capsys, *args):
    """The command line's main in this process (no interpreter and torch to start, about 2 s a call): its
    exit status and output as run_cli gives them; the thread count is put back as it was."""
    threads = torch.get_num_threads()
    try:
        myow.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


# --- the loss, eq. (1) -------------------------------------------------------------------------
def test_loss_is_negative_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    closed = -(p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))
    torch.testing.assert_close(myow.d(p, z), closed)
    torch.testing.assert_close(myow.d(p, 3 * p), -torch.ones(7))            # scale-free, min -1
    torch.testing.assert_close(myow.d(p, -p), torch.ones(7))


def test_target_side_gets_no_gradient():
    cfg = myow.Config(rep_dim=4, hidden=8, pred_hidden=8)
    model, target = myow.build_networks(cfg, SimpleNamespace(n_in=6))
    assert not any(t.requires_grad for t in target.parameters())
    x = torch.randn(10, 6)
    y, p, r_v = model(x, 6, slice(6, 10))
    assert p.shape == (6, 4) and r_v.shape == (4, 4) and y.shape == (10, 4)


# --- target network, eq. (2) ------------------------------------------------------------------
def test_target_starts_equal_and_follows_eq2():
    cfg = myow.Config(rep_dim=4, hidden=8, pred_hidden=8)
    model, target = myow.build_networks(cfg, SimpleNamespace(n_in=6))
    for a, b in zip(model.net.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    xi, theta = myow.ema_tensors(target), myow.ema_tensors(model.net)
    with torch.no_grad():
        for t in theta:
            t.add_(torch.randn_like(t))
    before = [t.clone() for t in xi]
    tau = 0.9
    myow.update_target(xi, theta, tau)
    for new, old, th in zip(xi, before, theta):
        torch.testing.assert_close(new, tau * old + (1 - tau) * th, rtol=0, atol=1e-6)
    assert len(xi) == len(list(target.parameters())) + 2 * 4           # + BN running mean/var


# --- mining (section 2.2, Appendix B) ---------------------------------------------------------
def test_mining_never_picks_masked_and_picks_among_true_k_nearest():
    g = torch.Generator().manual_seed(1)
    B, L, D, k = 40, 30, 8, 5
    ya, yp = torch.randn(B, D, generator=g), torch.randn(L, D, generator=g)
    allowed = torch.rand(B, L, generator=g) < 0.5
    allowed[0] = False                        # no candidate at all
    allowed[1] = False
    allowed[1, [3, 17]] = True                # fewer than k candidates
    sim = torch.nn.functional.cosine_similarity(ya[:, None], yp[None], dim=-1).numpy()
    seen = [set() for _ in range(B)]
    for it in range(200):                     # the training loop passes 1/0 floats, users may pass bools
        j, has = myow.mine(ya, yp, allowed.float() if it % 2 else allowed, k)
        assert not has[0] and has[1:].all()
        for i in range(1, B):
            ok = np.flatnonzero(allowed[i].numpy())
            top = set(ok[np.argsort(-sim[i, ok])[:k]])          # brute-force k nearest allowed
            assert allowed[i, j[i]] and int(j[i]) in top
            seen[i].add(int(j[i]))
    assert seen[1] == {3, 17}
    assert all(len(seen[i]) == min(k, int(allowed[i].sum())) for i in range(2, B))   # uniform pick


def test_mining_mask_is_another_trial_or_far_enough_in_time():
    trial = np.repeat(np.arange(7), 40)
    t = np.tile(np.arange(40) * 100.0, 7)                           # 0 .. 3900 s in every trial
    for gap in (math.inf, 1800.0, 250.0):                           # reach (App. D.1), sleep (D.2)
        m = nd.mining_mask(torch.as_tensor(nd.trial_axis(trial, t, gap)),
                           torch.as_tensor(nd.trial_axis(trial, t, gap)), gap)
        truth = (trial[:, None] != trial[None]) | (np.abs(t[:, None] - t[None]) >= gap)
        assert m.dtype == torch.bool and np.array_equal(m.numpy(), truth)


def recordings_on_a_grid():
    """(name, trial, time in s, integer milliseconds of each bin, window s, gap s): the published
    recordings as loaded, and a continuous recording of 10 ms bins whose float times are not exact."""
    out = []
    if os.path.exists(os.path.join(SHARED, nd.REACH["chewie1"])):
        rec = nd.load_recording("chewie1", SHARED, download=False)
        out += [("chewie1", rec.trial, rec.time, 0.2, math.inf), ("chewie1", rec.trial, rec.time, 0.2, 0.3)]
    if os.path.exists(os.path.join(SHARED, "fr_bins_n_4full.npy")):
        rec = nd.load_recording("mouse", SHARED, download=False)
        out += [("mouse", rec.trial, rec.time, 12.0, 1800.0)]
    rec = nd.synthetic_reach()
    out += [("synthetic", rec.trial, rec.time, 0.2, math.inf)]
    T = 6000                                                        # 60 s of 10 ms bins
    out += [("10 ms", np.zeros(T, np.int64), np.arange(T) * 0.01, 0.2, 0.3)]
    return [(name, trial, time, np.rint(time * 1000).astype(np.int64), w, g) for name, trial, time, w, g in out]


@pytest.mark.parametrize("case", recordings_on_a_grid(), ids=lambda c: f"{c[0]}-gap{c[5]}")
def test_jitter_window_and_mask_match_the_definition_sample_by_sample(case):
    """App. D: x' is a sample of the same trial within 200 ms (12 s for sleep); a mined view is of
    another trial, or of the same trial at least the gap away (30 min for sleep). Read on integer
    milliseconds, sample by sample: every window and every mask entry. (On 100 ms bins in floats
    0.3 - 0.2 != 0.1: 253 Chewie-1 windows were too narrow before the comparison was made on integers.)"""
    name, trial, time, ms, window, gap = case
    assert np.abs(ms / 1000 - time).max() < 1e-9                    # the bins lie on a millisecond grid
    lo, hi = nd.jitter_bounds(trial, time, window)
    w_ms = round(window * 1000)
    for a in range(len(trial)):
        members = np.flatnonzero((trial == trial[a]) & (np.abs(ms - ms[a]) <= w_ms))
        assert (lo[a], hi[a]) == (members[0], members[-1]) and len(members) == hi[a] - lo[a] + 1, (name, a)
    axis = torch.as_tensor(nd.trial_axis(trial, time, gap))
    for rows in np.array_split(np.arange(len(trial)), max(1, len(trial) // 1000)):
        truth = trial[rows, None] != trial[None]
        if not math.isinf(gap):
            truth |= np.abs(ms[rows, None] - ms[None]) >= round(gap * 1000)
        assert np.array_equal(nd.mining_mask(axis[rows], axis, gap).numpy(), truth), name


# --- the method alone: the lines of myow.py above the banner --------------------------------------
def test_the_method_above_the_banner_runs_alone_and_gives_the_accuracy_of_the_command(tmp_path):
    """The lines above the banner, saved alone as method.py beside neural_data.py, load no name that
    is defined below it, and the README's snippet runs on them Algorithm 1 and the readout with
    exactly the test accuracy of `python myow.py` (same thread count)."""
    import ast
    import shutil
    text = open(os.path.join(HERE, "myow.py")).read()
    lines = text.splitlines()
    banner = next(i for i, line in enumerate(lines) if "the method ends here" in line)
    tree = ast.parse(text)
    below = {n.name for n in tree.body if n.lineno > banner and isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    below |= {t.id for n in tree.body if n.lineno > banner for t in getattr(n, "targets", [])
              if isinstance(t, ast.Name)}
    crossing = {(n.lineno, n.id) for top in tree.body if top.lineno <= banner for n in ast.walk(top)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in below}
    assert not crossing and len(below) > 30, crossing
    (tmp_path / "method.py").write_text("\n".join(lines[:banner]) + "\n")
    shutil.copy(os.path.join(HERE, "neural_data.py"), tmp_path)
    readme = open(os.path.join(HERE, "README.md")).read()
    snippet = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "method as m" in b][0]
    (tmp_path / "snippet.py").write_text(snippet)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    alone = subprocess.run([sys.executable, "snippet.py"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert alone.returncode == 0, alone.stderr
    full = subprocess.run([sys.executable, os.path.join(HERE, "myow.py")], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert full.returncode == 0, full.stderr
    assert float(alone.stdout.split()[-1]) == json.loads(full.stdout.splitlines()[-1])["test_acc"]
    epoch_1 = full.stdout.splitlines()[1]               # the first epoch is printed: its ETA is the time
    assert epoch_1.startswith("epoch    1/300 | loss ") and re.search(r"\| ETA \d+s$", epoch_1), epoch_1


# --- augmentations (Appendix D.1, J) ----------------------------------------------------------
def make_split(cfg, rec):
    idx = np.arange(len(rec.rates))
    keep = np.ones(rec.rates.shape[1], bool)
    return nd.NeuralSplit(rec, idx, keep, torch.zeros(keep.sum()), torch.ones(keep.sum()),
                          cfg.jitter_s, cfg.min_gap_s, 1, torch.device("cpu"))


def test_augmentation_randomness_is_per_sample():
    rec = nd.Recording("toy", np.full((50, 400), 10.0, np.float32), np.repeat(np.arange(5), 10),
                       np.tile(np.arange(10) * 0.1, 5), None, "none", 0.1)
    cfg = myow.Config(noise_p=0.0, pepper_p=0.0)
    data = make_split(cfg, rec)
    torch.manual_seed(0)
    x = myow.augment_neural(data, torch.zeros(2000, dtype=torch.long), cfg)
    drop = (x == 0).float().mean(1)                                 # dropout rate of each view
    assert drop.max() <= 0.3 and drop.std() > 0.04                 # rates differ within the batch
    assert abs(drop.mean() - 0.1) < 0.01                            # U[0, 0.2] has mean 0.1
    cfg = myow.Config(dropout_max=0.0, pepper_p=0.0, noise_p=0.5, jitter_s=0.0)
    x = myow.augment_neural(data, torch.zeros(2000, dtype=torch.long), cfg) - 10
    noisy = x.abs().sum(1) > 0
    assert 0.45 < noisy.float().mean() < 0.55                       # p = 0.5 per sample
    assert abs(x[noisy].std() - 1.5) < 0.02
    cfg = myow.Config(dropout_max=0.0, noise_p=0.0, pepper_p=0.5, jitter_s=0.0)
    x = myow.augment_neural(data, torch.zeros(2000, dtype=torch.long), cfg) - 10
    hit = x.sum(1) > 0
    assert 0.45 < hit.float().mean() < 0.55
    assert set(x.unique().tolist()) == {0.0, 1.5} and abs((x[hit] > 0).float().mean() - 0.3) < 0.01


def test_positive_pair_is_the_anchor_and_a_bin_at_most_the_window_away():
    """App. D.1: x is the anchor's own bin, x' one of the same trial at most 200 ms away, before or
    after, uniformly: the largest |t(x) - t(x')| is 200 ms, never more, in both directions."""
    rec = nd.synthetic_reach()
    cfg = myow.Config(dropout_max=0.0, noise_p=0.0, pepper_p=0.0)   # the views are the bins themselves
    data = make_split(cfg, nd.Recording("toy", np.arange(len(rec.rates), dtype=np.float32)[:, None].repeat(3, 1),
                                        rec.trial, rec.time, rec.labels, "reach", 0.1))
    _, online, target, _ = myow.setup_training(cfg, data, torch.device("cpu"))
    seen = []
    views = lambda data, idx, cfg, t_m=False: seen.append(idx) or myow.augment(data, idx, cfg, t_m)
    torch.manual_seed(0)
    s = torch.arange(len(data))
    for _ in range(100):
        myow.myow_step(cfg, data, online, target, s[:512], s[:512], 1.0, views)
    x, x2 = torch.stack([v[:512] for v in seen]), torch.stack([v[512:] for v in seen])    # (100, 512)
    assert torch.equal(x, s[:512].expand_as(x))                         # x: the anchor itself
    trial, ms = torch.as_tensor(rec.trial), torch.as_tensor(np.rint(rec.time * 1000).astype(np.int64))
    assert torch.equal(trial[x2], trial[x])                             # x': the same trial
    offset = ms[x2] - ms[x]
    assert offset.abs().max() == 200 and offset.min() == -200         # before and after, at most 200 ms
    lo, hi = (torch.as_tensor(v) for v in nd.jitter_bounds(rec.trial, rec.time, 0.2))
    counts = torch.zeros(512, 5).index_put_((x.flatten(), (x2 - lo[x]).flatten()), torch.ones(x.numel()),
                                            accumulate=True)            # (anchor, place in its window)
    width = (hi - lo + 1)[:512, None]
    expected = 100 / width.float()                                      # uniform over each window
    assert ((counts - expected).abs() <= 5 * expected.sqrt())[torch.arange(5) < width].all()
    assert (counts[torch.arange(5) >= width] == 0).all()


def test_a_window_is_the_bin_and_those_before_it_in_its_trial_and_split_sample_by_sample():
    """--context-s: x is a sample's bin and the W - 1 bins before it, never another trial's, another
    split's or a later bin; at a trial's or split's start the first bin repeats. Read against a brute
    force over every sample of every split of a recording with trials and one split in time."""
    for trial in (np.repeat(np.arange(60), 7), np.zeros(500, np.int64)):       # trials; one recording
        T = len(trial)
        rec = nd.Recording("toy", np.arange(T, dtype=np.float32)[:, None] * [1, -1], trial, np.arange(T) * 0.01,
                           None, "none", 0.01)
        cfg = myow.Config(dataset="npz")
        rec_idx = nd.temporal_split(trial)
        for idx in rec_idx:
            split = nd.NeuralSplit(rec, idx, np.ones(2, bool), torch.zeros(2), torch.ones(2), 0.02, math.inf,
                                   5, torch.device("cpu"))
            got = split.window(torch.arange(len(idx)))                       # (n, 5) positions in the split
            for a in range(len(idx)):
                mine = [b for b in range(len(idx)) if trial[idx[b]] == trial[idx[a]] and a - 4 <= b <= a]
                want = [max(a + o, mine[0]) for o in range(-4, 1)]
                assert got[a].tolist() == want, (a, got[a], want)
            x = split.inputs(torch.arange(len(idx))).view(len(idx), 5, 2)    # the rates of those bins
            assert torch.equal(x[:, :, 0], torch.as_tensor(idx, dtype=torch.float32)[got])
        assert cfg.context_s == 0.1 and round(cfg.context_s / rec.bin_s) == 10      # the default: 10 of 10 ms


def test_augmentations_of_a_window_drop_and_pepper_neurons_in_all_its_bins_and_noise_each_bin():
    rec = nd.Recording("toy", np.full((400, 300), 10.0, np.float32), np.zeros(400, np.int64), np.arange(400) * 0.01,
                       None, "none", 0.01)
    split = nd.NeuralSplit(rec, np.arange(400), np.ones(300, bool), torch.zeros(300), torch.ones(300), 0.2,
                           math.inf, 4, torch.device("cpu"))
    torch.manual_seed(0)
    idx = torch.arange(10, 400)
    for flags in (dict(noise_p=0.0, pepper_p=0.0), dict(noise_p=0.0, dropout_max=0.0)):   # dropout; pepper
        x = myow.augment_neural(split, idx, myow.Config(**flags)).view(len(idx), 4, 300) - 10   # (n, W, N)
        changed = x != 0
        assert 0.02 < changed.float().mean() < 0.3, flags
        assert torch.equal(changed.all(1), changed.any(1)), flags             # a neuron in all bins or none
    x = myow.augment_neural(split, idx, myow.Config(pepper_p=0.0, dropout_max=0.0, noise_p=1.0)).view(-1, 4, 300)
    assert (x[:, 1:] != x[:, :1]).float().mean() > 0.99                      # noise: each bin its own


# --- schedules --------------------------------------------------------------------------------
def test_schedule_end_points():
    assert myow.tau_at(0, 1000, 0.98) == pytest.approx(0.98)
    assert myow.tau_at(1000, 1000, 0.98) == pytest.approx(1.0)
    assert myow.lr_at(99, 1000, 100, 0.02) == pytest.approx(0.02)          # end of warm-up
    assert myow.lr_at(0, 1000, 100, 0.02) == pytest.approx(0.0002)
    assert myow.lr_at(1000, 1000, 100, 0.02) == pytest.approx(0.0, abs=1e-12)
    assert myow.lr_at(550, 1000, 100, 0.02) == pytest.approx(0.01)         # half-way in cosine
    assert myow.lambda_at(0, 10, 1.0) == 0.0 and myow.lambda_at(5, 10, 1.0) == 0.5
    assert myow.lambda_at(10, 10, 1.0) == 1.0 and myow.lambda_at(500, 10, 1.0) == 1.0
    assert myow.tau_at(500, 1000, 0.98, 0.98) == myow.tau_at(1000, 1000, 0.98, 0.98) == pytest.approx(0.98)
    assert myow.tau_at(500, 1000, 0.98, 0.99) == pytest.approx(0.985)    # half-way up the cosine


def test_tau_schedule_per_domain():
    """Every preset raises tau along a cosine from its base value to 1 at the last step: 0.98 for
    neural data (App. D), 0.996 for images (App. C); --tau-schedule constant holds it (README)."""
    for argv, base in (([], 0.98), (["--dataset", "mouse"], 0.98), (["--dataset", "cifar10"], 0.996),
                       (["--dataset", "dsprites"], 0.996), (["--tau", "0.99"], 0.99)):
        cfg = myow.parse_config(argv)
        assert cfg.tau == base and cfg.tau_schedule == "cosine", argv
    for schedule in ("cosine", "constant"):             # what training applies, step by step
        cfg = myow.parse_config(["--tau-schedule", schedule, "--epochs", "4", "--warmup-epochs", "1"])
        pretrain = nd.load_neural(cfg, torch.device("cpu"))[3]
        taus = []
        myow.train(cfg, pretrain, torch.device("cpu"), lambda epoch, rec, *a: taus.append(rec["tau"]))
        total = 4 * (len(pretrain) // cfg.batch_size)                  # steps; logged: each epoch's last
        want = [myow.tau_at(e * total // 4 - 1, total, 0.98, 1.0 if schedule == "cosine" else 0.98)
                for e in (1, 2, 3, 4)]
        assert taus == pytest.approx(want) and (taus[-1] > 0.99) == (schedule == "cosine")
    with pytest.raises(myow.ConfigError, match="tau-schedule"):
        myow.parse_config(["--tau-schedule", "linear"])


def test_pretraining_on_train_and_val_adds_val_samples_never_test():
    cfg = myow.parse_config(["--pretrain-on", "train+val"])
    rec, splits, idx, pretrain = nd.load_neural(cfg, torch.device("cpu"))
    assert len(pretrain) == len(splits[0]) + len(splits[1])
    assert torch.equal(pretrain.x, torch.cat([splits[0].x, splits[1].x]))  # same inputs, same order
    assert torch.equal(pretrain.mean, splits[0].mean)                # normalised by train statistics
    views = myow.augment(pretrain, torch.arange(len(pretrain)), cfg)         # jitter stays within its split
    assert torch.isfinite(views).all()
    assert not set(idx[2]) & set(np.concatenate(idx[:2]))
    _, splits, _, pretrain = nd.load_neural(myow.parse_config(["--pretrain-on", "train"]), torch.device("cpu"))
    assert pretrain is splits[0]


# --- evaluation -------------------------------------------------------------------------------
def test_angle_metrics():
    labels = torch.zeros(4, dtype=torch.long) + 7                    # direction 7: -pi/4
    ang = torch.tensor([-math.pi / 4, -math.pi / 4 + 0.39, -math.pi / 4 - 0.5, 2 * math.pi - math.pi / 4])
    out = torch.stack([torch.cos(ang), torch.sin(ang)], 1)[None]
    sc = myow.scores(out, labels, "reach", 8)
    assert sc["acc"].item() == 75.0                                  # pi/8 = 0.3927
    assert sc["delta_acc"].item() == 100.0                           # 3 pi/16 = 0.589


def test_weighted_f1_matches_definition():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    p = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2, 2])
    f1 = {0: 2 * 2 / (2 * 2 + 1 + 1), 1: 2 * 1 / (2 + 1 + 1), 2: 2 * 4 / (8 + 1 + 1)}
    expected = (3 * f1[0] + 2 * f1[1] + 5 * f1[2]) / 10
    assert myow.weighted_f1(p[None], y, 3).item() == pytest.approx(expected)
    # a class of validation that the training labels (the head's outputs) lack: its F1 is 0, its weight counts
    assert myow.weighted_f1(p[None] % 2, y, 2).item() == pytest.approx((3 * 4 / 11 + 2 * 2 / 4) / 10)


def test_linear_eval_decodes_perfect_features():
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 8, (n,), generator=g) for n in (300, 60, 60)]
    feats = [torch.cat([torch.nn.functional.one_hot(l, 8).float(), torch.randn(len(l), 4, generator=g)], 1)
             for l in labels]
    res = myow.linear_eval(feats, labels, "reach", myow.Config(eval_epochs=200))
    assert res["test_acc"] > 95
    res = myow.linear_eval(feats, labels, "state", myow.Config(eval_epochs=200))
    assert res["test_f1"] > 95


# --- neural_data ------------------------------------------------------------------------------
def test_binning_matches_a_loop():
    rng = np.random.default_rng(0)
    times, units = rng.uniform(-1, 11, 5000), rng.integers(0, 7, 5000)
    edges = np.linspace(0, 10, 41)
    counts = nd.bin_spikes(times, units, 7, edges)
    loop = np.zeros((40, 7))
    for t, u in zip(times, units):
        for b in range(40):
            if edges[b] <= t < edges[b + 1]:
                loop[b, u] += 1
    assert (counts == loop).all()
    assert np.allclose(nd.bin_spikes(times, units, 7, edges, rate=True), loop / 0.25)


def test_splits_are_disjoint_ordered_and_keep_trials_whole():
    trial = np.repeat(np.arange(20), 5)
    tr, va, te = nd.temporal_split(trial)
    assert len(np.intersect1d(tr, va)) == len(np.intersect1d(va, te)) == 0
    assert len(tr) + len(va) + len(te) == 100
    assert tr.max() < va.min() and va.max() < te.min()                # recording order
    assert len(np.unique(trial[tr])) == 14 and len(np.unique(trial[va])) == 2
    assert not set(trial[tr]) & set(trial[va]) and not set(trial[va]) & set(trial[te])
    tr, va, te = nd.temporal_split(np.zeros(1000))                   # continuous: split by time
    assert (len(tr), len(va), len(te)) == (700, 100, 200) and tr.max() < va.min() < te.min()


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_reach_unpickler_refuses_crafted_pickle(tmp_path):
    blob = pickle.dumps({"data": [Boom()]})
    with pytest.raises(pickle.UnpicklingError, match="system"):
        nd.ReachUnpickler(__import__("io").BytesIO(blob)).load()


def test_checksum_mismatch_is_refused(tmp_path):
    name = "fr_bins_n_4full.npy"
    np.save(tmp_path / name, np.zeros((42, 10), np.int32))
    with pytest.raises(nd.DataError, match="SHA-256"):
        nd.fetch(name, str(tmp_path), download=False)
    with pytest.raises(nd.DataError, match="place it in"):
        nd.fetch("behav_states_n_4full.npy", str(tmp_path), download=False)


def test_synthetic_is_deterministic():
    a, b = nd.synthetic_reach(3), nd.synthetic_reach(3)
    assert np.array_equal(a.rates, b.rates) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(nd.synthetic_reach(4).rates, a.rates)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, nd.REACH["chewie1"])),
                    reason="Chewie-1 not in ../shared/data")
def test_chewie1_loads_with_documented_shapes():
    rec = nd.load_recording("chewie1", SHARED, download=False)
    assert rec.rates.shape == (895, 174) and rec.rates.dtype == np.float32
    assert len(np.unique(rec.trial)) == 159 and set(np.unique(rec.labels)) == set(range(8))
    for i in np.unique(rec.trial):                                   # one direction per trial
        assert len(np.unique(rec.labels[rec.trial == i])) == 1


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "fr_bins_n_4full.npy")),
                    reason="Mouse-CA1 not in ../shared/data")
def test_mouse_loads_with_documented_shapes():
    rec = nd.load_recording("mouse", SHARED, download=False)
    assert rec.rates.shape == (10800, 42)
    assert np.bincount(rec.labels).tolist() == [3832, 6206, 762]
    assert rec.time[-1] == 4 * 10799


def test_an_npz_without_bin_s_takes_the_step_of_its_time_stamps(tmp_path):
    rates = np.ones((50, 3), np.float32)
    np.savez(tmp_path / "a.npz", firing_rates=rates, time=np.r_[np.arange(25), np.arange(25)] * 0.01)
    np.savez(tmp_path / "b.npz", firing_rates=rates, trial=np.zeros(50), bin_s=0.1)
    assert nd.load_npz(str(tmp_path / "a.npz")).bin_s == pytest.approx(0.01)   # the restart is not a step
    assert nd.load_npz(str(tmp_path / "b.npz")).bin_s == 0.1


def test_npz_recording_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rates = rng.poisson(5, (300, 12)).astype(np.float32)
    np.savez(tmp_path / "r.npz", firing_rates=rates, time=np.arange(300) * 0.5,
             labels=rng.integers(0, 3, 300))
    rec = nd.load_recording("npz", data_file=str(tmp_path / "r.npz"))
    assert rec.rates.shape == (300, 12) and rec.task == "state" and (rec.trial == 0).all()
    np.savez(tmp_path / "bad.npz", rates=rates)
    with pytest.raises(nd.DataError, match="firing_rates"):
        nd.load_recording("npz", data_file=str(tmp_path / "bad.npz"))


def write_phy(folder, samples, clusters, groups, params, table="cluster_group.tsv", sep="\t"):
    folder.mkdir()
    np.save(folder / "spike_times.npy", np.asarray(samples, np.uint64)[:, None])    # Kilosort: (n, 1) uint64
    np.save(folder / "spike_clusters.npy", np.asarray(clusters, np.int32))
    (folder / table).write_text(f"cluster_id{sep}group\n" + "".join(f"{c}{sep}{g}\n" for c, g in groups.items()))
    (folder / "params.py").write_text(params)


def test_a_phy_folder_bins_to_exactly_the_spikes_of_its_units(tmp_path, capsys):
    """Kilosort / Phy output in, counts out: every spike of a good unit in its 10 ms bin, by brute force
    on integer samples (30 kHz: 300 a bin), spikes on the edges included; mua only when asked; params.py
    read as data, never run."""
    rng = np.random.default_rng(0)
    clusters = rng.choice([2, 3, 7, 11], 5000)
    samples = np.sort(np.r_[rng.integers(0, 3_000_000, 4990), [0, 300, 900, 2999, 3000, 29_999, 30_000,
                                                                 60_300, 90_000, 3_000_299]])
    groups = {2: "good", 3: "good", 7: "mua", 11: "noise"}
    params = ("dat_path = 'raw.bin'\nn_channels_dat = 385\ndtype = 'int16'\noffset = 0\nsample_rate = 30000.\n"
              f"hp_filtered = False\n__import__('os').system('touch {tmp_path}/ran')\n")
    write_phy(tmp_path / "ks", samples, clusters, groups, params)
    write_phy(tmp_path / "ks2", samples, clusters, groups, params, "cluster_KSLabel.tsv", ",")   # comma, KS labels
    for folder, wanted, units in ((tmp_path / "ks", ("good",), [2, 3]), (tmp_path / "ks2", ("good", "mua"), [2, 3, 7])):
        rec = nd.load_phy(str(folder), 0.01, wanted)
        truth = np.zeros((3_000_299 // 300 + 1, len(units)), np.float32)
        for t, c in zip(samples, clusters):
            if c in units:
                truth[t // 300, units.index(c)] += 1
        assert rec.rates.shape == truth.shape and np.array_equal(rec.rates * 0.01, truth), folder
        assert rec.rates.sum() * 0.01 == sum(c in units for c in clusters) and rec.task == "none"
        np.testing.assert_allclose(rec.time[:3], [0, 0.01, 0.02])
    assert not (tmp_path / "ran").exists()                              # the hostile line did not run
    (tmp_path / "ks" / "params.py").write_text("sample_rate = __import__('os').getpid()\n")
    with pytest.raises(nd.DataError, match="--sample-rate HZ"):
        nd.load_phy(str(tmp_path / "ks"), 0.01)
    p = cli(capsys, "--dataset", "phy", "--data-file", str(tmp_path / "ks2"), "--units", "good,mua", "--steps", "3")
    assert p.returncode == 0 and "10001 bins x 3 neurons, cluster_KSLabel.tsv: 2 good + 1 mua units" in p.stdout


def sorter_folder(folder, rng, n=4000, ids=(0, 1, 2, 5, 9, 12), shape=(-1, 1)):
    """A spike sorter's arrays: spike times in samples (uint64, Kilosort 2.5's (n, 1) or 4's (n,)), unsorted,
    and the cluster of each spike (ids 500 and up: clusters a merge in Phy made)."""
    folder.mkdir()
    samples = rng.integers(0, 600_000, n).astype(np.uint64)
    clusters = rng.choice(np.r_[ids, 500, 501], n).astype(np.int32)
    np.save(folder / "spike_times.npy", samples.reshape(shape))
    np.save(folder / "spike_clusters.npy", clusters)
    return samples.astype(np.int64), clusters


def binned(samples, clusters, units, per_bin):
    """Brute force: the spikes of each unit counted in its bin of per_bin whole samples."""
    counts = np.zeros((samples.max() // per_bin + 1, len(units)), np.float32)
    for t, c in zip(samples, clusters):
        if c in units:
            counts[t // per_bin, units.index(c)] += 1
    return counts


def test_sorter_folders_as_they_are_found_bin_exactly(tmp_path, capsys):
    """Each layout readers meet: a curated table before Kilosort's (cluster_group.tsv with `group` or with
    Kilosort's `KSLabel` copy, cluster_info.tsv with `id` or `cluster_id`, Phy 1's cluster_groups.csv,
    cluster_KSLabel.tsv); a cluster listed blank or not at all is unsorted; no table: every cluster; no
    params.py: --sample-rate; spike times (n, 1) or (n,), unsorted. Counts against brute force."""
    rng = np.random.default_rng(1)
    layouts = {   # files beside the spikes -> the table that must be read, the units meant
        "phy": ({"cluster_group.tsv": "cluster_id\tgroup\n0\tgood\n2\tgood\n5\tmua\n9\t\n500\tgood\n",
                 "cluster_KSLabel.tsv": "cluster_id\tKSLabel\n0\tgood\n1\tgood\n2\tgood\n"},
                "cluster_group.tsv: 3 good", [0, 2, 500]),
        "ks25": ({"cluster_group.tsv": "cluster_id\tKSLabel\n0\tmua\n1\tgood\n12\tgood\n",
                  "cluster_info.tsv": "id\tKSLabel\tgroup\tch\n0\tmua\tgood\t4\n1\tgood\tnoise\t5\n"
                                      "12\tgood\t\t7\n"}, "cluster_info.tsv: 1 good", [0]),
        "phy1": ({"cluster_groups.csv": "cluster_id,group\n1,good\n9,good\n501,mua\n"},
                 "cluster_groups.csv: 2 good", [1, 9]),
        "ks4": ({"cluster_KSLabel.tsv": "cluster_id\tKSLabel\n2\tgood\n5\tgood\n9\tmua\n"},
                "cluster_KSLabel.tsv: 2 good", [2, 5]),
        "none": ({}, "no cluster labels: all 8 clusters", [0, 1, 2, 5, 9, 12, 500, 501]),
    }
    for name, (files, about, units) in layouts.items():
        samples, clusters = sorter_folder(tmp_path / name, rng, shape=(-1,) if name == "ks4" else (-1, 1))
        for f, text in files.items():
            (tmp_path / name / f).write_text(text)
        if name != "phy1":
            (tmp_path / name / "params.py").write_text("sample_rate = 30000.0\n")
        rec = nd.load_phy(str(tmp_path / name), 0.01, sample_rate=30000 if name == "phy1" else 0.0)
        assert np.array_equal(rec.rates * 0.01, binned(samples, clusters, units, 300)), name
        assert rec.about.startswith(about), (name, rec.about)
    with pytest.raises(nd.DataError, match="--sample-rate HZ"):      # no params.py: never a guessed rate
        nd.load_phy(str(tmp_path / "phy1"), 0.01)
    np.save(tmp_path / "ks4" / "spike_clusters.npy", np.zeros(7, np.int32))
    with pytest.raises(nd.DataError, match="4000 spike times .* and 7 cluster ids"):
        nd.load_phy(str(tmp_path / "ks4"), 0.01)
    p = cli(capsys, "--dataset", "phy", "--data-file", str(tmp_path / "phy1"), "--steps", "2")
    one_line_error(p, "--sample-rate HZ")
    p = cli(capsys, "--dataset", "phy", "--data-file", str(tmp_path / "phy1"), "--steps", "2", "--sample-rate", "30000")
    assert p.returncode == 0 and "cluster_groups.csv: 2 good units" in p.stdout.splitlines()[0], p.stderr
    p = cli(capsys, "--dataset", "phy", "--data-file", str(tmp_path / "none"), "--steps", "2")
    assert p.returncode == 0 and "no cluster labels: all 8 clusters" in p.stdout.splitlines()[0], p.stderr


def test_a_clock_that_restarts_begins_a_segment_that_windows_and_the_mask_never_cross(tmp_path, capsys):
    """Two sessions saved one after the other, each from 0 s, without trial ids: time going back starts
    a new segment, as a new trial would. The run says so; no jitter window holds bins of both; the mask
    compares times within a segment only; a time stamp repeated within a trial is one line."""
    T = 4800
    time = np.r_[np.arange(T), np.arange(T)] * 0.1
    rates = np.random.default_rng(0).poisson(5, (2 * T, 20)).astype(np.float32)
    np.savez(tmp_path / "two.npz", firing_rates=rates, time=time)
    p = cli(capsys, "--dataset", "npz", "--data-file", str(tmp_path / "two.npz"), "--steps", "5")
    assert p.returncode == 0 and "2 segments (time restarts at bin 4800)" in p.stdout.splitlines()[0], p.stderr
    rec = nd.load_recording("npz", data_file=str(tmp_path / "two.npz"))
    assert rec.trial.tolist() == [0] * T + [1] * T
    lo, hi = nd.jitter_bounds(rec.trial, rec.time, 0.2)
    assert (lo[T:] >= T).all() and (hi[:T] < T).all()
    axis = torch.as_tensor(nd.trial_axis(rec.trial, rec.time, 600.0))
    mask = nd.mining_mask(axis[[0, T]], axis, 600.0)                 # bins at 0 s of either session
    assert mask[0, T:].all() and mask[1, :T].all()                   # the other segment: any time
    assert not mask[0, :T].any() and not mask[1, T:].any()           # its own: 480 s long, < 600 s away
    np.savez(tmp_path / "twice.npz", firing_rates=rates[:10], time=np.r_[0.0, 0.1, 0.1, np.arange(3, 10) * 0.1])
    one_line_error(cli(capsys, "--dataset", "npz", "--data-file", str(tmp_path / "twice.npz")), "bins 1 and 2",
                   "same time 0.1 s")


def test_a_continuous_behaviour_is_decoded_with_r2_and_a_trained_encoder_beats_an_untrained_one(tmp_path, capsys):
    """labels of floats, (T,) or (T, d), are a behaviour: read out by ridge regression, scored with
    R² per dimension and on average (on validation the penalty is chosen), in the JSON line."""
    rec = nd.synthetic_session(20000, 40)                           # 2-D velocity encoded by 40 neurons
    np.savez(tmp_path / "v.npz", firing_rates=rec.rates, time=rec.time, labels=rec.labels)
    np.savez(tmp_path / "speed.npz", firing_rates=rec.rates, time=rec.time, labels=np.linalg.norm(rec.labels, axis=1))
    assert nd.load_recording("npz", data_file=str(tmp_path / "speed.npz")).labels.shape == (20000, 1)
    cfg = myow.parse_config(["--dataset", "npz", "--data-file", str(tmp_path / "v.npz"), "--steps", "300"])
    _, splits, _, pretrain = nd.load_neural(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    untrained = myow.build_networks(cfg, pretrain)[0].net.f
    trained = myow.train(cfg, pretrain, torch.device("cpu")).net.f
    r2 = {name: myow.linear_eval(myow.representations(f, splits), [s.labels for s in splits], "continuous", cfg)
          for name, f in (("untrained", untrained), ("trained", trained))}
    assert r2["trained"]["test_r2"] > r2["untrained"]["test_r2"] + 0.3 and r2["trained"]["test_r2"] > 0.5, r2
    assert r2["trained"]["test_r2"] == pytest.approx(np.mean(r2["trained"]["test_r2_dims"]), abs=1e-4)
    p = cli(capsys, "--dataset", "npz", "--data-file", str(tmp_path / "v.npz"), "--steps", "20")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res["test_r2_dims"]) == 2 and -1 < res["test_r2"] < 1 and res["steps"] == 20, p.stderr


def test_ridge_readout_is_the_penalised_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(500, 6, generator=g) + 3, torch.randn(500, 2, generator=g)
    wd = torch.tensor([0.0, 0.5, 8.0])
    W, bias = myow.ridge(X, Y, wd)
    for k, lam in enumerate(wd.tolist()):                    # brute force: the normal equations, centred
        Xc, Yc = (X - X.mean(0)).double(), (Y - Y.mean(0)).double()
        w = torch.linalg.solve(Xc.T @ Xc / 500 + lam * torch.eye(6, dtype=torch.float64), Xc.T @ Yc / 500)
        torch.testing.assert_close(W[k], w.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(X @ W[k] + bias[k], (Xc @ w).float() + Y.mean(0), rtol=1e-4, atol=1e-4)


def test_a_run_is_steps_or_epochs_and_a_large_recording_gets_a_budget_of_steps():
    """--steps sets the length; without it a neural run is --epochs passes up to 20,000 steps, which
    the published recordings never reach (Chewie-1 1,000 steps, Mouse-CA1 16,000) and a session of a
    million bins does; warm-up and ramp keep their share of the run."""
    cfg = myow.parse_config(["--dataset", "chewie1"])
    assert myow.schedule(cfg, 734) == (1, 1000, 1000, 100, 10)               # Chewie-1: App. D as written
    assert myow.schedule(myow.parse_config(["--dataset", "mouse"]), 8640) == (16, 1000, 16000, 1600, 160)
    assert myow.schedule(cfg, 1_000_000) == (1953, 11, 20000, 2000, 200)     # a laboratory's session
    assert myow.schedule(myow.parse_config(["--steps", "5000"]), 1_000_000)[1:3] == (3, 5000)
    assert myow.schedule(myow.parse_config(["--dataset", "cifar10"]), 50000)[2] == 800 * 97   # images: no cap
    logged = []
    cfg = myow.parse_config(["--steps", "7", "--batch-size", "256"])
    pretrain = nd.load_neural(cfg, torch.device("cpu"))[3]
    myow.train(cfg, pretrain, torch.device("cpu"), lambda epoch, rec, *a: logged.append((epoch + 1, rec["steps"])))
    assert logged == [(1, 5), (2, 2)] and len(pretrain) // 256 == 5        # 5 steps, then 2 of the next epoch


def test_splits_are_views_of_one_copy_of_the_recording():
    """A recording in memory once: the splits training and evaluation read are views of it."""
    cfg = myow.parse_config(["--size", "5000,30"])
    rec, splits, _, pretrain = nd.load_neural(cfg, torch.device("cpu"))
    for s in splits + [pretrain]:
        assert np.shares_memory(s.x.numpy(), rec.rates)


# --- the command line -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["myow", "byol"])
def test_cli_trains_and_prints_json(method, tmp_path):
    p = run_cli("--epochs", "40", "--method", method, "--warmup-epochs", "4", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("dataset", "method", "seed", "epochs", "train_seconds", "eval_seconds",
                "test_acc", "test_delta_acc", "val_acc", "mining_class_acc"):
        assert key in res
    assert res["method"] == method and res["epochs"] == 40
    assert res["test_acc"] > 40                                     # 8 directions: chance 12.5
    assert (res["mining_class_acc"] is None) == (method == "byol")
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert len(log) == 40 and json.load(open(tmp_path / "results.json")) == res
    # the trained encoder outside the run (that it gives the run's y: test_..._its_encoder below)
    f = myow.load_encoder(tmp_path / "encoder.pt")
    rates = nd.synthetic_reach().rates                                  # (T, 96) Hz, recording order
    assert f(rates).shape == (len(rates), 32)
    with pytest.raises(ValueError, match=rf"\(T, 96\).*\({len(rates)}, 90\)"):          # both numbers
        f(rates[:, :90])
    bad = rates.copy()
    for value in (np.nan, np.inf, -np.inf):                           # never numbers out of NaN or inf
        bad[5, 7] = value
        with pytest.raises(ValueError, match=f"row 5, neuron 7 is {value}"):
            f(bad)
    for hostile in (None, "rates", [[1.0, 2.0], [3.0]], [{"a": 1}], rates[0]):   # one clear line each
        with pytest.raises(ValueError, match=r"this encoder takes firing rates \(T, 96\)"):
            f(hostile)
    with pytest.raises(ValueError, match="dtype torch.bool"):
        f(rates > 0)
    for not_an_encoder in (tmp_path / "checkpoint.pt", tmp_path / "results.json"):
        with pytest.raises(ValueError, match="not an encoder.pt"):
            myow.load_encoder(not_an_encoder)


# --- several processes (torchrun, gloo on CPU) ------------------------------------------------
DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {here!r})
import myow
import neural_data as nd
cfg = myow.parse_config(["--epochs", "3", "--warmup-epochs", "300", "--dropout-max", "0", "--noise-p", "0",
                         "--pepper-p", "0", "--jitter-s", "0", "--k", "1", "--batch-size", "1024",
                         "--pool-size", "1024"])
rank, world, device = myow.setup_distributed(cfg)
rec, splits, _, _ = nd.load_neural(cfg, device)
model = myow.train(cfg, splits[0], device)
grad = torch.cat([p.grad.flatten() for p in model.parameters()])      # the last step's gradient
pool = myow.all_gather(torch.arange(3) + 10 * rank)
torch.save(dict(params=model.state_dict(), grad=grad, pool=pool), os.path.join({out!r}, f"w{{world}}r{{rank}}.pt"))
if world > 1:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def torchrun(n, *args):
    """Launch with torchrun. Once in a few dozen launches on this 2-core machine a gloo worker
    aborts while its threads shut down ('terminate called without an active exception', exit
    -6); only that signature is tried a second time, any other failure fails the test."""
    for attempt in range(2):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={n}", *args], capture_output=True, text=True,
                           timeout=240, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                       "CUDA_VISIBLE_DEVICES": ""})   # gloo on CPU
        if p.returncode == 0 or "terminate called without an active exception" not in p.stderr:
            return p
    return p


def test_two_processes_match_one(tmp_path):
    """Same global batch and seed, augmentations off and k = 1 so that only the process count
    differs: after 3 steps both ranks hold identical parameters, the pool gathers world x
    per-rank candidates in rank order, and the all-reduced gradient of the third step matches one
    process's up to BatchNorm, which on CPU normalises each rank's half batch (SyncBatchNorm needs
    CUDA). Measured: about 9 % relative difference, against 140 % for another seed."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(here=HERE, out=str(tmp_path)))
    p = torchrun(2, str(script))
    assert p.returncode == 0, p.stderr[:4000]
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})          # on CPU, as torchrun's
    assert p.returncode == 0, p.stderr[:4000]
    r0, r1, one = (torch.load(tmp_path / f, weights_only=True) for f in ("w2r0.pt", "w2r1.pt", "w1r0.pt"))
    for k, v in r0["params"].items():
        if "running" not in k and "num_batches" not in k:            # BN statistics stay per rank
            assert torch.equal(v, r1["params"][k]), k
    assert r0["pool"].tolist() == [0, 1, 2, 10, 11, 12] and len(one["pool"]) == 3
    rel = (r0["grad"] - one["grad"]).norm() / one["grad"].norm()
    assert rel < 0.25, rel


def test_torchrun_cli_prints_one_json_line(tmp_path):
    p = torchrun(2, "myow.py", "--epochs", "4", "--warmup-epochs", "1", "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr[:4000]
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["world_size"] == 2
    assert len(open(tmp_path / "run" / "log.jsonl").readlines()) == 4     # rank 0 alone writes


def test_torchrun_byol_on_images(tmp_path):
    """BYOL on images under DistributedDataParallel: several steps (DDP checks at every step after
    the first that each parameter got its gradient) and one JSON line."""
    p = torchrun(2, "myow.py", "--dataset", "dsprites", "--train-fraction", "0.15", "--method", "byol",
                 "--epochs", "1", "--batch-size", "1024", "--eval-epochs", "1", "--eval-milestones", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["world_size"] == 2


DOWNLOAD_SCRIPT = """
import os, sys, time, numpy as np, torch, torchvision
sys.path.insert(0, {here!r})
import myow

class Fake:                                    # a data set that records who downloaded it, and when
    def __init__(self, root, train, download=False):
        rank = torch.distributed.get_rank()
        t0 = time.time()
        if download:
            time.sleep(1.0)
            open(os.path.join(root, f"part{{int(train)}}"), "w").close()
        elif not os.path.exists(os.path.join(root, f"part{{int(train)}}")):
            raise RuntimeError("Dataset not found")
        with open(os.path.join({out!r}, "calls.txt"), "a") as fh:
            fh.write(f"{{rank}} {{int(download)}} {{t0}} {{time.time()}}\\n")
        self.data, self.targets = np.zeros((8, 32, 32, 3), np.uint8), [0] * 8
torchvision.datasets.CIFAR10 = Fake
cfg = myow.parse_config(["--dataset", "cifar10", "--download", "--data-dir", {out!r}])
rank, world, device = myow.setup_distributed(cfg)
myow.load_images(cfg, device)
torch.distributed.destroy_process_group()
"""


def test_download_under_torchrun_is_rank_0_first(tmp_path):
    script = tmp_path / "dl.py"
    script.write_text(DOWNLOAD_SCRIPT.format(here=HERE, out=str(tmp_path)))
    p = torchrun(2, str(script))
    assert p.returncode == 0, p.stderr[-3000:]
    calls = [l.split() for l in open(tmp_path / "calls.txt").read().splitlines()]
    rank0 = [(float(a), float(b)) for r, d, a, b in calls if r == "0" and d == "1"]
    rank1 = [(float(a), float(b)) for r, d, a, b in calls if r == "1" and d == "0"]
    assert len(rank0) == 2 and len(rank1) == 2                  # only rank 0 downloads
    assert min(a for a, _ in rank1) >= max(b for _, b in rank0)   # the others read after it


# --- checkpoints and resume -------------------------------------------------------------------
METRICS = ("test_acc", "test_delta_acc", "val_acc", "mining_class_acc")
FAST = ("--epochs", "30", "--warmup-epochs", "3", "--ckpt-every", "5")          # every epoch printed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of the FAST run, trained without interruption (shared by the resume tests)."""
    full = run_cli(*FAST, "--out", str(tmp_path_factory.mktemp("full")))
    assert full.returncode == 0, full.stderr
    return {k: json.loads(full.stdout.strip().splitlines()[-1])[k] for k in METRICS}


def test_killed_and_resumed_run_ends_like_uninterrupted(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "myow.py", *FAST, "--out", str(out)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                                 # kill right after epoch 12
        if line.startswith("epoch   12/"):
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -9 and not (out / "results.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 10
    resumed = run_cli(*FAST, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert {k: json.loads(resumed.stdout.strip().splitlines()[-1])[k] for k in METRICS} == uninterrupted
    assert [json.loads(l)["epoch"] for l in open(out / "log.jsonl")] == list(range(1, 31))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_finishes_the_epoch_and_the_printed_command_resumes_exactly(sig, tmp_path, uninterrupted):
    """Ctrl-C, SIGTERM as schedulers send it, SIGHUP as a closed terminal or a dropped ssh connection
    sends it: the epoch ends, a checkpoint is written, the status is 128 + the signal, the last line
    says how to continue, and doing so ends with exactly the metrics of an uninterrupted run."""
    proc = subprocess.Popen([sys.executable, "myow.py", *FAST, "--out", str(tmp_path)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch    7/"):
            proc.send_signal(sig)
            break
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert 7 <= torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] < 30
    command = shlex.split(err.strip().splitlines()[-1].split("continue with: ")[1])
    assert command[:2] == ["python", "myow.py"] and command[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=HERE, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert {k: json.loads(resumed.stdout.strip().splitlines()[-1])[k] for k in METRICS} == uninterrupted


def test_sigterm_under_torchrun_stops_every_rank_and_the_printed_command_resumes_exactly(tmp_path):
    """SIGTERM to torchrun reaches both ranks, which finish the same epoch and write one checkpoint;
    rank 0's line names the torchrun command that continues, and it ends with the metrics of an
    uninterrupted torchrun run. (torchrun's own agent then ends with status 1 and its traceback.)"""
    full = torchrun(2, "myow.py", *FAST, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "myow.py", *FAST, "--out", str(out)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    for line in proc.stdout:
        if line.startswith("epoch    7/"):
            proc.send_signal(signal.SIGTERM)
            break
    err = proc.communicate(timeout=120)[1]
    assert 7 <= torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] < 30
    assert err.count("stopped: SIGTERM after epoch") == 1, err[-3000:]        # rank 0's line
    command = shlex.split(err.split("continue with: ")[1].splitlines()[0])
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"] and command[-1] == "--resume", err[-3000:]
    resumed = torchrun(2, *command[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][0]) for p in (full, resumed))
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["train_logged", "representations"])
def test_a_signal_outside_training_is_one_line_and_the_printed_command_finishes(moment, sig, tmp_path, monkeypatch,
                                                                                capsys, uninterrupted):
    """Outside training too (after config.json is written and before training starts; in the final
    readout): status 128 + the signal, one line saying what was kept and the command that goes on, and
    that command ends with the metrics of an uninterrupted run."""
    real = getattr(myow, moment)

    def signalled(*a, **k):
        os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(myow, moment, signalled)
    with pytest.raises(SystemExit) as e:
        myow.main([*FAST, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 128 + sig and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"stopped: {signal.Signals(sig).name}") and "Traceback" not in err, err
    kept = moment == "representations"
    assert ("is kept; continue with: " in err) == kept and ("nothing was kept" in err) != kept, err
    command = shlex.split(err.split("continue with: " if kept else "starts again: ")[1])
    assert command[:2] == ["python", os.path.relpath(os.path.join(HERE, "myow.py"))], command
    again = run_cli(*command[2:])
    assert again.returncode == 0, again.stderr
    assert {k: json.loads(again.stdout.strip().splitlines()[-1])[k] for k in METRICS} == uninterrupted


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    myow.save_checkpoint(path, {"epoch": 1})

    def dies_half_way(obj, fh):
        fh.write(b"partial")
        raise OSError("killed")
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        myow.save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_a_failed_write_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A full disk at the second checkpoint: one line naming the file and the OS's reason, exit 1,
    no temporary file left, the first checkpoint intact, and --resume from it finishes the run."""
    real_open, opened = open, []

    class FullDisk:                                   # writes a little, then the disk is full
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full_disk(path, *args, **kwargs):
        fh = real_open(path, *args, **kwargs)
        opened.append(str(path))
        return FullDisk(fh) if sum(p.endswith("checkpoint.pt.tmp") for p in opened) > 1 else fh
    monkeypatch.setattr(myow, "open", open_full_disk, raising=False)
    argv = ["--epochs", "12", "--ckpt-every", "5", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        myow.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert "checkpoint.pt" in err and os.strerror(errno.ENOSPC) in err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 5
    monkeypatch.undo()
    assert myow.main(argv + ["--resume"]) is None and (tmp_path / "results.json").exists()


def test_settings_too_large_for_memory_end_in_one_line_naming_the_setting(capsys, tmp_path):
    """A mistyped setting that sizes a tensor far beyond any machine (terabytes): one line naming
    that flag (not another) and torch's figure, exit 1, before training starts."""
    for argv, flag in ((["--hidden", "1000000"], "--hidden"), (["--pred-hidden", "1000000000"], "--pred-hidden")):
        with pytest.raises(SystemExit) as e:
            myow.main(argv + ["--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and f"lower {flag} {argv[-1]}" in err, err
        assert "out of memory" in err and "bytes" in err and not (tmp_path / "run" / "log.jsonl").exists()


def test_out_of_memory_during_a_run_is_one_line_naming_what_to_lower(monkeypatch, capsys, tmp_path):
    step = myow.myow_step

    def runs_out(cfg, data, online, target, s, c, *a):
        if int(s[0]) % 7 == 0:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 160000000000 bytes. Error code 12")
        return step(cfg, data, online, target, s, c, *a)
    monkeypatch.setattr(myow, "myow_step", runs_out)
    with pytest.raises(SystemExit) as e:
        myow.main(["--epochs", "30", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and "--batch-size 512" in err, err
    assert "160000000000 bytes" in err                               # torch's figure, whole
    with pytest.raises(SystemExit) as e:                             # the setting that sized it is named
        myow.main(["--epochs", "30", "--out", str(tmp_path / "wide"), "--pred-hidden", "4096"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "lower --pred-hidden 4096" in err, err


def test_an_out_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path, capsys):
    one_line_error(cli(capsys, "--out", "/proc/myow-run"), "--out /proc/myow-run", "writable")
    (tmp_path / "file").write_text("")
    one_line_error(cli(capsys, "--out", str(tmp_path / "file" / "run")), "Not a directory")


def test_a_run_stopped_before_its_first_checkpoint_is_taken_up_by_the_same_command(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")                      # what a stop before epoch 1 leaves
    (tmp_path / "log.jsonl").write_text("")
    for argv in (["--epochs", "2"], ["--epochs", "2", "--resume"]):
        p = cli(capsys, *argv, "--out", str(tmp_path))
        assert p.returncode == 0, p.stderr
        for f in ("checkpoint.pt", "results.json", "encoder.pt"):
            (tmp_path / f).unlink()
    p = cli(capsys, "--epochs", "2", "--out", str(tmp_path))             # a checkpoint: only --resume goes on
    assert p.returncode == 0
    one_line_error(cli(capsys, "--epochs", "2", "--out", str(tmp_path)), "already holds a run", "--resume")


def test_a_download_without_network_is_one_line_and_leaves_nothing(monkeypatch, capsys, tmp_path):
    """No network (urlopen fails, as on a cluster's compute node): one line that says how to get
    the files, exit 1, and nothing in --data-dir that a later run would take for the data set."""
    import urllib.error
    import urllib.request

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(SystemExit) as e:
        myow.main(["--dataset", "fashion-mnist", "--download", "--data-dir", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert "could not download" in err and "download=True" in err and str(tmp_path) in err
    assert not os.listdir(tmp_path)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    schedule = myow.lambda_at
    monkeypatch.setattr(myow, "lambda_at", lambda step, *a: float("nan") if step >= 9 else schedule(step, *a))
    with pytest.raises(SystemExit) as e:
        myow.main(["--epochs", "10", "--ckpt-every", "1", "--out", str(tmp_path)])
    assert e.value.code == 1                                        # a failure during the run
    assert re.search("non-finite loss in epoch 5 .*mined-view loss .*lambda nan", capsys.readouterr().err)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 4   # 2 steps/epoch


def test_a_second_run_on_a_folder_in_use_is_refused_and_kill_9_leaves_nothing_that_blocks(tmp_path, capsys):
    """One run a folder: the same command launched twice (a job submitted twice) is refused in one line
    naming the process that writes the folder, before the first checkpoint too; the operating system
    releases the lock at kill -9, and the folder is taken up again."""
    out = tmp_path / "run"
    argv = ["--epochs", "3000", "--ckpt-every", "2000", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "myow.py", *argv], cwd=HERE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline().startswith("synthetic:")          # --out prepared, the lock held
    second = cli(capsys, *argv)
    assert second.returncode == 2
    one_line_error(second, f"--out {out} is being written by another run (process {first.pid})")
    first.kill()
    first.communicate()
    again = cli(capsys, "--epochs", "2", "--out", str(out))
    assert again.returncode == 0 and (out / "results.json").exists(), again.stderr


def test_fit_on_arrays_gives_the_metrics_of_the_npz_command(tmp_path, capsys):
    """From Python: myow.fit(rates, time=..., labels=..., steps=60) runs what --dataset npz runs on the
    same arrays, to the digit, and returns the encoder as load_encoder returns it."""
    rec = nd.synthetic_session(6000, 30)
    np.savez(tmp_path / "s.npz", firing_rates=rec.rates, time=rec.time, labels=rec.labels)
    myow.main(["--dataset", "npz", "--data-file", str(tmp_path / "s.npz"), "--steps", "60"])
    cli = json.loads(capsys.readouterr().out.splitlines()[-1])
    result, f = myow.fit(rec.rates, time=rec.time, labels=rec.labels, steps=60, out=str(tmp_path / "fit"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("npz: 6000 bins x 30 neurons") and "60 steps" in first
    metrics = [k for k in cli if k.startswith(("test_", "val_")) or k in ("eval_weight_decay", "steps")]
    assert len(metrics) >= 5 and {k: result[k] for k in metrics} == {k: cli[k] for k in metrics}
    assert result["test_r2"] > 0.5
    torch.testing.assert_close(f(rec.rates), myow.load_encoder(tmp_path / "fit" / "encoder.pt")(rec.rates))
    with pytest.raises(myow.ConfigError, match="--steps -1: must be an integer >= 0"):
        myow.fit(rec.rates, time=rec.time, steps=-1)
    with pytest.raises(nd.DataError, match="time in arrays has shape"):
        myow.fit(rec.rates, time=rec.time[:10], steps=5)


def test_existing_out_is_never_overwritten_silently(tmp_path, capsys):
    assert cli(capsys, "--epochs", "2", "--out", str(tmp_path)).returncode == 0
    before = open(tmp_path / "results.json").read()
    p = cli(capsys, "--epochs", "3", "--out", str(tmp_path))
    assert p.returncode != 0 and "--resume" in p.stderr and "--overwrite" in p.stderr
    assert open(tmp_path / "results.json").read() == before
    p = cli(capsys, "--epochs", "3", "--out", str(tmp_path), "--overwrite")
    assert p.returncode == 0 and json.load(open(tmp_path / "results.json"))["epochs"] == 3


def test_bad_checkpoints_are_refused_clearly(tmp_path, capsys):
    assert cli(capsys, "--epochs", "2", "--out", str(tmp_path)).returncode == 0
    p = cli(capsys, "--epochs", "2", "--out", str(tmp_path), "--resume", "--threads", "2", "--ckpt-every", "1")
    assert p.returncode == 0, p.stderr                          # run settings may change on a resume
    p = cli(capsys, "--epochs", "2", "--out", str(tmp_path), "--resume", "--lr", "0.5")
    assert p.returncode != 0 and "--lr 0.02" in p.stderr and "Traceback" not in p.stderr
    ck = tmp_path / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    state["config"]["log_every"] = 5                                  # a setting an older version had
    torch.save(state, ck)
    assert cli(capsys, "--epochs", "2", "--out", str(tmp_path), "--resume").returncode == 0
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])          # truncated
    p = cli(capsys, "--epochs", "2", "--out", str(tmp_path), "--resume")
    assert p.returncode != 0 and "unreadable" in p.stderr and "Traceback" not in p.stderr
    assert cli(capsys, "--epochs", "2", "--out", str(tmp_path), "--overwrite").returncode == 0
    state = torch.load(ck, weights_only=True)
    state["rng"] = state["rng"] * 2                                    # as if written by 2 processes
    torch.save(state, ck)
    p = cli(capsys, "--epochs", "2", "--out", str(tmp_path), "--resume")
    one_line_error(p, "2 process(es)", "--nproc_per_node 2")


def one_line_error(p, *words):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_bad_inputs_each_get_one_clear_line(tmp_path, capsys):
    one_line_error(cli(capsys, "--dataset", "cifar11"), "--dataset 'cifar11'", "a data set named in --help")
    one_line_error(cli(capsys, "--dataset", "mouse", "--data-dir", str(tmp_path)), "fr_bins_n_4full.npy", str(tmp_path))
    (tmp_path / "fr_bins_n_4full.npy").write_bytes(b"not the published file")
    one_line_error(cli(capsys, "--dataset", "mouse", "--data-dir", str(tmp_path)), "SHA-256", "delete it")
    one_line_error(cli(capsys, "--k", "5000", "--epochs", "1"), "--k 5000", "eligible pool")
    one_line_error(cli(capsys, "--batch-size", "100000", "--epochs", "1"), "larger than", "--batch-size 1348")
    one_line_error(cli(capsys, "--noise-p", "1.5", "--epochs", "1"), "--noise-p 1.5", "[0, 1]")
    one_line_error(cli(capsys, "--dataset", "dsprites", "--pretrain-on", "train+val"), "--pretrain-on 'train+val'")
    rates = np.random.default_rng(0).poisson(5, (400, 10)).astype(np.float32)
    rates[17, 3] = np.nan
    np.savez(tmp_path / "nan.npz", firing_rates=rates, time=np.arange(400.0))
    one_line_error(cli(capsys, "--dataset", "npz", "--data-file", str(tmp_path / "nan.npz")), "bin 17, neuron 3", "nan")
    np.savez(tmp_path / "lab.npz", firing_rates=np.nan_to_num(rates), time=np.arange(400.0),
             labels=np.r_[np.zeros(399, np.int64), -1])
    one_line_error(cli(capsys, "--dataset", "npz", "--data-file", str(tmp_path / "lab.npz")), "label -1")


def refused(argv, capsys, out):
    """Run the command line in process; return (exit status, stderr) and check --out is as it was."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        myow.main(argv)
    err = capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, argv
    return e.value.code, err


def test_every_checked_field_refuses_a_value_outside_its_meaning(tmp_path, capsys):
    """Derived from the configuration table, so a new field is covered: an integer of -7, a float
    of nan, a string of 'zzz' are each refused in one line naming the flag and value, exit 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("a result already written")
    for f in dataclasses.fields(myow.Run):
        if f.metadata["check"] is myow.FREE or f.name == "dataset":
            continue
        bad = {int: "-7", float: "nan", str: "zzz"}[type(f.metadata["default"])]
        flag = "--" + f.name.replace("_", "-")
        code, err = refused([flag, bad, "--out", str(out)], capsys, out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err and bad in err, (flag, err)


def test_bad_settings_are_refused_before_work_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("a result already written")
    (tmp_path / "file").write_text("")
    (tmp_path / "r.npz").write_bytes(b"not a NumPy archive")
    cases = [(["--epochs", "0"], "--epochs 0", ">= 1"), (["--ckpt-every", "0"], "--ckpt-every 0"),
             (["--hidden", "0"], "--hidden 0"), (["--jitter-s", "-1"], "--jitter-s -1.0"),
             (["--dataset", "dsprites", "--crop-area", "abc"], "--crop-area 'abc'", "lo:hi"),
             (["--dataset", "dsprites", "--color-jitter", "1,2"], "--color-jitter '1,2'", "four numbers"),
             (["--eval-wd-exponents", "x"], "--eval-wd-exponents 'x'"), (["--eval-milestones", "a"], "'a'"),
             (["--lr", "-1"], "--lr -1.0", "> 0"), (["--tau", "1.5"], "--tau 1.5", "[0, 1]"),
             (["--noise-std", "-1"], "--noise-std -1.0"), (["--mining-ramp-epochs", "-5"], "-5"),
             (["--warmup-epochs", "-1"], "--warmup-epochs -1"), (["--eval-epochs", "0"], "--eval-epochs 0"),
             (["--batch-size", "1"], "--batch-size 1", ">= 2"), (["--k", "0"], "--k 0", ">= 1"),
             (["--epochs", "abc"], "--epochs", "invalid int value: 'abc'"), (["--method", "simclr"], "'simclr'"),
             (["--dataset", "cifar10", "--arch", "mlp"], "--arch 'mlp'", "resnet18"),
             (["--dataset", "dsprites", "--pretrain-on", "train+val"], "--pretrain-on 'train+val'", "train"),
             (["--dataset", "npz"], "--data-file ''", ".npz"), (["--data-dir", str(tmp_path / "file")], "--data-dir",
              "is not a folder"),
             (["--dataset", "dsprites", "--color-jitter", "0.4,0.4,0.4,0.6"], "hue h <= 0.5"),
             (["--resume"], "--resume: no checkpoint"), (["--k", "5000"], "--k 5000", "eligible"),
             (["--batch-size", "100000"], "--batch-size 100000", "--batch-size 1348")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda", "--device cpu"))
    for argv, *words in cases:
        code, err = refused([*argv, "--out", str(out)], capsys, out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert all(w in err for w in words), (argv, err)
    code, err = refused(["--out", str(tmp_path / "file" / "run")], capsys, out)
    assert code == 2 and "Not a directory" in err
    code, err = refused(["--dataset", "npz", "--data-file", str(tmp_path / "r.npz"), "--out", str(out)], capsys, out)
    assert code == 1 and "not a NumPy .npz archive" in err             # found on reading: a failure
    assert len(err.strip().splitlines()) == 1


def test_every_field_has_a_check_or_is_free_on_purpose():
    free = {f.name for f in dataclasses.fields(myow.Run) if f.metadata["check"] is myow.FREE}
    assert free == {"data_dir", "download", "data_file", "out", "resume", "overwrite", "compile"}   # paths, switches
    for dataset in myow.PRESETS:                                 # every preset passes its own checks
        if dataset not in ("npz", "phy"):                        # these need --data-file
            myow.parse_config(["--dataset", dataset])


def test_raw_method_reads_out_the_normalised_inputs(monkeypatch):
    """--method raw, the floor of every table: no training, the readout sees exactly the inputs
    that the encoder would see: rates z-scored with the statistics of what self-supervised training
    sees (train + validation by default; never test)."""
    seen = {}
    evaluate = myow.linear_eval
    monkeypatch.setattr(myow, "linear_eval", lambda feats, *a: seen.update(feats=feats) or evaluate(feats, *a))
    res = myow.run(myow.parse_config(["--method", "raw", "--eval-epochs", "5", "--device", "cpu"]))[0]
    cfg = myow.parse_config([])
    _, splits, _, _ = nd.load_neural(cfg, torch.device("cpu"))
    for got, split in zip(seen["feats"], splits):
        assert torch.equal(got, split.inputs(torch.arange(len(split))))
    seen_by_training = torch.cat(seen["feats"][:2])                      # train + validation
    assert seen_by_training.mean(0).abs().max() < 1e-4 and abs(seen_by_training.std(0) - 1).max() < 1e-3
    assert abs(seen["feats"][2].mean(0)).max() > 1e-2                     # test takes no part
    assert res["train_seconds"] < 0.01 and res["test_acc"] > 50


# --- supervised baseline and embeddings -------------------------------------------------------
def test_supervised_baseline_keeps_the_encoder_of_its_best_validation_epoch(monkeypatch):
    """Early stopping on validation: with the best validation score after epoch 1 of 3, the encoder
    returned is the one after epoch 1 (the same as a 1-epoch run: inside the warm-up the lr does not
    depend on the number of epochs); with the best after epoch 3, it is the fully trained one."""
    cfg = lambda epochs: myow.parse_config(["--method", "supervised", "--epochs", str(epochs),
                                            "--warmup-epochs", "100", "--batch-size", "128"])
    _, splits, _, _ = nd.load_neural(cfg(1), torch.device("cpu"))
    score = myow.scores

    def trained(epochs, val_scores):
        it = iter(val_scores)
        monkeypatch.setattr(myow, "scores", lambda *a: dict.fromkeys(("acc", "f1"), torch.tensor(next(it))))
        f = myow.train_supervised(cfg(epochs), splits, torch.device("cpu"))
        monkeypatch.setattr(myow, "scores", score)
        return [p.detach().clone() for p in f.state_dict().values()]
    after_one = trained(1, [50.0])
    best_first, best_last = trained(3, [90.0, 10.0, 20.0]), trained(3, [10.0, 20.0, 90.0])
    assert all(torch.equal(a, b) for a, b in zip(after_one, best_first))
    assert not all(torch.equal(a, b) for a, b in zip(after_one, best_last))


def read_out_features(monkeypatch):
    """The features run() reads out, as the readout receives them: [train, val, test(, holes)]."""
    seen, evaluate = {}, myow.linear_eval
    monkeypatch.setattr(myow, "linear_eval", lambda feats, *a: seen.setdefault("feats", feats) and evaluate(feats, *a))
    return seen


def test_a_10_ms_runs_encoder_pt_embeds_each_bin_with_the_bins_before_it(tmp_path, monkeypatch):
    """With a window (10 bins of 10 ms), encoder.pt gives every bin the y the run read out, but for the
    first 9 bins of validation and test, whose windows in the run repeat their split's first bin: given
    those splits alone, it gives exactly the run's y there too."""
    seen = read_out_features(monkeypatch)
    myow.run(myow.parse_config(["--size", "3000,20", "--steps", "20", "--out", str(tmp_path), "--device", "cpu"]))
    rates = nd.synthetic_session(3000, 20).rates
    f = myow.load_encoder(tmp_path / "encoder.pt")
    idx = nd.temporal_split(np.zeros(3000))
    whole = f(rates)
    for i, (part, y) in enumerate(zip(idx, seen["feats"][:3])):
        inner = slice(9 * (i > 0), None)                                   # all but the first 9 of val, test
        torch.testing.assert_close(whole[part][inner], y[inner], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f(rates[part]), y, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(whole[idx[1]][:9], seen["feats"][1][:9], atol=1e-3)   # the edge rule matters


def test_cpu_threads_are_one_for_the_mlp_and_torchs_default_for_images_unless_set(monkeypatch):
    """Beside other work two threads took the MLP 2-2.4 x as long (README): one thread by default; image
    encoders keep torch's default; OMP_NUM_THREADS or --threads wins."""
    default = torch.get_num_threads()
    try:
        for env, argv, want in ((None, [], 1), (None, ["--dataset", "dsprites"], default), ("2", [], None),
                                (None, ["--threads", "2"], 2), ("1", ["--threads", "3"], 3)):
            torch.set_num_threads(default)
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            if env:
                monkeypatch.setenv("OMP_NUM_THREADS", env)
            myow.setup_distributed(myow.parse_config(argv + ["--device", "cpu"]))
            assert torch.get_num_threads() == (default if want is None else want), (env, argv)
    finally:
        torch.set_num_threads(default)


@pytest.mark.parametrize("method", ["myow", "supervised"])
def test_the_runs_encoder_pt_gives_the_representations_it_read_out(method, tmp_path, monkeypatch):
    """encoder.pt maps raw rates in Hz to exactly the y that the run's readout saw (dropout off for
    the supervised encoder, BatchNorm in eval mode, the training statistics inside)."""
    seen = read_out_features(monkeypatch)
    res = myow.run(myow.parse_config(["--method", method, "--epochs", "40", "--warmup-epochs", "4",
                                      "--out", str(tmp_path), "--device", "cpu"]))[0]
    assert res["method"] == method and res["test_acc"] > 50
    rec = nd.synthetic_reach()
    y = myow.load_encoder(tmp_path / "encoder.pt")(rec.rates)          # the splits, in recording order
    np.testing.assert_allclose(y.numpy(), torch.cat(seen["feats"][:3]).numpy(), rtol=1e-4, atol=1e-4)


# --- images (Appendix C) ----------------------------------------------------------------------
def image_split(x, size=32):
    C = x.shape[1]
    return myow.ImageSplit(x, torch.zeros(len(x), dtype=torch.long), torch.zeros(C, 1, 1),
                           torch.ones(C, 1, 1), size)


def test_tiny_imagenet_as_unpacked_gets_the_labels_of_its_folders_and_of_val_annotations(tmp_path):
    """Train labels are the sorted wnid folders; val labels come from val_annotations.txt by wnid."""
    from PIL import Image                                        # torchvision's own dependency
    base = tmp_path / "tiny-imagenet-200"
    colour = {"n02": 40, "n01": 200}                             # written out of order on purpose
    for wnid, v in colour.items():
        (base / "train" / wnid / "images").mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("not an image")
        for i in range(2):
            Image.new("RGB", (64, 64), (v, v, v)).save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    for name, wnid in (("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")):
        Image.new("RGB", (64, 64), (colour[wnid],) * 3).save(base / "val" / "images" / name)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t9\t9\n"
                                                      "val_1.JPEG\tn01\t0\t0\t9\t9\nval_2.JPEG\tn02\t1\t1\t8\t8\n")
    train, val = myow.load_images(myow.Run(dataset="tiny-imagenet", data_dir=str(tmp_path)), "cpu")
    assert train.x.shape == (4, 3, 64, 64) and train.labels.tolist() == [0, 0, 1, 1]     # n01 is class 0
    assert val.labels.tolist() == [1, 0, 1]
    for s in (train, val):                                       # each image is its class's colour
        colours = torch.tensor([(200., 40.)[c] for c in s.labels])
        assert torch.allclose(s.x.float().mean((1, 2, 3)), colours, atol=2)
    with pytest.raises(nd.DataError, match="unpack tiny-imagenet-200.zip"):
        myow.load_images(myow.Run(dataset="tiny-imagenet", data_dir=str(tmp_path / "elsewhere")), "cpu")


def test_crop_and_flip_are_drawn_per_sample_within_range():
    torch.manual_seed(0)
    theta = myow.crop_flip_params(20000, (0.2, 1.0), 0.5, torch.device("cpu"))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area, aspect = w * h, w / h
    assert (area >= 0.2 - 1e-6).all() and (area <= 1 + 1e-6).all()
    assert ((aspect >= 0.75 - 1e-5) & (aspect <= 4 / 3 + 1e-5)).float().mean() > 0.99   # else whole image
    assert abs((theta[:, 0, 0] < 0).float().mean() - 0.5) < 0.02                         # flip p = 0.5
    assert (theta[:, 0, 2].abs() <= 1 - w + 1e-6).all()                                  # inside the image
    assert len(torch.unique(area)) > 19000                                               # per sample
    mined = myow.crop_flip_params(5000, (0.8, 1.0), 0.0, torch.device("cpu"))
    assert (mined[:, 0, 0] > 0).all() and (mined[:, 0, 0] * mined[:, 1, 1] >= 0.8 - 1e-6).all()


def test_image_views_differ_per_sample_and_stay_in_range():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    data = image_split(img)
    cfg = myow.Config(dataset="cifar10")
    v = myow.augment(data, torch.zeros(64, dtype=torch.long), cfg)                  # one image, 64 views
    assert v.shape == (64, 3, 32, 32) and v.min() >= 0 and v.max() <= 1
    flat = v.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 0       # all 64 differ
    cfg.gray_p, cfg.color_p = 1.0, 0.0
    g = myow.augment(data, torch.zeros(16, dtype=torch.long), cfg)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    cfg.gray_p, cfg.color_p, cfg.crop_area = 0.0, 1.0, "1:1"
    flat_img = image_split(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8))
    means = myow.augment(flat_img, torch.zeros(200, dtype=torch.long), cfg).mean((1, 2, 3))
    assert means.std() > 0.05                                               # brightness per sample


def test_color_jitter_and_grayscale_match_torchvision_per_sample():
    """App. C names torchvision's ColorJitter and RandomGrayscale: with each sample's own factors
    and order of the four operations fixed, every image equals torchvision applied to it alone."""
    import torchvision.transforms.v2.functional as TF
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    torch.manual_seed(0)
    for C in (3, 1):
        x = torch.rand(48, C, 9, 9)
        x[0], x[1, :, :3] = 0.5, 0.0                          # a gray image; a black patch
        order = torch.rand(48, 4).argsort(1)
        factors = torch.cat([torch.rand(48, 3) * 1.2 + 0.4, torch.rand(48, 1) - 0.5], 1)
        y = myow.color_jitter(x, [0.6, 0.6, 0.6, 0.5], 1.0, order, factors)
        for i in range(48):
            ref = x[i]
            for o in order[i]:
                ref = ops[o](ref, float(factors[i, o]))
            assert (ref - y[i]).abs().max() <= 1e-4, (C, i, order[i])
        assert torch.allclose(myow.gray(x), TF.rgb_to_grayscale(x), atol=1e-6)


def test_autocast_is_bf16_for_image_encoders_on_cuda_only():
    """bf16 on CUDA for images; the neural MLP stays in float32 (README); CPU never autocasts."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for args, want in ((["--dataset", "cifar10"], torch.bfloat16), (["--dataset", "chewie1"], None),
                       (["--dataset", "chewie1", "--precision", "bf16"], torch.bfloat16),
                       (["--dataset", "cifar10", "--precision", "fp32"], None)):
        cfg = myow.parse_config(args)
        with pytest.warns(UserWarning) if want and not torch.cuda.is_available() else nullcontext():
            ctx = myow.autocast_for(cfg, cuda)
        assert getattr(ctx, "fast_dtype", None) == want, args
        assert getattr(myow.autocast_for(cfg, cpu), "fast_dtype", None) is None


def test_cuda_runs_autotune_convolutions(monkeypatch):
    """Every shape in a run is fixed, so cuDNN may pick its fastest kernels once (a GPU run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.delenv("RANK", raising=False)
    assert myow.setup_distributed(myow.parse_config([]))[2].type == "cuda" and torch.backends.cudnn.benchmark


def test_torchrun_with_more_processes_than_gpus_is_refused_before_any_work(monkeypatch):
    """--nproc_per_node 2 on a one-GPU machine: one line naming the fix, not a CUDA traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(myow.dist, "init_process_group", lambda *a, **k: pytest.fail("process group started"))
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(myow.ConfigError, match="--nproc_per_node 1, or --device cpu"):
        myow.setup_distributed(myow.parse_config([]))


@pytest.mark.parametrize("method", ["myow", "byol"])
def test_every_online_parameter_gets_a_gradient(method):
    """DistributedDataParallel waits for a gradient of every parameter: a module that a method
    builds but never uses (h for BYOL) hangs the second step on several GPUs."""
    cfg = myow.parse_config(["--dataset", "dsprites", "--method", method, "--batch-size", "16", "--pool-size", "16"])
    data = image_split(torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8))
    model, target = myow.build_networks(cfg, data)
    s = torch.arange(16)
    x, x2, x_m = myow.augment(data, torch.cat([s, s]), cfg).split(16) + (myow.augment(data, s, cfg, t_m=True),)
    views = torch.cat([x, x2, x_m]) if method == "myow" else torch.cat([x, x2])
    y, p, r_v = model(views, 32, slice(32, 48) if method == "myow" else None)
    (p.sum() + (r_v.sum() if r_v is not None else 0)).backward()
    missing = [n for n, t in model.named_parameters() if t.grad is None]
    assert not missing, missing
    assert (sum(t.numel() for t in model.net.h.parameters()) > 0) == (method == "myow")


def test_image_weight_decay_spares_batchnorm_and_biases():
    """App. C's decay 5e-4 as BYOL applies it: on every weight matrix and convolution kernel,
    never on BatchNorm scales and shifts or biases."""
    data = image_split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    cfg = myow.Config(dataset="cifar10", arch="resnet18")
    model, _ = myow.build_networks(cfg, data)
    decay = {id(p): g["weight_decay"] for g in myow.optimizer(cfg, model).param_groups for p in g["params"]}
    assert len(decay) == len(list(model.parameters()))
    seen = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert decay[id(m.weight)] == decay[id(m.bias)] == 0.0, name
            seen += 2
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert decay[id(m.weight)] == 5e-4, name
            assert m.bias is None or decay[id(m.bias)] == 0.0, name
            seen += 1 + (m.bias is not None)
    assert seen == len(decay)                                   # every parameter was checked


def test_layouts_give_the_right_head_shapes():
    data = image_split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    for layout, h_in in (("cascaded", 256), ("parallel", 512), ("single", None)):
        cfg = myow.Config(dataset="cifar10", layout=layout)
        model, target = myow.build_networks(cfg, data)
        net = model.net
        assert net.g[0].in_features == 512 and net.g[3].out_features == 256        # MLP(512, 4096, 256)
        assert net.g[0].out_features == 4096 and model.q[0].in_features == 256
        if h_in is None:
            assert isinstance(net.h, torch.nn.Identity)
        else:
            assert net.h[0].in_features == h_in and net.h[3].out_features == 256
        y, p, r_v = model(torch.randn(6, 3, 32, 32), 4, slice(4, 6))
        assert y.shape == (6, 512) and p.shape == (4, 256) and r_v.shape == (2, 256)
    f = myow.build_networks(myow.Config(dataset="cifar10", arch="resnet50"), data)[0].net.f
    assert f.conv1.kernel_size == (3, 3) and f.conv1.stride == (1, 1)
    assert f(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_an_image_runs_encoder_pt_gives_the_representations_it_read_out(tmp_path, monkeypatch):
    small = [image_split(torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8)) for n in (64, 40)]
    small[1].labels = torch.arange(40) % 3
    small[0].labels = torch.arange(64) % 3
    monkeypatch.setattr(myow, "load_images", lambda cfg, device: list(small))
    seen = read_out_features(monkeypatch)
    cfg = myow.parse_config(["--dataset", "dsprites", "--epochs", "1", "--batch-size", "32", "--pool-size", "32",
                             "--eval-epochs", "1", "--eval-milestones", "1", "--out", str(tmp_path), "--device", "cpu"])
    myow.run(cfg)
    emb = seen["feats"][2]                                              # the test images'
    assert emb.shape == (40, 9 * 128)                                   # small CNN: 3 x 3 x 128
    f = myow.load_encoder(tmp_path / "encoder.pt")                      # uint8 images in, y out
    np.testing.assert_allclose(f(small[1].x).numpy(), emb, rtol=1e-4, atol=1e-4)
    for shape in ((2, 3, 32, 32), (2, 1, 28, 28), (2, 32, 32)):         # channels, the size it was trained on
        with pytest.raises(ValueError, match=rf"\(n, 1, 32, 32\).*{re.escape(str(shape))}"):
            f(torch.zeros(shape, dtype=torch.uint8))
    for hostile in (small[1].x.float(), None, "images", [[1, 2], [3]]):
        with pytest.raises(ValueError, match=r"uint8 images \(n, 1, 32, 32\)"):
            f(hostile)


def test_cifar10_layout_loads_through_the_real_loader(tmp_path, monkeypatch):
    import torchvision
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)  # fakes fail md5
    cfg = myow.Run(dataset="cifar10", data_dir=str(tmp_path))
    train, test = myow.load_images(cfg, torch.device("cpu"))
    assert train.x.shape == (20, 3, 32, 32) and train.x.dtype == torch.uint8 and len(test) == 4
    raw = pickle.load(open(base / "data_batch_1", "rb"))["data"][0].reshape(3, 32, 32)
    assert np.array_equal(train.x[0].numpy(), raw)                       # channels first, same pixels
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: False)
    with pytest.raises(nd.DataError, match="--download"):
        myow.load_images(cfg, torch.device("cpu"))


def test_image_path_learns_on_dsprites():
    """96 steps of B = 64 on 2,048 dSprites images: on 1,024 unseen images, two views of an image
    come closer than views of different images (mean cosine of y, BatchNorm in eval mode), by far
    more than under the untrained encoder. Measured over seeds 0-9 on this CPU: untrained 0.061-0.087,
    trained 0.110-0.142, the least margin 0.029. A linear readout of the shape after so few
    steps was not a test: trained minus untrained ranged from -3.1 to +18.5 over the same seeds."""
    cfg = myow.parse_config(["--dataset", "dsprites", "--epochs", "3", "--batch-size", "64", "--pool-size", "64"])
    train, test, _ = myow.load_images(cfg, torch.device("cpu"))
    train, test = (myow.ImageSplit(s.x[:n], s.labels[:n], train.mean, train.std, 32) for s, n in
                   ((train, 2048), (test, 4096)))
    torch.manual_seed(cfg.seed)
    untrained = myow.build_networks(cfg, train)[0].net.f
    trained = myow.train(cfg, train, torch.device("cpu")).net.f

    def invariance(f):                                          # same image minus different images
        f.eval()
        torch.manual_seed(321)
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(123))[:1024]
        with torch.no_grad():
            a, b = (torch.nn.functional.normalize(f(myow.augment(test, idx, cfg)), dim=1) for _ in range(2))
        return float((a * b).sum(1).mean() - (a @ b.T).mean())
    before, after = invariance(untrained), invariance(trained)
    assert after > before + 0.015 and after > 1.2 * before, (before, after)


@pytest.mark.parametrize("method", ["myow", "byol"])
def test_image_step_runs_for_both_methods(method):
    cfg = myow.parse_config(["--dataset", "dsprites", "--method", method, "--epochs", "1", "--batch-size", "32",
                             "--pool-size", "32"])
    splits = myow.load_images(cfg, torch.device("cpu"))
    splits[0] = myow.ImageSplit(splits[0].x[:64], splits[0].labels[:64], splits[0].mean, splits[0].std, 32)
    model, last = myow.train_logged(cfg, splits[0], torch.device("cpu"))
    assert (last["mining_class_acc"] is None) == (method == "byol") and math.isfinite(last["loss"])


def test_unlabelled_recording_trains(tmp_path, capsys):
    rates = np.random.default_rng(0).poisson(5, (900, 12)).astype(np.float32)
    np.savez(tmp_path / "r.npz", firing_rates=rates, trial=np.repeat(np.arange(90), 10))
    p = cli(capsys, "--dataset", "npz", "--data-file", str(tmp_path / "r.npz"), "--epochs", "3", "--batch-size", "128")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert "test_acc" not in res and res["mining_class_acc"] is None     # nothing to compare with


def test_readme_own_recording_and_use_what_you_trained_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's examples as written: spikes of one continuous recording (40 units, 3,000 bins
    of 100 ms, three states in blocks) binned and saved, trained from the command line (the mask's
    default gap comes from the recording's length), then its encoder.pt embeds another session and
    a linear decoder reads the states from it."""
    text = open(os.path.join(HERE, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    make, use = ([b for b in blocks if word in b][0] for word in ("bin_spikes", "load_encoder"))
    command = re.search(r"^python myow.py --dataset npz .*--out .*$", text, re.M).group(0)
    rng = np.random.default_rng(0)
    T, n_units = 3000, 40
    tuning = rng.uniform(2, 20, (3, n_units))                          # Hz per state and unit

    def session(T):
        state = (np.arange(T) // 250) % 3                              # 25 s blocks
        counts = rng.poisson(tuning[state] * 0.1)                       # (T, N) spikes per 100 ms
        return state, counts
    state_per_bin, counts = session(T)
    edges = np.arange(T + 1) * 0.1
    unit_ids = np.tile(np.arange(n_units), T).repeat(counts.ravel())
    spike_times_s = edges[:-1].repeat(n_units).repeat(counts.ravel()) + rng.uniform(0, 0.1, counts.sum())
    monkeypatch.chdir(tmp_path)
    exec(make, dict(spike_times_s=spike_times_s, unit_ids=unit_ids, n_units=n_units, edges=edges,
                    state_per_bin=state_per_bin))
    p = subprocess.run([sys.executable, os.path.join(HERE, "myow.py"), *shlex.split(command)[2:], "--epochs", "20"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "split in time: mined views >= 12.5 s away" in p.stdout.splitlines()[0]
    assert json.loads(p.stdout.strip().splitlines()[-1])["test_f1"] > 80          # 3 states
    day2, counts2 = session(1000)
    np.savez("day2.npz", firing_rates=counts2 / 0.1, labels=day2)
    exec(use, {})
    assert float(capsys.readouterr().out.split("decoded")[1]) > 0.8
    nwb = [b for b in blocks if "pynwb" in b][0].split("\n", 1)[1]       # after reading the file
    env = dict(units=[spike_times_s[unit_ids == u] for u in range(n_units)], np=np, bin_spikes=nd.bin_spikes)
    exec(nwb, env)                                                     # every spike in a 10 ms bin
    assert env["rates"].shape[1] == n_units and round(env["rates"].sum() * 0.01) == counts.sum()


def test_readme_picture_of_mined_views_runs_as_written(tmp_path, monkeypatch):
    """The README's route to Fig. 2 after a dSprites run: anchors and their three nearest candidates
    under the trained encoder, by the method's own `nearest`, saved as a picture."""
    monkeypatch.chdir(tmp_path)
    myow.main(["--dataset", "dsprites", "--train-fraction", "0.02", "--epochs", "1", "--eval-epochs", "1",
               "--eval-milestones", "1", "--out", "runs/d"])
    text = open(os.path.join(HERE, "README.md")).read()
    exec([b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "mined_views.png" in b][0], {})
    from PIL import Image                                         # torchvision's own dependency
    picture = Image.open(tmp_path / "mined_views.png")
    assert picture.size == (8 * 34 + 2, 8 * 34 + 2)               # 16 anchors x (1 + 3), 8 a row, 2 px gaps


# --- dSprites (Appendix I) and the supervised baseline on images ------------------------------
def test_dsprites_has_holes_in_the_latent_manifold_as_appendix_i():
    """Half of the 6 scale and of the 40 orientation values kept (the same halves in train and
    test), training a fraction r of the kept images, test the rest of them, holes outside."""
    r, grid = 0.075, myow.DSPRITES
    (x_tr, i_tr), (x_te, i_te), (x_ho, i_ho) = myow.dsprites(r, seed=4)
    latents = [torch.stack(torch.unravel_index(i, grid), 1) for i in (i_tr, i_te, i_ho)]   # (n, 5)
    kept_scales, kept_angles = latents[0][:, 1].unique(), latents[0][:, 2].unique()
    assert len(kept_scales) == 3 and len(kept_angles) == 20
    assert set(latents[1][:, 1].tolist()) == set(kept_scales.tolist())      # test: the same values
    assert set(latents[1][:, 2].tolist()) == set(kept_angles.tolist())
    in_kept = torch.isin(latents[2][:, 1], kept_scales) & torch.isin(latents[2][:, 2], kept_angles)
    assert not in_kept.any() and len(i_ho) == 10000
    kept = 3 * 3 * 20 * 16 * 16
    assert len(i_tr) == round(r * kept) and len(i_tr) + len(i_te) == kept
    assert len(set(i_tr.tolist()) | set(i_te.tolist())) == kept                 # disjoint, complete
    assert x_tr.shape == (len(i_tr), 1, 32, 32) and x_tr.dtype == torch.uint8
    assert (x_tr.flatten(1).float().mean(1) > 0).all()                     # every sprite is drawn
    # all three shapes, in equal shares up to sampling
    assert (latents[0][:, 0].bincount(minlength=3).float() / len(i_tr) - 1 / 3).abs().max() < 0.05
    assert not torch.equal(myow.dsprites(r, seed=5)[0][1], i_tr)             # holes depend on the seed


def test_supervised_baseline_on_images_trains_the_same_encoder():
    """Two classes of images (dark and bright): the supervised baseline learns them with the
    encoder --arch builds, and its readout separates them."""
    torch.manual_seed(0)
    x = torch.cat([torch.randint(0, 100, (128, 1, 32, 32)), torch.randint(155, 256, (128, 1, 32, 32))])
    data = image_split(x.to(torch.uint8))
    data.labels = torch.arange(256) // 128
    cfg = myow.parse_config(["--dataset", "dsprites", "--method", "supervised", "--epochs", "5",
                             "--batch-size", "64", "--warmup-epochs", "1", "--eval-epochs", "10",
                             "--eval-milestones", "8"])
    torch.manual_seed(cfg.seed)
    built = myow.build_networks(cfg, data)[0].net.f                  # the initial f of MYOW and BYOL
    f = myow.train_supervised(cfg, [data, None, data], torch.device("cpu"))
    before, after = built.state_dict(), f.state_dict()
    assert [t.shape for t in after.values()] == [t.shape for t in before.values()]
    assert not torch.equal(after["0.weight"], before["0.weight"])     # the encoder itself trained
    feats = myow.representations(f, [data, data])
    res = myow.linear_eval([feats[0], None, feats[1]], [data.labels, None, data.labels], "class", cfg)
    assert res["test_acc"] > 95, res
