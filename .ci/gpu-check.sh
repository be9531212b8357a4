#!/usr/bin/env bash
# Issue 39's measurements on a lent GPU, prepared so that device minutes go to measuring, one part a call
# (a call may run 600 s):
#   bash .ci/gpu-check.sh part1      # the suite with CUDA visible (beside the rest); random32, 3 epochs,
#                                    # MYOW and BYOL eager, MYOW --compile; fit and load_encoder on cuda
#   bash .ci/gpu-check.sh part2 N M  # --size 1000000,N (N = 200, then 1000), the default recipe, --method M
# Part 3 (App. I) is plain commands: python myow.py --dataset dsprites --arch resnet18 --train-fraction R
# --epochs E --method M (r = 0.3 BYOL first, to see it reach 95 %; r = 0.075 with 4 E epochs, same steps).
# Every step has its own time limit and writes $OUT/<step>.txt; here one line a step: its exit status,
# seconds and last line (the JSON results). SMALL=1 runs the same steps tiny on a CPU, to try the script.
set -u
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
small=${SMALL:-0}
dev=cuda
short="--epochs 3 --eval-epochs 2 --eval-milestones 1"
if [ "$small" = 1 ]; then
    dev=cpu
    short="--steps 2 --eval-epochs 1 --eval-milestones 1 --arch convnet --batch-size 64 --pool-size 64"
fi

step() {                                        # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $?, $((SECONDS - t0)) s | $(tail -n 1 "$out/$name.txt" | cut -c1-700)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1
case "${1:-}" in
part1)
    step tests 300 python -m pytest -q -p no:cacheprovider &
    step random32-myow 90 python myow.py --dataset random32 --device $dev $short
    step random32-byol 90 python myow.py --dataset random32 --device $dev --method byol $short
    step random32-myow-compile 240 python myow.py --dataset random32 --device $dev --compile $short
    step fit-load-encoder 60 env DEV=$dev FIT_OUT="$out/fit" python -c '
import os, myow, neural_data
dev, rec = os.environ["DEV"], neural_data.synthetic_session(20000, 50)
result, f = myow.fit(rec.rates, time=rec.time, labels=rec.labels, bin_s=rec.bin_s, steps=300, device=dev,
                     out=os.environ["FIT_OUT"])
g = myow.load_encoder(os.environ["FIT_OUT"] + "/encoder.pt", dev)
y, y2 = f(rec.rates[:1000]), g(rec.rates[:1000])
print({"device": str(y.device), "shape": tuple(y.shape), "same": bool((y == y2).all()),
       "test_r2": result["test_r2"]})'
    wait
    ;;
part2)
    size="1000000,${2:?part2 N: the number of neurons}"
    [ "$small" = 1 ] && size="2000,$2 --steps 20"
    step scale-1m-x$2-${3:-myow} 580 python myow.py --device $dev --size $size --method ${3:-myow}
    ;;
*)
    echo "usage: bash .ci/gpu-check.sh part1 | part2 N [myow|byol]" >&2
    exit 2
    ;;
esac
