#!/bin/bash
# PiSSA initialisation of a large model over the machines of an MPI host file: rank K of N does
# shard K of N (pissa init --shard auto reads OMPI_COMM_WORLD_RANK/SIZE, or PMI_RANK/SIZE under
# MPICH and Intel MPI). pissa does not communicate over MPI: mpirun only starts the processes, which
# meet in the shared output folder; the last to finish writes OUT. MODEL and OUT must be on a file
# system every host sees. Run it again after a failure: --resume continues from the journals.
#
#   MODEL=/shared/models/Llama-3.1-70B OUT=/shared/pissa/llama70b-r128 NP=8 HOSTFILE=hosts ./mpirun.sh
set -euo pipefail
MODEL=${MODEL:?set MODEL to the model folder}
OUT=${OUT:?set OUT to the output folder}
PISSA=${PISSA:-pissa}
NP=${NP:-4}
OPTIONS=${OPTIONS:---rank 128 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
hosts=()
if [[ -n ${HOSTFILE:-} ]]; then hosts=(--hostfile "$HOSTFILE" --map-by node); fi
# shellcheck disable=SC2086  # OPTIONS is a list of arguments
exec mpirun -np "$NP" "${hosts[@]}" --oversubscribe "$PISSA" init "$MODEL" --out "$OUT" $OPTIONS --shard auto --resume
