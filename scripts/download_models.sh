#!/usr/bin/env bash
# Fetch the model repository (main_axcl builds, axmodels, tokenizer) pinned at the commit this service
# was written against, into models/. Needs network access to huggingface.co and about 2 GB of disk.
#
#   scripts/download_models.sh [DEST]     DEST defaults to models/Qwen2.5-1.5B-Instruct-GPTQ-Int4
#
# Uses the Hugging Face CLI (hf, from huggingface_hub, which .venv already has) when it is there,
# else git with git-lfs.
set -euo pipefail

repo="AXERA-TECH/Qwen2.5-1.5B-Instruct-GPTQ-Int4"
revision="01d5a6eb90d9be5dd3de32518ec99c04d9ae5da5"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/models/Qwen2.5-1.5B-Instruct-GPTQ-Int4}"

mkdir -p "$(dirname "$dest")"
if [ -x "$root/.venv/bin/hf" ]; then
  hf="$root/.venv/bin/hf"
elif command -v hf >/dev/null 2>&1; then
  hf="$(command -v hf)"
else
  hf=""
fi

if [ -n "$hf" ]; then
  echo "download: $repo@$revision with $hf"
  "$hf" download "$repo" --revision "$revision" --local-dir "$dest"
elif command -v git >/dev/null 2>&1 && git lfs version >/dev/null 2>&1; then
  echo "download: $repo@$revision with git-lfs"
  if [ ! -d "$dest/.git" ]; then
    git clone --no-checkout "https://huggingface.co/$repo" "$dest"
  fi
  git -C "$dest" fetch origin "$revision"
  git -C "$dest" -c advice.detachedHead=false checkout "$revision"
  git -C "$dest" lfs pull
  test "$(git -C "$dest" rev-parse HEAD)" = "$revision"
else
  echo "download: need either the hf CLI (scripts/setup installs it into .venv) or git with git-lfs" >&2
  exit 1
fi

# The vendor builds lose their executable bit on the way through some downloaders.
for binary in "$dest"/main_axcl_aarch64 "$dest"/main_axcl_x86; do
  if [ -f "$binary" ]; then
    chmod +x "$binary"
  fi
done

for needed in qwen2.5_tokenizer/tokenizer.json qwen2.5-1.5b-gptq-int4-ax650/qwen2_post.axmodel; do
  if [ ! -f "$dest/$needed" ]; then
    echo "download: $dest/$needed is missing after the download" >&2
    exit 1
  fi
done
echo "download: model repository ready in $dest"
