#!/usr/bin/env bash
# Run here before bench/gpu.sh goes to a lent GPU machine: that machine has no internet and no
# Fashion-MNIST package, so its IDX files (about 30 MB) travel with the working tree. Copies them
# into .gpu-data/fashion-mnist/ (ignored by git), which the run names in its `carry` list:
#     bash bench/gpu_carry.sh      then the run: command "bash bench/gpu.sh", carry [".gpu-data"]
# FASHION_MNIST_DIR (default Debian's /usr/share/datasets/fashion-mnist) and GPU_DATA (default
# .gpu-data) change where from and where to.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
DEST=${GPU_DATA:-.gpu-data}/fashion-mnist
mkdir -p "$DEST"
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
    t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    if [ ! -f "$SRC/$f" ]; then
        echo "gpu_carry.sh: no $SRC/$f (sudo apt-get install dataset-fashion-mnist)" >&2
        exit 2
    fi
    cp "$SRC/$f" "$DEST/$f"
done
echo "$(du -sh "$DEST" | cut -f1) in $DEST; the run's carry: [\"${GPU_DATA:-.gpu-data}\"]"
