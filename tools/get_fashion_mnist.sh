#!/usr/bin/env bash
# Make Fashion-MNIST's idx files available: the Debian package dataset-fashion-mnist, installed system-wide
# as root, else downloaded and unpacked into .data/fashion-mnist (no root needed). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

package_dir=usr/share/datasets/fashion-mnist   # where the package puts the files
system_dir=/$package_dir
project_dir=.data/fashion-mnist
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() { for f in "${files[@]}"; do [ -s "$1/$f" ] || return 1; done; }

if have_all "$system_dir" || have_all "$project_dir"; then
    exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    have_all "$system_dir" && exit 0
fi

echo "downloading Debian package dataset-fashion-mnist into $project_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download dataset-fashion-mnist >/dev/null)
dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
mkdir -p "$project_dir"
cp "$work/root/$package_dir"/*.gz "$project_dir"/
have_all "$project_dir" || { echo "Fashion-MNIST files missing after unpacking" >&2; exit 1; }
