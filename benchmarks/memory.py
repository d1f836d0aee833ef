"""Peak memory of training DenseNet-BC-100 (or any registry net) per batch size.

    python benchmarks/memory.py                                   # CPU: peak resident memory
    python benchmarks/memory.py --batches 32,64,128 --net densenet_bc_100_k12
    KERAS_BACKEND=jax python benchmarks/memory.py --device gpu    # GPU: peak device memory

Each batch size trains a few steps in its own process, on the model benchmarks/throughput.py
times (``ours``: tasks.modeling and tasks.speed with params.yaml's speed settings). On a
CPU the figure is the process's peak resident set (``ru_maxrss``), model, data and framework
included; on a GPU it is the backend allocator's peak (JAX ``peak_bytes_in_use``), with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so JAX takes memory as it needs it. The limit printed
next to each figure is the budget the performance work set: 8 GB on a CPU, 16 GB on a GPU,
for batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tasks/ and nets/ import
LIMITS_GB = {"cpu": 8.0, "gpu": 16.0}


def worker(net: str, batch: int, steps: int, device: str) -> dict:
    from benchmarks.throughput import ours, synthetic
    from tasks.modeling import EpochShuffledArrays

    model, resolved = ours(net)
    x, y = synthetic(batch * steps)
    model.fit(EpochShuffledArrays(x, y, batch, 0), epochs=1, verbose=0)
    if device == "gpu":
        import jax

        peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": int(peak), "resolved": resolved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="densenet_bc_100_k12")
    parser.add_argument("--batches", default="16,32,64,128")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.net, args.worker, args.steps, args.device)))
        return 0
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows, failed = [], False
    limit = LIMITS_GB[args.device]
    print(f"{args.net}, {args.device}, Keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}"
          f"; peak memory of {args.steps} training steps per batch size (limit {limit:g} GB at "
          "batch 64)", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        done = subprocess.run(
            [sys.executable, __file__, "--net", args.net, "--steps", str(args.steps),
             "--device", args.device, "--worker", str(batch)],
            capture_output=True, text=True, env=env, cwd=ROOT,
        )
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-10:])
            print(f"  batch {batch:4d}: failed (exit {done.returncode})\n{tail}", flush=True)
            rows.append({"batch": batch, "error": tail})
            save(args, rows)
            failed = True
            continue
        result = json.loads(found[0][7:])
        gb = result["peak_bytes"] / 1e9
        note = f"  ratio to the {limit:g} GB limit {gb / limit:.2f}" if batch == 64 else ""
        print(f"  batch {batch:4d}: peak {gb:6.2f} GB ({result['resolved']['precision']}){note}",
              flush=True)
        rows.append({"batch": batch, **result})
        save(args, rows)
    return 1 if failed else 0


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    """Rewrite ``--json`` after every batch size: a run stopped part-way (a time limit) keeps
    the rows it finished."""
    if args.json:
        from tasks.io import write_json

        write_json(args.json, {"net": args.net, "device": args.device, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
