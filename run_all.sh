#!/usr/bin/env bash
# The whole OCRM pipeline on one seed (docs/method.md section 3), then the report.
#
#   SFT -> preference pairs + RM_1 -> PPO round 1 (shared start), then three arms that each run
#   rounds 2..ROUNDS with the same PPO budget per round:
#     standard_rlhf  KL to pi_sft,        reward RM_1 throughout
#     ppo_new_kl     KL to pi_{k-1},      reward RM_1 throughout           (reference reset only)
#     ocrm           KL to pi_{k-1},      reward RM_k = weighted refit with pi_{k-1}'s weights
#
# Every stage writes its output under a temporary name and renames it when complete, and a stage
# whose output exists is skipped: an interrupted run is resumed by running this script again.
#
# Environment (all optional):
#   SEED=1  ROUNDS=3  RUN_DIR=runs/toy-seed$SEED  PYTHON=python  DEVICE=auto
#   UPDATES=100       PPO updates per round
#   SFT_ARGS   extra flags for sft.py                 e.g. "--epochs 1"
#   PAIRS_ARGS extra flags for making the pairs       e.g. "--num_pairs 2000 --label bt"
#   RM_ARGS    extra RM-fit flags, used for RM_1 and every corrected RM alike, e.g. "--epochs 1"
#   PPO_ARGS   extra flags for every ppo.py call      e.g. "--batch_size 32"
#   OCRM_ARGS  extra weight flags for ocrm_correct.py e.g. "--lam 0.2 --normalize 1"
#   ARMS="standard_rlhf ppo_new_kl ocrm dpo wpo"   the arms to run (any subset, in any order):
#     the three PPO arms above (rounds 2..ROUNDS after the shared round 1), the paper's offline
#     baselines dpo and wpo (dpo.py on the stored pairs, once), and the optional control
#     fresh_pairs  KL to pi_{k-1}, reward RM_k fitted on FRESH_PAIRS new gold-labelled pairs
#                  sampled from pi_{k-1}, unweighted: what the weights imitate, with new labels
#     fresh_plus_stored  the same, RM_k fitted on the stored pairs plus the new ones (as iterated
#                  online RLHF keeps its old comparisons)
#   DPO_ARGS   extra flags for dpo.py (both dpo and wpo) e.g. "--lr 1e-4"
#   EVAL_PROMPTS held-out prompts of every arm's evaluation (the arms must share them to be
#              compared; unset: ppo.py's and dpo.py's one default, common.EVAL_PROMPTS; the
#              presets set their own)
#   FRESH_PAIRS=10000
#   NPROC=1    processes per stage: above 1, every Python stage runs under
#              `torchrun --standalone --nproc_per_node NPROC` (one per GPU; gloo on a CPU), each
#              rank a shard of every batch (README "More than one GPU")
#   ARM_JOBS=2 the arms after ppo_1 run side by side, ARM_JOBS at a time, each with its output in
#              $RUN_DIR/ARM.log, and every stage with OMP_NUM_THREADS=1 unless it is set (so one
#              seed gives the same numbers as a seed of a JOBS=2 screen); 1 with a PRESET, with
#              NPROC > 1, and for each seed of SEEDS unless it is set
#
# The paper's setting on one GPU (README "The paper's settings on one GPU"): PRESET picks models,
# data and budgets; the variables above still apply and their flags come after the preset's.
#   PRESET=tldr        Pythia-1B-deduped on TL;DR, Skywork-Reward-Llama-3.1-8B as gold
#                      (estimated ~13 h on one 80 GB GPU; docs/gpu.md, never measured)
#   PRESET=tldr_small  Pythia-160M-deduped, fewer pairs and episodes (estimated ~1.2 h, 25 GB)
#   PRESET=alpaca      Qwen2.5-1.5B on AlpacaFarm's instructions, the same gold RM
#                      (estimated ~9 h, but ~87 GB at its gold evaluations: docs/gpu.md)
#   PRESET=smoke       Pythia-14M, 512 pairs, one PPO update per round: the command to run
#                      first on a GPU (prints peak GPU memory and tokens/s of every stage)
#   MODEL, DATASET, GOLD_MODEL   replace the preset's model / dataset / gold RM (name or path)
#   RUN_DIR defaults to runs/$PRESET-seed$SEED
#
# Several seeds: SEEDS="1 2 3 4 5" bash run_all.sh runs the whole pipeline above once per seed,
# in turn (SEED=s, RUN_DIR=$RUN_ROOT/toy-seed$s, or $PRESET-seed$s: SEED is ignored, RUN_DIR an
# error), then averages the seeds' reports with report.py --aggregate into AGG_DIR and prints the
# gates of docs/experiments.md (report.py --gates; also AGG_DIR/gates.md). Resumes like one seed.
#   RUN_ROOT=runs  AGG_DIR=$RUN_ROOT/toy-aggregate (or $PRESET-aggregate)
#   JOBS=1     seeds run side by side, JOBS at a time, each with OMP_NUM_THREADS=1 unless it is
#              set, and its output in $RUN_ROOT/toy-seed$s.log (JOBS=2 on 2 cores is the fastest
#              screening; the numbers depend on the thread count, not on JOBS)
set -euo pipefail
cd "$(dirname "$0")"
# bash reads a script as it runs it: the braces around the rest make it read everything first, so
# editing this file while a pipeline runs cannot change (or break) the running pipeline
{

if [ $# -gt 0 ]; then   # configured by the environment only; --help prints the comment above
  if [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
  fi
  echo "error: run_all.sh takes no arguments (got '$1'); it reads SEED, ROUNDS, ... from the" \
       "environment: see bash run_all.sh --help" >&2
  exit 2
fi

if [ -n "${SEEDS+set}" ]; then
  read -r -a seeds <<< "$SEEDS"
  if [ ${#seeds[@]} -eq 0 ]; then
    echo "error: SEEDS is set but lists no seed; e.g. SEEDS=\"1 2 3\", or unset it for one seed" >&2
    exit 2
  fi
  if [ -n "${RUN_DIR:-}" ]; then
    echo "error: RUN_DIR is one seed's directory; with SEEDS, set RUN_ROOT instead" >&2
    exit 2
  fi
  for s in "${seeds[@]}"; do
    if ! [[ "$s" =~ ^[1-9][0-9]*$ ]]; then
      echo "error: SEEDS must list positive integers, got '$s' in '$SEEDS'" >&2
      exit 2
    fi
  done
  if [ "$(printf '%s\n' "${seeds[@]}" | sort -n | uniq -d)" ]; then
    echo "error: SEEDS lists a seed twice: '$SEEDS'" >&2
    exit 2
  fi
  JOBS=${JOBS:-1}
  if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: JOBS must be a positive integer, got '$JOBS'" >&2
    exit 2
  fi
  RUN_ROOT=${RUN_ROOT:-runs}
  AGG_DIR=${AGG_DIR:-$RUN_ROOT/${PRESET:-toy}-aggregate}
  run_dirs=()
  if [ "$JOBS" -gt 1 ]; then   # seeds side by side, one torch thread each (unless set otherwise)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    mkdir -p "$RUN_ROOT"
  fi
  for s in "${seeds[@]}"; do
    run_dir=$RUN_ROOT/${PRESET:-toy}-seed$s
    run_dirs+=("$run_dir")
    if [ "$JOBS" -eq 1 ]; then
      echo "=== seed $s: $run_dir"
      env -u SEEDS SEED="$s" RUN_DIR="$run_dir" ARM_JOBS="${ARM_JOBS:-1}" \
        bash "$(basename "$0")"                                        # this script, one seed
    else
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
      echo "=== seed $s: $run_dir (output in $run_dir.log)"
      rm -f "$run_dir.failed"
      (env -u SEEDS SEED="$s" RUN_DIR="$run_dir" ARM_JOBS="${ARM_JOBS:-1}" \
        bash "$(basename "$0")" > "$run_dir.log" 2>&1 || touch "$run_dir.failed") &
    fi
  done
  wait
  for run_dir in "${run_dirs[@]}"; do
    if [ -e "$run_dir.failed" ]; then
      rm -f "$run_dir.failed"
      echo "error: $run_dir failed; its last lines, from $run_dir.log:" >&2
      tail -n 5 "$run_dir.log" >&2
      exit 2
    fi
  done
  echo "=== aggregate of ${#seeds[@]} seeds: $AGG_DIR"
  "${PYTHON:-python}" report.py --aggregate "${run_dirs[@]}" --out "$AGG_DIR"
  mkdir -p "$AGG_DIR"
  "${PYTHON:-python}" report.py --gates "${run_dirs[@]}" | tee "$AGG_DIR/gates.md"
  exit 0
fi

SEED=${SEED:-1}
ROUNDS=${ROUNDS:-3}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-auto}
SFT_ARGS=${SFT_ARGS:-}
PAIRS_ARGS=${PAIRS_ARGS:-}
RM_ARGS=${RM_ARGS:-}
PPO_ARGS=${PPO_ARGS:-}
OCRM_ARGS=${OCRM_ARGS:-}
ARMS=${ARMS:-standard_rlhf ppo_new_kl ocrm dpo wpo}
DPO_ARGS=${DPO_ARGS:-}
FRESH_PAIRS=${FRESH_PAIRS:-10000}
eval_prompts=""   # the presets set it; the embedded task uses the scripts' default
read -r -a arms <<< "$ARMS"
for arm in "${arms[@]}"; do
  case "$arm" in
    standard_rlhf|ppo_new_kl|ocrm|fresh_pairs|fresh_plus_stored|dpo|wpo) ;;
    *) echo "error: unknown arm '$arm' in ARMS; use standard_rlhf, ppo_new_kl, ocrm, dpo, wpo," \
         "fresh_pairs, fresh_plus_stored" >&2
       exit 2 ;;
  esac
done
if [ ${#arms[@]} -eq 0 ] || [ "$(printf '%s\n' "${arms[@]}" | sort | uniq -d)" ]; then
  echo "error: ARMS must list each arm at most once, and at least one: '$ARMS'" >&2
  exit 2
fi

# Presets: the paper's hyperparameters (docs/method.md sections 3-6) scaled to one GPU. Each *_PRESET
# list goes before the user's *_ARGS, so a flag in *_ARGS overrides the preset's. sft_text holds
# the one flag whose value has spaces (AlpacaFarm's prompt template), passed as one argument.
SFT_PRESET="" PAIRS_PRESET="" RM_PRESET="" PPO_PRESET="" OCRM_PRESET="" DPO_PRESET="" sft_text=()
case "${PRESET:-}" in
  "") RUN_NAME=toy ;;
  tldr|tldr_small|smoke|alpaca)
    RUN_NAME=$PRESET
    GOLD_MODEL=${GOLD_MODEL:-Skywork/Skywork-Reward-Llama-3.1-8B-v0.2}
    beta=0.05 prompt_len=512 response_len=53 micro=8 lam=0.001
    case "$PRESET" in
      tldr) MODEL=${MODEL:-EleutherAI/pythia-1b-deduped}
        sft_examples=0 num_pairs=30000 eval_prompts=256 UPDATES=${UPDATES:-200} ;;
      tldr_small) MODEL=${MODEL:-EleutherAI/pythia-160m-deduped}
        sft_examples=20000 num_pairs=5000 eval_prompts=128 UPDATES=${UPDATES:-60} ;;
      smoke)   # the authors' DEBUG script: Pythia-14M, ~512 pairs, one PPO update per round
        MODEL=${MODEL:-EleutherAI/pythia-14m}
        sft_examples=2048 num_pairs=512 eval_prompts=32 UPDATES=${UPDATES:-1} ;;
      alpaca)  # AlpacaFarm instructions with Qwen2.5-1.5B: beta 0.1, 106-token replies
        MODEL=${MODEL:-Qwen/Qwen2.5-1.5B}
        DATASET=${DATASET:-hf://datasets/tatsu-lab/alpaca_farm/alpaca_instructions}
        sft_examples=0 num_pairs=20000 eval_prompts=256 UPDATES=${UPDATES:-150}
        beta=0.1 response_len=106 micro=4 ;;
    esac
    if [ "$PRESET" = alpaca ]; then
      # the authors' template; the input is cut at newlines first when the prompt is too long;
      # a reply starts with a space after "REPLY:", as the authors' references do
      data_flags="--train_splits sft,unlabeled,preference --held_out_split val
        --response_field output --truncate_field input"
      sft_text=(--prompt_template 'INSTRUCTION: {instruction} \n\nINPUT: {input}\n\nREPLY:'
        --response_prefix " ")
    else
      DATASET=${DATASET:-vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144}
      data_flags="--prompt_field query --response_field reference_response"
    fi
    # SFT: 1 epoch, lr 3e-6 (N+ details); prompts of <= 512 tokens
    SFT_PRESET="--model $MODEL --dataset $DATASET $data_flags --max_prompt_len $prompt_len
      --response_len $response_len --gold_model $GOLD_MODEL --gold_batch_size 16
      --num_examples $sft_examples --epochs 1 --batch_size 64 --micro_batch_size $micro --lr 3e-6"
    PAIRS_PRESET="--num_pairs $num_pairs --label argmax"
    # the whole RM is fine-tuned as in the authors' code: 1 epoch, lr 3e-6
    RM_PRESET="--train_backbone 1 --epochs 1 --batch_size 64 --micro_batch_size $micro --lr 3e-6
      --forward_batch_size 32"
    PPO_PRESET="--batch_size 64 --minibatches 2 --micro_batch_size $micro --lr 3e-6 --beta $beta
      --temperature 0.7 --eval_every 25 --forward_batch_size 32"
    OCRM_PRESET="--alpha 0.1 --lam $lam --diag_prompts $eval_prompts"
    # DPO / WPO as the authors: beta 0.05, lr 3e-6 (cosine), 1 epoch over the pairs
    DPO_PRESET="--beta 0.05 --lr 3e-6 --batch_size 64 --micro_batch_size $micro
      --eval_every 100 --forward_batch_size 32"
    ;;
  *) echo "error: unknown PRESET '$PRESET'; use tldr, tldr_small, alpaca or smoke (or unset it" \
       "for the embedded task)" >&2; exit 2 ;;
