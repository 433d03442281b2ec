#!/usr/bin/env bash
# Fetch CIFAR-10 (python version) into a folder the compute nodes can read. Run it once on a login
# node: compute nodes have no network, and cifar10_train.py never downloads.
#
#   ./prepare_cifar10.sh [DEST]        (default: ./data)  →  DEST/cifar-10-batches-py
#
# Then pass --data-dir DEST/cifar-10-batches-py to cifar10_train.py (or export CIFAR10_DIR).
set -euo pipefail

url=https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
md5=c58f30108f718f92721af3b95e74349a
dest=${1:-data}
target=$dest/cifar-10-batches-py

if [[ -f $target/test_batch ]]; then
  echo "already prepared: $target"
  exit 0
fi
mkdir -p "$dest"
tarball=$dest/cifar-10-python.tar.gz

# -C - resumes a partial download left by an interrupted run.
curl --fail --location --retry 3 -C - --output "$tarball.part" "$url"
# The training script unpickles these files, which can run code: use them only if the md5 matches.
if ! echo "$md5  $tarball.part" | md5sum --check --quiet -; then
  rm -f "$tarball.part"
  echo "error: $url did not match md5 $md5; deleted it, run this script again" >&2
  exit 1
fi
mv "$tarball.part" "$tarball"

# Unpack beside the target and rename at the end, so an interrupted run never leaves a half folder
# that looks complete.
tmp=$(mktemp -d "$dest/.extract.XXXXXX")
tar -xzf "$tarball" -C "$tmp"
mv "$tmp/cifar-10-batches-py" "$target"
rmdir "$tmp"
rm "$tarball"
# Readable by the whole group: the point of a shared folder.
chmod -R g+rX "$target"
echo "prepared: $target"
