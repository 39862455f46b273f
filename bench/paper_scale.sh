#!/usr/bin/env bash
# The paper's setting at scale (meant for a GPU): gated diffs of unseen topics, >= 1,000 training diffs
# after the behaviour filters, then the data-scaling curve (training diffs vs held-out DIT score).
#
#   bash bench/paper_scale.sh                  # 600 topics x 3 diffs, curve at 125,250,500,1000,all
#
# Environment knobs (defaults in brackets):
#   N_TOPICS [600]  DIFFS_PER_TOPIC [3]  DIFFS_PER_BATCH [64]  MAX_BATCH_TOKENS [16384]
#   SIZES [125,250,500,1000,all]   EXTRA: more --set overrides, applied last (they win)
#
# A dry run on CPU with a tiny model (what tests/test_paper_scale.py does) sets N_TOPICS, SIZES and
# EXTRA="--set model.source=local --set model.id=<dir> ...". Every stage resumes, so rerunning the
# script after an interruption continues where it stopped.
set -euo pipefail

SCALE=(
  --set "data.n_topics=${N_TOPICS:-600}" --set "data.diffs_per_topic=${DIFFS_PER_TOPIC:-3}"
  --set data.n_trigger=64 --set data.diff_order=round
  --set assemble.split_by=topic --set assemble.test_fraction=0.2 --set assemble.val_fraction=0.1
  --set diffs.steps=100 --set diffs.trigger_rows=2 --set diffs.wrong_prefix_rows=2
  --set "diffs.diffs_per_batch=${DIFFS_PER_BATCH:-64}" --set "diffs.max_batch_tokens=${MAX_BATCH_TOKENS:-16384}"
  --set assemble.min_trigger_hit=0.5 --set assemble.max_wrong_prefix_hit=0.25
  --set assemble.max_no_trigger_hit=0.125 --set eval.n_questions=20
)
# shellcheck disable=SC2206  # EXTRA is a list of words on purpose
EXTRA_ARGS=(${EXTRA:-})

echo "== $(date -u +%FT%TZ) pipeline: ${SCALE[*]} ${EXTRA_ARGS[*]}"
start=$(date +%s)
dit run "${SCALE[@]}" "${EXTRA_ARGS[@]}"
echo "== pipeline took $(( $(date +%s) - start )) s"

start=$(date +%s)
dit scaling --sizes "${SIZES:-125,250,500,1000,all}" "${SCALE[@]}" "${EXTRA_ARGS[@]}"
echo "== scaling curve took $(( $(date +%s) - start )) s"
