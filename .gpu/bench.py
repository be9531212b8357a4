"""GPU measurements behind README "Images and neural data on a GPU"; from the repository root:
    python .gpu/bench.py PART [PART ...]
Parts: speed views sync compile bf16 neural torchrun resume fmnist=EPOCHS, in the order given, each
skipped once BUDGET seconds (env) have passed. Results go to $OUT/bench.jsonl. Data (ignored by git):
Fashion-MNIST's raw/ files under .gpu/data/FashionMNIST/raw and the Chewie-1 pickle in .gpu/data,
copied from ../shared/data (gzip the four raw files to send them, gunzip them there)."""
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import myow  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
DATA = ".gpu/data"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T_START = time.time()
BUDGET = float(os.environ.get("BUDGET", "540"))
RESULTS = []
RESNET = ["--arch", "resnet18", "--proj-hidden", "4096", "--proj-dim", "256", "--pred-hidden", "4096",
          "--batch-size", "512", "--pool-size", "512"]   # the CIFAR-10 preset's network on Fashion-MNIST


def record(**kw):
    kw["t"] = round(time.time() - T_START, 1)
    RESULTS.append(kw)
    print("RESULT", json.dumps(kw), flush=True)
    with open(os.path.join(OUT, "bench.jsonl"), "a") as fh:
        fh.write(json.dumps(kw) + "\n")


def left():
    return BUDGET - (time.time() - T_START)


def cfg_of(*args):
    return myow.parse_config(["--data-dir", DATA, *map(str, args)])


def timed_train(cfg, data):
    """Train; return per-epoch seconds (epoch ends synchronise: the log reads the stats) and logs."""
    stamps, logs = [time.time()], []

    def log(rec, **_):
        stamps.append(time.time())
        logs.append(rec)
    model, last = myow.train(cfg, data, DEV, log)
    return [b - a for a, b in zip(stamps, stamps[1:])], logs, model


