#!/usr/bin/env bash
# The GPU check, sized for one device call (TOTAL_S: 580 s by default, for a call of 590 s on an
# H100/H200). Stages, each in its own process with its own time limit (cut to what is left of
# TOTAL_S), most important first, so a slow stage costs only itself and those after it:
#   cuda_tests   tests/test_cuda.py: GPU logits vs CPU, CUDA-graph step vs eager (also over cache
#                shapes that alternate, as harness batches do), sampled guided generation, an open
#                image continued through CUDA graphs, greedy steps replayed from graphs the
#                generator captures (graph_steps), the fused Triton kernels (tokens, bf16
#                precision, the timed block choice, every attention candidate in parts against
#                the reference, the output GEMV skipping rows on cuBLAS and Triton); 67 s with
#                8 tests in run 4, 17 tests now
#   triton_7b    7B-shaped random weights in bf16, batch 1, decode speed as a fraction of the
#                memory-bandwidth roofline, two paths timed in turns in one process: the default
#                (torch.compile's one-step reduce-overhead graphs; 71.5-72.4% on an H200, RESULTS.md
#                runs 3 and 4) and the fused Triton kernels (chameleon/kernels.py, five kernels a
#                layer, replayed from graphs of 16 steps; not yet measured: their block sizes are
#                tuned on first use, and the report lists the choices, also recorded in
#                $OUT/kernel_configs.json, which profile_triton_7b then runs untimed)
#   image_7b     one 512x512 image: 1,024 codes with 3-way CFG, then VQGAN decoding (5.65 s in run 3)
#   profile_triton_7b
#                the kernels of 16 greedy decode steps on each path (default, then fused Triton),
#                last: it gets what the stages above leave of TOTAL_S
# Not run by default (STAGES="..." in a second call):
#   decode_7b    the default path alone (as in runs 1-4)
#   graphs_7b    the default path replaying graphs of 16 greedy steps captured by the generator
#                (`--graph-steps 16`): +0.8% and +3.0% in run 4's two runs, so not the default
#   graphs_math_7b
#                graphs_7b with attention as plain matmul/softmax compiled by inductor instead of
#                cuDNN's kernel: 65.3% in run 4 (more kernels), so not adopted
#   attn_math_7b, attn_efficient_7b
#                decode_7b with attention restricted to one SDPA backend (math, mem-efficient)
#   vs_hf_7b     decode_7b against transformers' generate (default and static cache) at batch 1 and 4
#   tuned_7b     decode_7b with inductor's coordinate-descent tuning of its generated kernels (as
#                gpt-fast compiles): measured once, 62.7% vs 72.4% of roofline, so not adopted
#                (GEMM autotuning, TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1: 70.0% in run 4, not adopted)
#   profile_7b   the kernels of 16 greedy decode steps (about a minute); PROFILE_ARGS="--graph-steps 16
#                --profile 49" profiles 3 replays of a captured 16-step graph instead
#   text_loop_7b greedy text with stop strings (lm-eval's generate_until), sampled text and an
#                interleaved image: device loops vs the per-row loop
#   unfused_7b   ablation (measured once: 62.9% vs 71.9% of roofline): batch 1 with q/k/v and
#                w1/w3 as separate matrices
# Run from the repository root on the device machine (the device tool sets OUT):
#   bash benchmarks/perf/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
# DECODE_ARGS: another shape or device, e.g. "--preset tiny --device cpu" to rehearse this script
# (there triton_7b runs the kernels in Triton's interpreter, ~1000x slower than the usual step, and
# runs out its limit: 240 s of nothing measured on 2 cores; leave it out of STAGES).
DECODE="python3 benchmarks/perf/decode.py ${DECODE_ARGS:---preset 7B --device cuda} --dtypes bf16 --new-tokens 128"

STAGES="${STAGES:-cuda_tests triton_7b image_7b profile_triton_7b}"  # a subset reruns only those

# The whole script's deadline: a stage gets at most its own limit and what is left of TOTAL_S, so the
# stages' limits (more than 600 s together) cannot run the device call out before the last stage's
# report; a stage with under 30 s left is skipped, said so in run.txt.
TOTAL_S="${TOTAL_S:-580}"
SECONDS_RE='^(0|[1-9][0-9]*)$'  # what bash arithmetic reads as seconds (not 9m, nor 08: octal)
if [[ ! $TOTAL_S =~ $SECONDS_RE ]]; then
    echo "TOTAL_S=$TOTAL_S: expected whole seconds" | tee "$OUT/run.txt" >&2
    exit 2
fi

stage() {  # stage NAME SECONDS COMMAND...: output in $OUT/NAME.log, outcome in $OUT/run.txt
    local name=$1 limit=$2 start=$SECONDS left=$((TOTAL_S - SECONDS))
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    if [[ ! $limit =~ $SECONDS_RE ]]; then  # (a stage's own fault: the others still run)
        echo "$name: skipped, its limit '$limit' is not whole seconds" | tee -a "$OUT/run.txt"
        return 0
    fi
    if ((left < 30)); then
        echo "$name: skipped, $left s left of TOTAL_S=$TOTAL_S" | tee -a "$OUT/run.txt"
        return 0
    fi
    ((limit > left)) && limit=$left
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/run.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/run.txt"
stage cuda_tests "${CUDA_TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage triton_7b "${TRITON_S:-240}" env CHAMELEON_KERNEL_CONFIGS="$OUT/kernel_configs.json" $DECODE --batches 1 --no-hf --triton --json "$OUT/triton_7b.json"
stage decode_7b "${DECODE_S:-120}" $DECODE --batches 1 --no-hf --json "$OUT/decode_7b.json"
stage graphs_7b "${GRAPHS_S:-120}" $DECODE --batches 1 --no-hf --graph-steps 16 --json "$OUT/graphs_7b.json"
stage graphs_math_7b "${GRAPHS_MATH_S:-130}" $DECODE --batches 1 --no-hf --graph-steps 16 --sdpa-backend math --json "$OUT/graphs_math_7b.json"
stage image_7b "${IMAGE_S:-150}" $DECODE --batches 1 --no-hf --new-tokens 8 --image --json "$OUT/image_7b.json"
stage attn_math_7b "${ATTN_S:-120}" $DECODE --batches 1 --no-hf --sdpa-backend math --json "$OUT/attn_math_7b.json"
stage attn_efficient_7b "${ATTN_S:-120}" $DECODE --batches 1 --no-hf --sdpa-backend efficient --json "$OUT/attn_efficient_7b.json"
stage vs_hf_7b "${VS_HF_S:-150}" $DECODE --batches "${VS_HF_BATCHES:-1,4}" --json "$OUT/vs_hf_7b.json"
stage tuned_7b "${TUNED_S:-140}" env TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 $DECODE --batches 1 --no-hf --json "$OUT/tuned_7b.json"
stage profile_triton_7b "${PROFILE_TRITON_S:-150}" env CHAMELEON_KERNEL_CONFIGS="$OUT/kernel_configs.json" $DECODE --batches 1 --no-hf --new-tokens 32 --repeats 1 --triton --profile 16
stage profile_7b "${PROFILE_S:-60}" $DECODE --batches 1 --no-hf --new-tokens 32 --profile 16 ${PROFILE_ARGS:-}
stage text_loop_7b "${TEXT_LOOP_S:-200}" python3 benchmarks/perf/text_loop.py ${TEXT_LOOP_ARGS:---preset 7B --device cuda} --batches 1,8 --repeats 2
stage unfused_7b "${UNFUSED_S:-75}" $DECODE --batches 1 --no-hf --no-fuse