esac
RUN_DIR=${RUN_DIR:-runs/$RUN_NAME-seed$SEED}
UPDATES=${UPDATES:-100}
EVAL_PROMPTS=${EVAL_PROMPTS:-$eval_prompts}
SFT_ARGS="$SFT_PRESET $SFT_ARGS" PAIRS_ARGS="$PAIRS_PRESET $PAIRS_ARGS"
RM_ARGS="$RM_PRESET $RM_ARGS" PPO_ARGS="$PPO_PRESET $PPO_ARGS" OCRM_ARGS="$OCRM_PRESET $OCRM_ARGS"

NPROC=${NPROC:-1}
# arms side by side: two on the embedded task (its tiny models keep one core busy each), one with a
# preset or torchrun (a GPU holds one stage's models at a time)
if [ -z "${PRESET:-}" ] && [ "$NPROC" = 1 ]; then
  ARM_JOBS=${ARM_JOBS:-2}
else
  ARM_JOBS=${ARM_JOBS:-1}
fi
for name in SEED ROUNDS UPDATES FRESH_PAIRS NPROC ARM_JOBS ${EVAL_PROMPTS:+EVAL_PROMPTS}; do
  value=${!name}
  if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$value" -lt 1 ]; then
    echo "error: $name must be a positive integer, got '$value'" >&2
    exit 2
  fi