def part_speed(compile=False):
    for method in ("myow", "byol"):
        cfg = cfg_of("--dataset", "random32", "--method", method, "--epochs", 4, *(["--compile"] if compile else []))
        data = myow.load_images(cfg, DEV)[0]
        secs, logs, _ = timed_train(cfg, data)
        record(part="speed", method=method, compile=compile, epoch_s=[round(s, 3) for s in secs],
               s_per_epoch=round(statistics.median(secs[1:]), 3), steps_per_epoch=len(data) // cfg.batch_size,
               loss=logs[-1]["loss"], mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        torch.cuda.reset_peak_memory_stats()
    m = [r for r in RESULTS if r["part"] == "speed" and r["compile"] == compile]
    record(part="speed_ratio", compile=compile, myow_over_byol=round(m[-2]["s_per_epoch"] / m[-1]["s_per_epoch"], 3))


def part_sync():
    """Steps 21-30 under sync debug 'warn' (every sync recorded with its Python stack), 31-40 'error'."""
    for method in ("myow", "byol"):
        cfg = cfg_of("--dataset", "random32", "--method", method, "--epochs", 1)
        data = myow.load_images(cfg, DEV)[0]
        calls, orig, stacks = [0], myow.update_target, []

        def wrapped(xi, theta, tau):
            orig(xi, theta, tau)
            calls[0] += 1
            if calls[0] in (20, 30, 40):
                torch.cuda.set_sync_debug_mode({20: "warn", 30: "error", 40: 0}[calls[0]])

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                stacks.append("".join(traceback.format_stack()[-8:-1]))
        myow.update_target = wrapped
        error, old_show = None, warnings.showwarning
        warnings.showwarning = show
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            try:
                myow.train(cfg, data, DEV, lambda *a, **k: None)
            except RuntimeError:
                error = traceback.format_exc()[-2000:]
        warnings.showwarning = old_show
        torch.cuda.set_sync_debug_mode(0)
        myow.update_target = orig
        record(part="sync", method=method, n_warned=len(stacks), first_stacks=stacks[:2], error=error,
               steps_warn="21-30", steps_error="31-40")


def part_views():
    """Cost of making one step's views (x, x' ~ T of 2B anchors; x_m, x_c ~ T_m of B + L) with
    CUDA events, and a profiler table of a few MYOW steps."""
    cfg = cfg_of("--dataset", "random32", "--epochs", 1)
    data = myow.load_images(cfg, DEV)[0]
    B = cfg.batch_size
    s, c = torch.randperm(len(data), device=DEV)[:B], torch.randperm(len(data), device=DEV)[:B]
    for _ in range(3):
        data.views(torch.cat([s, s]), cfg), data.views(torch.cat([s, c]), cfg, mined=True)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        e0.record()
        data.views(torch.cat([s, s]), cfg), data.views(torch.cat([s, c]), cfg, mined=True)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    ms = statistics.median(times)
    step = [r for r in RESULTS if r["part"] == "speed" and r["method"] == "myow" and not r["compile"]]
    step_ms = step[-1]["s_per_epoch"] / step[-1]["steps_per_epoch"] * 1000 if step else float("nan")
    record(part="views", views_ms=round(ms, 3), step_ms=round(step_ms, 2), fraction=round(ms / step_ms, 4))
    # profiler over 6 steps
    from torch.profiler import ProfilerActivity, profile, record_function
    sub = myow.ImageSplit(data.x[:B * 8], data.labels[:B * 8], data.mean, data.std, data.size)
    orig = myow.augment_images

    def labelled(*a, **k):
        with record_function("views"):
            return orig(*a, **k)
    myow.augment_images = labelled
    cfg2 = cfg_of("--dataset", "random32", "--epochs", 2)
    myow.train(cfg2, sub, DEV, lambda *a, **k: None)            # warm-up (cudnn autotune)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        myow.train(cfg2, sub, DEV, lambda *a, **k: None)
    myow.augment_images = orig
    ev = prof.key_averages()
    total = sum(e.self_device_time_total for e in ev)
    views = sum(e.device_time_total for e in ev if e.key == "views")
    record(part="views_profiler", views_fraction_of_gpu_time=round(views / total, 4), gpu_ms_total=round(total / 1e3, 1))
    with open(os.path.join(OUT, "profile.txt"), "w") as fh:
        fh.write(ev.table(sort_by="self_device_time_total", row_limit=40))


def part_bf16():
    """200 steps (10 epochs of 20 steps on 10,240 images) of MYOW with ResNet-18 on Fashion-MNIST,
    bf16 autocast against float32, seeds 0 and 1; then mining on the trained encoder."""
    curves, models = {}, {}
    for seed in (0, 1):
        for prec in ("bf16", "fp32"):
            cfg = cfg_of("--dataset", "fashion-mnist", *RESNET, "--epochs", 10, "--warmup-epochs", 1,
                         "--precision", prec, "--seed", seed)
            tr = myow.load_images(cfg, DEV)[0]
            sub = myow.ImageSplit(tr.x[:10240], tr.labels[:10240], tr.mean, tr.std, tr.size)
            secs, logs, model = timed_train(cfg, sub)
            curves[prec, seed] = [r["loss"] for r in logs]
            models[prec, seed] = model
            record(part="bf16", precision=prec, seed=seed, loss=[round(v, 4) for v in curves[prec, seed]],
                   loss_aug=[round(r["loss_aug"], 4) for r in logs], loss_mined=[round(r["loss_mined"], 4) for r in logs],
                   class_acc=[round(r["mining_class_acc"], 1) for r in logs], s_per_epoch=round(statistics.median(secs[1:]), 3))
    diff = lambda a, b: max(abs(u - v) for u, v in zip(curves[a], curves[b]))
    record(part="bf16_diff", bf16_vs_fp32_seed0=round(diff(("bf16", 0), ("fp32", 0)), 4),
           bf16_vs_fp32_seed1=round(diff(("bf16", 1), ("fp32", 1)), 4),
           fp32_seed0_vs_seed1=round(diff(("fp32", 0), ("fp32", 1)), 4),
           bf16_seed0_vs_seed1=round(diff(("bf16", 0), ("bf16", 1)), 4))
    # mining: float32 arithmetic under autocast, and what bf16 representations change
    f = models["fp32", 0].net.f.eval()
    cfg = cfg_of("--dataset", "fashion-mnist", *RESNET)
    tr = myow.load_images(cfg, DEV)[0]
    g = torch.Generator(DEV).manual_seed(0)
    a, c = torch.randperm(len(tr), generator=g, device=DEV)[:1024].split(512)
    torch.manual_seed(0)
    xa, xc = tr.views(a, cfg, mined=True), tr.views(c, cfg, mined=True)
    with torch.no_grad():
        ya32, yc32 = f(xa).float(), f(xc).float()
        with torch.autocast("cuda", torch.bfloat16):
            ya16, yc16 = f(xa), f(xc)
            allowed = torch.ones(512, 512, device=DEV)
            j16, _ = myow.mine(ya16, yc16, allowed.clone(), 1)
        ref = (torch.nn.functional.normalize(ya16.double(), dim=1) @ torch.nn.functional.normalize(yc16.double(), dim=1).T).argmax(1)
        j32, _ = myow.mine(ya32, yc32, allowed.clone(), 1)
    record(part="mining_precision", dtype_of_bf16_reps=str(ya16.dtype),
           mine_under_autocast_equals_float64_argmax=round((j16 == ref).float().mean().item(), 4),
           top1_same_bf16_vs_fp32_reps=round((j16 == j32).float().mean().item(), 4),
           same_label_fp32=round((tr.labels[a] == tr.labels[c[j32]]).float().mean().item(), 4),
           same_label_bf16=round((tr.labels[a] == tr.labels[c[j16]]).float().mean().item(), 4))


def cli(*args, env=None):
    t = time.time()
    p = subprocess.run([sys.executable, "myow.py", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    out = p.stdout.strip().splitlines()
    try:
        res = json.loads(out[-1])
    except Exception:
        res = {"error": (p.stderr or p.stdout)[-800:]}
    res["wall_s"] = round(time.time() - t, 2)
    return res


def part_neural():
    for seed in (0, 1, 2):
        for dev, prec in (("cuda", "fp32"), ("cuda", "bf16"), ("cpu", "auto")):
            if left() < 30:
                return
            r = cli("--dataset", "chewie1", "--data-dir", DATA, "--seed", seed, "--device", dev, "--precision", prec)
            record(part="neural", device=dev, precision=prec, seed=seed, **{k: r.get(k) for k in
                   ("test_acc", "test_delta_acc", "val_acc", "train_seconds", "eval_seconds", "total_seconds", "wall_s", "error")})


def part_torchrun():
    t = time.time()
    out = os.path.join(OUT, "tr")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "myow.py",
                        "--dataset", "random32", "--epochs", "2", "--out", out, "--ckpt-every", "1",
                        "--eval-epochs", "3", "--eval-milestones", "2"], capture_output=True, text=True)
    record(part="torchrun", rc=p.returncode, wall_s=round(time.time() - t, 1), stdout=p.stdout[-1200:],
           stderr=p.stderr[-1500:])


def part_resume():
    """Ctrl-C after the first epoch, then --resume: the CUDA index generator and every random state
    come back; the losses of each epoch are compared with an uninterrupted run."""
    import signal
    args = [sys.executable, "myow.py", "--dataset", "random32", "--epochs", "3", "--ckpt-every", "1",
            "--eval-epochs", "2", "--eval-milestones", "1"]
    a, b = os.path.join(OUT, "ra"), os.path.join(OUT, "rb")
    subprocess.run(args + ["--out", a], capture_output=True, text=True)
    p = subprocess.Popen(args + ["--out", b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not (os.path.exists(os.path.join(b, "log.jsonl"))
                                    and open(os.path.join(b, "log.jsonl")).read().strip()):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate()
    q = subprocess.run(args + ["--out", b, "--resume"], capture_output=True, text=True)
    la = [json.loads(l) for l in open(os.path.join(a, "log.jsonl"))]
    lb = [json.loads(l) for l in open(os.path.join(b, "log.jsonl"))]
    record(part="resume", interrupted_stderr=err[-300:], resume_rc=q.returncode, resume_stderr=q.stderr[-600:],
           loss_uninterrupted=[r["loss"] for r in la], loss_resumed=[r["loss"] for r in lb],
           results=[json.load(open(os.path.join(d, "results.json"))).get("test_acc") for d in (a, b)])


def part_fmnist(epochs):
    for method in ("myow", "byol"):
        r = cli("--dataset", "fashion-mnist", "--data-dir", DATA, *RESNET, "--method", method, "--epochs", epochs,
                "--warmup-epochs", max(1, epochs // 10), "--eval-epochs", 200, "--eval-milestones", "140,190")
        record(part="fmnist", **r)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    record(part="env", torch=torch.__version__, gpu=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
           commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    for part in sys.argv[1:]:
        name, _, arg = part.partition("=")
        if left() < 20:
            record(part=name, skipped="out of time")
            continue
        try:
            {"speed": part_speed, "compile": lambda: part_speed(compile=True), "sync": part_sync,
             "views": part_views, "bf16": part_bf16, "neural": part_neural, "torchrun": part_torchrun, "resume": part_resume,
             "fmnist": lambda: part_fmnist(int(arg or 10))}[name]()
        except Exception:
            record(part=name, failed=traceback.format_exc()[-2500:])
    print("\nSUMMARY")
    for r in RESULTS:
        print(json.dumps({k: v for k, v in r.items() if k not in ("stdout", "stderr")})[:400])
