#!/usr/bin/env bash
# Peak memory and time of `pissa init` on layers shaped like Llama-2/3-70B (hidden 8192,
# intermediate 28672, 64 heads, 8 key/value heads, bf16) and, with --405b, Llama-3.1-405B (hidden
# 16384, intermediate 53248, 128 heads, 8 key/value heads): all seven linear projections of every
# layer are targets. Peak RSS (GNU time's maximum resident set size) is measured for 2 and 4
# generated layers at each rank, to show that it does not grow with the model; the per-module times
# give the projected wall time of a whole model on N machines (a projection: every layer costs what
# the generated ones cost, shards split the layers evenly, each on a machine like this one).
#
# Usage: bench/init_memory.sh [--405b] [--ranks "16 128"] [--layers "2 4"] [--keep DIR]
#   PISSA=path/to/pissa (default build/release/tools/pissa/pissa); the models (about 1.7 GB per
#   70B layer, 6.9 GB per 405B layer) and outputs go to a scratch folder removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pissa=${PISSA:-$root/build/release/tools/pissa/pissa}
ranks="16 128"; layer_counts="2 4"; shape=70b; keep=""
while (($#)); do
  case "$1" in
    --405b) shape=405b; layer_counts="1" ;;
    --ranks) ranks=$2; shift ;;
    --layers) layer_counts=$2; shift ;;
    --keep) keep=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $shape == 70b ]]; then dims="--hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8"; model_layers=80
else dims="--hidden 16384 --intermediate 53248 --heads 128 --kv-heads 8"; model_layers=126; fi
scratch=${keep:-$(mktemp -d "${TMPDIR:-/tmp}/pissa-init-memory.XXXXXX")}
[[ -z $keep ]] && trap 'rm -rf "$scratch"' EXIT
targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
echo "pissa init memory and time: $shape-shaped layers ($dims, bf16, vocab 256), targets $targets"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $($pissa --version)"
printf '%-7s %-5s %12s %10s %14s %s\n' layers rank "peak RSS" "wall s" "s per layer" "largest tensor"
for layers in $layer_counts; do
  model=$scratch/model-$layers
  [[ -d $model ]] || "$pissa" generate --out "$model" --layers "$layers" $dims --vocab 256 > /dev/null 2>&1
  largest=$("$pissa" inspect "$model" --json | python3 -c 'import json,sys; print(max(t["bytes"] for t in json.load(sys.stdin)["tensors"]))')
  for rank in $ranks; do
    out=$scratch/out-$layers-$rank
    rm -rf "$out"
    /usr/bin/time -f '%M %e' -o "$scratch/time" "$pissa" init "$model" --out "$out" --rank "$rank" \
      --targets $targets --json > "$scratch/report.json"
    read -r rss_kb wall < "$scratch/time"
    per_layer=$(python3 -c "import json; m=json.load(open('$scratch/report.json'))['modules']; print('%.1f' % (sum(x['seconds'] for x in m) / $layers))")
    printf '%-7s %-5s %9.2f GiB %10s %14s %.2f GiB\n' "$layers" "$rank" "$(echo "$rss_kb / 1048576" | bc -l)" "$wall" "$per_layer" "$(echo "$largest / 1073741824" | bc -l)"
    python3 - "$scratch/report.json" "$layers" "$model_layers" "$wall" <<'EOF'
import json, sys
report, layers, model_layers, wall = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
kinds = {}
for m in report["modules"]:
    kinds.setdefault(m["name"].split(".")[-1], []).append(m["seconds"])
print("        per module (s): " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in kinds.items()))
# Projection: every layer costs what the generated ones cost (wall time, reading and writing
# included), the shards split the layers evenly, each shard on a machine like this one.
print(f"        projected {model_layers}-layer model, wall time on N such machines: " +
      ", ".join(f"N={n}: {model_layers * wall / layers / n / 60:.1f} min" for n in (1, 4, 16, 64)))
EOF
    rm -rf "$out"
  done
done