done
mkdir -p "$RUN_DIR" 2>/dev/null && [ -w "$RUN_DIR" ] || {
  echo "error: cannot write the run directory $RUN_DIR" >&2; exit 2; }
if [ "$ARM_JOBS" -gt 1 ]; then   # one torch thread per process: the numbers of JOBS=2 screens
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# run_stage OUTPUT_DIR COMMAND...: skip when OUTPUT_DIR is finished, otherwise run COMMAND
run_stage() {
  local out=$1; shift
  if [ -d "$out" ]; then
    echo "== skip $out (finished)"
  else
    echo "== $out"
    "$@"
  fi
}

common=(--seed "$SEED" --device "$DEVICE")
eval_flag=()
[ -n "$EVAL_PROMPTS" ] && eval_flag=(--eval_prompts "$EVAL_PROMPTS")
# how a Python stage is started: one process, or NPROC ranks under torchrun
if [ "$NPROC" -eq 1 ]; then
  launch=("$PYTHON")
else
  launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
fi
sft=$RUN_DIR/sft
rm_1=$RUN_DIR/rm_1

# 1. SFT, 2. preference pairs + RM_1, 3. PPO round 1 (the start all three arms share)
# shellcheck disable=SC2086  # *_ARGS are flag lists, split on purpose
run_stage "$sft" "${launch[@]}" sft.py --out "$sft" "${common[@]}" "${sft_text[@]}" $SFT_ARGS
# shellcheck disable=SC2086
run_stage "$rm_1" "${launch[@]}" reward_model.py --sft "$sft" --prefs "$RUN_DIR/prefs" --out "$rm_1" \
  "${common[@]}" $PAIRS_ARGS $RM_ARGS
