"""Load times of a built-in model: first load (dequantize the GGUF and write the safetensors cache) versus
later loads (read the cache). Issue 2 asks for the second load to be well under half the first.

Each load runs in a fresh subprocess (no warm imports or page-cache tricks inside one process). The GGUF is
copied from the normal cache into a temporary cache, so the download itself is not timed (run
`safetyheads fetch NAME` first).

    python benchmarks/load_times.py [--model qwen2.5-coder-0.5b-instruct] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetyheads.models import builtin_gguf_path, fetch_builtin

LOAD = "from safetyheads.models import load_model; load_model({spec!r}, device='cpu', dtype='float32')"


def timed_load(spec: str, cache: Path) -> float:
    env = {**os.environ, "SAFETYHEADS_CACHE": str(cache), "SAFETYHEADS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD.format(spec=spec)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--repeats", type=int, default=2, help="cached loads to time")
    args = ap.parse_args()
    gguf = fetch_builtin(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        os.environ["SAFETYHEADS_CACHE"] = str(cache)
        target = builtin_gguf_path(args.model)
        target.parent.mkdir(parents=True)
        shutil.copy(gguf, target)
        first = timed_load(args.model, cache)
        later = [timed_load(args.model, cache) for _ in range(args.repeats)]
    print(f"model: {args.model}  (each load in a fresh process, including python + torch import)")
    print(f"first load (dequantize + write cache): {first:7.1f} s")
    for i, t in enumerate(later, 2):
        print(f"load {i} (safetensors cache):          {t:7.1f} s   = {t / first:.0%} of the first")
    print(f"load-average during the run: {os.getloadavg()[0]:.1f} (other processes slow everything down)")


if __name__ == "__main__":
    main()
