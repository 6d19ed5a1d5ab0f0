#!/usr/bin/env bash
# Train on one node: launch/torchrun.sh CONFIG [key.sub=value ...]
# Knobs (environment):
#   NPROC        processes on this node (default: the number of GPUs, else 2 on a CPU)
#   PYTHON       interpreter with the package installed (default: .venv/bin/python)
# With no GPU, every process runs on the CPU and they form one gloo group.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PYTHON" ] || { echo "no Python at $PYTHON: run 'make demo' or set PYTHON" >&2; exit 2; }
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}

[ $# -ge 1 ] || { echo "usage: $0 CONFIG [key.sub=value ...]" >&2; exit 2; }

# One thread per process on a CPU run, unless set: processes share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m pipeline.train "$@"