ppo() {  # ppo OUT INIT KL_REF RM ROUND
  # shellcheck disable=SC2086
  run_stage "$1" "${launch[@]}" ppo.py --out "$1" --init "$2" --kl_ref "$3" --reward_model "$4" \
    --sft "$sft" --seed $((SEED * 100 + $5)) --device "$DEVICE" --updates "$UPDATES" \
    "${eval_flag[@]}" $PPO_ARGS
}
ppo "$RUN_DIR/ppo_1" "$sft" "$sft" "$rm_1" 1

# the fresh-pairs controls label their new pairs as the stored ones were (a --label in PAIRS_ARGS)
fresh_label=()
read -r -a pairs_flags <<< "$PAIRS_ARGS"
for ((i = 0; i < ${#pairs_flags[@]}; i++)); do
  case "${pairs_flags[i]}" in
    --label=*) fresh_label=(--label "${pairs_flags[i]#--label=}") ;;
    --label) fresh_label=(--label "${pairs_flags[i + 1]:-}") ;;
  esac
done

# 4. rounds 2..ROUNDS of each arm, all starting from ppo_1; the offline arms in one stage each
run_arm() {  # run_arm ARM: the arm's stages after ppo_1
  local arm=$1 prev=$RUN_DIR/ppo_1 prev_rm=$rm_1 k rm_k refit
  if [ "$arm" = dpo ] || [ "$arm" = wpo ]; then
    # shellcheck disable=SC2086
    run_stage "$RUN_DIR/$arm" "${launch[@]}" dpo.py --sft "$sft" --prefs "$RUN_DIR/prefs" \
      --reward_model "$rm_1" --out "$RUN_DIR/$arm" --wpo "$([ "$arm" = wpo ] && echo 1 || echo 0)" \
      "${common[@]}" "${eval_flag[@]}" $DPO_PRESET $DPO_ARGS
    return
  fi
  for ((k = 2; k <= ROUNDS; k++)); do
    case "$arm" in
      standard_rlhf) ppo "$RUN_DIR/$arm/round_$k" "$prev" "$sft" "$rm_1" "$k" ;;
      ppo_new_kl) ppo "$RUN_DIR/$arm/round_$k" "$prev" "$prev" "$rm_1" "$k" ;;
      ocrm|fresh_pairs|fresh_plus_stored)
        rm_k=$RUN_DIR/$arm/rm_$k
        case "$arm" in
          ocrm) refit=(--prefs "$RUN_DIR/prefs" $OCRM_ARGS) ;;
          fresh_pairs) refit=(--fresh_pairs "$FRESH_PAIRS" "${fresh_label[@]}") ;;
          fresh_plus_stored) refit=(--prefs "$RUN_DIR/prefs" --fresh_pairs "$FRESH_PAIRS"
                                    "${fresh_label[@]}") ;;
        esac
        # shellcheck disable=SC2086
        run_stage "$rm_k" "${launch[@]}" ocrm_correct.py --policy "$prev" --sft "$sft" \
          --weights_out "$RUN_DIR/$arm/weights_$k" --out "$rm_k" \
          --reward_model_before "$prev_rm" "${common[@]}" $RM_ARGS "${refit[@]}"
        ppo "$RUN_DIR/$arm/round_$k" "$prev" "$prev" "$rm_k" "$k"
        prev_rm=$rm_k ;;
    esac
    prev=$RUN_DIR/$arm/round_$k
  done
}
if [ "$ARM_JOBS" -eq 1 ] || [ ${#arms[@]} -eq 1 ]; then
  for arm in "${arms[@]}"; do run_arm "$arm"; done
else   # the arms are independent once ppo_1 exists: ARM_JOBS side by side, a log file each,
  #      the longest first (refit and PPO each round, then PPO, then one offline stage) so that
  #      the last to finish is a short one
  queue=()
  for kind in "fresh_plus_stored fresh_pairs ocrm" "standard_rlhf ppo_new_kl" "dpo wpo"; do
    for arm in "${arms[@]}"; do [[ " $kind " == *" $arm "* ]] && queue+=("$arm"); done
  done
  for arm in "${queue[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$ARM_JOBS" ]; do wait -n || true; done
    echo "== arm $arm (output in $RUN_DIR/$arm.log)"
    rm -f "$RUN_DIR/$arm.done"
    (run_arm "$arm" > "$RUN_DIR/$arm.log" 2>&1; touch "$RUN_DIR/$arm.done") &
  done
  wait
  failed=()
  for arm in "${arms[@]}"; do rm "$RUN_DIR/$arm.done" 2>/dev/null || failed+=("$arm"); done
  for arm in "${failed[@]}"; do
    echo "error: the arm $arm failed; its last lines, from $RUN_DIR/$arm.log:" >&2
    tail -n 5 "$RUN_DIR/$arm.log" >&2
  done
  [ ${#failed[@]} -eq 0 ] || exit 2
fi

# 5. report.json, report.md, curves.png (always rebuilt: cheap, and reflects what is on disk)
"$PYTHON" report.py --run_dir "$RUN_DIR" --rounds "$ROUNDS" --seed "$SEED" --arms "${arms[@]}"
exit
}
