#!/usr/bin/env bash
# The rank study at real scale (issue 12), in the background, resumable: run it again after an interruption (a
# killed process, a new session) and each sweep continues where it stopped — finished points are skipped and a
# point interrupted mid-run continues from its checkpoint. Logs: runs/realscale-<task>.log; reports:
# runs/sweep-*/results.{md,csv,json} and plots. The sentiment study (finished 2026-12-01; copied to
# benchmarks/results/sweep-sentiment-realscale/) used one torch thread; the E2E study uses both cores.
#
#   bash scripts/realscale.sh              # start or resume both studies, one after the other, in the background
#   bash scripts/realscale.sh --foreground # the same in this terminal
#   adapterhub sweep-report runs/sweep-sentiment-minilm-sweep-74f299fb   # the report of the points finished so far
#
# 1. Rotten Tomatoes / all-MiniLM-L6-v2: 11 ranks × 3 seeds × training fractions 0.1 / 0.3 / 1.0 (250 steps of 32,
#    about one epoch of the whole training split), sequential, 99 points.
# 2. E2E / SmolLM2-135M-Instruct, LoRA on q and v, alpha fixed at 32: 11 ranks × 1 epoch × 2 seeds, with the
#    E2E metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr), greedy and beam-3 decoding, 22 points; then φ (the paper's
#    section 7) between r = 8 and r = 64 and between the two seeds of each.
# 3. The rank advisor on both, beside the trained sweeps: its SVD truncations of r = 1024 are the truncated curve.
#
#   bash scripts/realscale.sh --save       # copy the E2E sweep's progress into the repository (a new machine resumes it)
set -euo pipefail
cd "$(dirname "$0")/.."
# The body is one function, read whole before it runs: bash reads a plain script as it goes, so editing this file
# under a running study (hours long) would otherwise make it resume at a shifted offset of the new text.
main() {
if [[ "${1:-}" != "--foreground" && "${1:-}" != "--save" ]]; then
  mkdir -p runs
  nohup setsid bash "$0" --foreground >runs/realscale.log 2>&1 &
  echo "started in the background (pid $!): tail -f runs/realscale.log runs/realscale-*.log"
  exit 0
fi
bash scripts/setup-env.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"
export ADAPTERHUB_HOME="${ADAPTERHUB_HOME:-$PWD/registry}"
adapterhub base show minilm >/dev/null 2>&1 || adapterhub base add minilm asset:minilm
adapterhub base show smollm2 >/dev/null 2>&1 || adapterhub base add smollm2 asset:smollm2

# The sentiment study started before sweep names ignored new recipe fields at their defaults: its name is pinned.
sentiment=(recipes/sweep-sentiment-minilm-lora.yaml --seeds 0,1,2 --data-fractions 0.1,0.3,1.0 --mode sequential
           --sweep-id sweep-sentiment-minilm-sweep-74f299fb)
e2e_id=sweep-e2e-smollm2-sweep-4bb6c408
e2e=(recipes/sweep-e2e-smollm2-lora.yaml --alpha-policy fixed --seeds 0,1 --mode sequential --num-beams 3
     --set train.epochs=1 --sweep-id "$e2e_id")
# runs/ and the registry stay on the machine that ran them; a study spanning sessions keeps its progress in the
# repository: `--save` copies the E2E sweep's state (every finished point's metrics and per-example records) and
# advice there, and a start on a machine without runs/<sweep> begins from that copy (finished points are skipped).
# The adapters φ compares (section 7: r = 8 against r = 64, and two seeds of each) are kept too, as PEFT exports
# with their cards (~17 MB for the four), since the two seeds may train in different sessions.
kept=benchmarks/results/realscale-e2e-progress
compared=(e2e-smollm2-sweep-r8-s0 e2e-smollm2-sweep-r8-s1 e2e-smollm2-sweep-r64-s0 e2e-smollm2-sweep-r64-s1)
if [[ "${1:-}" == "--save" ]]; then
  mkdir -p "$kept"
  for f in state.json advice.json; do if [[ -f runs/$e2e_id/$f ]]; then cp "runs/$e2e_id/$f" "$kept/$f"; fi; done
  for name in "${compared[@]}"; do
    if [[ ! -d $kept/adapters/$name ]] && adapterhub show "$name" >/dev/null 2>&1; then
      adapterhub export "$name" "$kept/adapters/$name" --with-card >/dev/null
    fi
  done
  echo "saved the E2E sweep's state, advice and compared adapters to $kept/ (commit them)"
  exit 0
fi

# The advisor runs on the same sweep (same arguments): it trains only the highest rank (per seed and fraction),
# predicts the rest from its SVD truncations, and every later run of the full sweep sets the prediction beside the
# trained ranks. The sentiment sweep ran before its advisor (started first), so it is reported once more after it.
# Threads: the sentiment study shares the machine on one; the E2E study is also issue 11's timing of a whole sweep on
# this machine, so it takes both cores ($REALSCALE_E2E_THREADS to change).
run() { local threads=$1 log=$2; shift 2; echo "== $(date -u +%FT%TZ) $*"
        adapterhub --threads "$threads" sweep "$@" >>"$log" 2>&1; }
# A finished study lives on in the repository (runs/ does not travel to a new machine): its copy there is not redone.
if [[ -f benchmarks/results/sweep-sentiment-realscale/results.json && ! -d runs/${sentiment[-1]} ]]; then
  echo "== sentiment study finished earlier: benchmarks/results/sweep-sentiment-realscale/ (not run again)"
else
  run 1 runs/realscale-sentiment.log "${sentiment[@]}"
  run 1 runs/realscale-sentiment.log "${sentiment[@]}" --advise
  run 1 runs/realscale-sentiment.log "${sentiment[@]}"
fi
if [[ ! -f runs/$e2e_id/state.json && -f $kept/state.json ]]; then
  mkdir -p "runs/$e2e_id"
  for f in state.json advice.json; do [[ -f $kept/$f ]] && cp "$kept/$f" "runs/$e2e_id/$f"; done
  echo "== E2E sweep resumes from $kept/"
fi
for name in "${compared[@]}"; do
  if [[ -d $kept/adapters/$name ]] && ! adapterhub show "$name" >/dev/null 2>&1; then
    adapterhub import "$kept/adapters/$name" --name "$name" --base smollm2 --task e2e --no-check >/dev/null
    echo "== $name restored from $kept/adapters/"
  fi
done
# The advisor first: it trains r = 1024 (each seed) and evaluates its SVD truncations to every lower rank — the
# truncated curve — as soon as each is trained; then the rest of the sweep (seed 0's eleven ranks are also issue 11's
# "E2E sweep in ≤ 2 hours" measurement: each point's wall time is in the sweep's results), whose report sets the
# prediction beside the trained ranks. Each point's beam search and E2E metrics are computed as it finishes.
run "${REALSCALE_E2E_THREADS:-2}" runs/realscale-e2e.log "${e2e[@]}" --advise
run "${REALSCALE_E2E_THREADS:-2}" runs/realscale-e2e.log "${e2e[@]}"
# The paper's section 7: φ between r = 8 and r = 64 (each seed against each) and between the two seeds of each rank.
echo "== $(date -u +%FT%TZ) compare"
adapterhub compare "${compared[@]}" --out runs/realscale-e2e-compare >>runs/realscale-e2e.log 2>&1
# The whole report beside the paper's Table 18: runs/<sweep>/interim/ (results.md, reference.{md,json,png}, plots).
echo "== $(date -u +%FT%TZ) report beside Table 18"
adapterhub sweep-report "runs/$e2e_id" --reference recipes/references/lora-paper-table18-e2e.csv \
  >>runs/realscale-e2e.log 2>&1
echo "== $(date -u +%FT%TZ) done"
}
main "$@"
exit $?
