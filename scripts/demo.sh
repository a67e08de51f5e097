#!/usr/bin/env bash
# The main job, end to end, on the embedded default: the real all-MiniLM-L6-v2 base (from its PyPI package) and
# Rotten Tomatoes critic snippets, into the local registry (./registry, or $ADAPTERHUB_HOME):
#   set up → register the base → train a LoRA sentiment adapter → evaluate on held-out movies → register it →
#   predict → list / verify / export.
# About 10 minutes on 2 CPU cores. Extra arguments are recipe overrides, e.g. `bash scripts/demo.sh train.max_steps=40`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export PATH="$PWD/.venv/bin:$PATH"
export ADAPTERHUB_HOME="${ADAPTERHUB_HOME:-$PWD/registry}"

echo "== 1. base model: all-MiniLM-L6-v2 (fingerprinted, cached)"
adapterhub base show minilm >/dev/null 2>&1 || adapterhub base add minilm asset:minilm
adapterhub base list

echo "== 2. train + evaluate on held-out movies + register (recipes/sentiment-minilm-lora.yaml)"
adapterhub train recipes/sentiment-minilm-lora.yaml "$@"

echo "== 3. predictions with the new adapter"
for review in "A warm, funny and beautifully acted film that earns every one of its tears." \
              "Two hours of my life I will never get back: dull, shapeless and smug." \
              "The plot is thin, but the performances carry it."; do
  adapterhub predict sentiment-minilm-lora "$review"
done

echo "== 4. the registry"
adapterhub list sentiment-minilm-lora
adapterhub verify
rm -rf exports/sentiment-minilm-lora
adapterhub export sentiment-minilm-lora exports/sentiment-minilm-lora
echo "exported a plain PEFT directory: exports/sentiment-minilm-lora (peft.PeftModel.from_pretrained reads it)"
