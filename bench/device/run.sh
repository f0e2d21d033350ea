#!/usr/bin/env bash
# On the GPU machine: unpack the bundle of scripts/device_bundle.sh once, then run `bench/NAME.py ARGS...`
# with it on the path (bench/README.md, "On the GPU machine"):
#
#   bash bench/device/run.sh service_gpu --out $OUT/service_gpu.json
#   PUSA_DEVICE_BUNDLE=.device-model bash bench/device/run.sh dit_forward ...   # the --model-only bundle
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1
shift
bundle=${PUSA_DEVICE_BUNDLE:-.device}  # the folder scripts/device_bundle.sh wrote (site.tar.xz)
default_site=/tmp/pusa-site
[[ $bundle == .device ]] || default_site=/tmp/pusa-site-$(basename "$bundle")
site=${PUSA_DEVICE_SITE:-$default_site}
if [[ ! -f $site/.unpacked ]]; then
  mkdir -p "$site"
  tar -C "$site" -xJf "$bundle/site.tar.xz"
  touch "$site/.unpacked"
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PATH=$site/bin:$PATH
export PUSA_CACHE_DIR=${PUSA_CACHE_DIR:-/tmp/pusa-cache}
exec python3 "bench/$name.py" "$@"
