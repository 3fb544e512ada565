"""What the harness's seccomp filter (sandbox/seccomp.py) costs: the same work in a fresh
interpreter with the filter on and off, side by side.

    python bench/bench_seccomp.py [--repeat 5]

Each round starts two child interpreters (alternating which goes first) that set
no_new_privs, install the filter or not, then time: installing it, 200,000 system calls
(os.stat of one file: every call runs the filter's ~80 instructions) and a small torch
training loop (what a candidate does). Prints the medians and the ratios on / off. Not a
test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import ctypes, json, os, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from sandbox import seccomp
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)        # PR_SET_NO_NEW_PRIVS, as the backends do
torch.set_num_threads(1)
t = time.perf_counter()
if sys.argv[1] == "on":
    seccomp.install()
install = time.perf_counter() - t
t = time.perf_counter()
for _ in range(200_000):
    os.stat(".")
calls = time.perf_counter() - t
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
t = time.perf_counter()
for _ in range(300):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
train = time.perf_counter() - t
print(json.dumps({"install": install, "syscalls": calls, "train": train}))
"""


def once(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(ROOT)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for i in range(args.repeat):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            runs[mode].append(once(mode))
    print(f"{'':10s} {'filter on':>12s} {'filter off':>12s} {'on / off':>9s}")
    for key, unit, scale in (("install", "ms", 1e3), ("syscalls", "s", 1), ("train", "s", 1)):
        on = statistics.median(r[key] for r in runs["on"])
        off = statistics.median(r[key] for r in runs["off"])
        ratio = f"{on / off:9.3f}" if key != "install" else f"{'-':>9s}"
        print(f"{key:10s} {on * scale:10.3f}{unit:>2s} {off * scale:10.3f}{unit:>2s} {ratio}")
    print(f"({args.repeat} rounds each; syscalls: 200,000 os.stat; train: 300 SGD steps of a "
          "64-128-10 MLP, batch 256, one thread)")


if __name__ == "__main__":
    main()
