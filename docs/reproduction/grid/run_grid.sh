#!/usr/bin/env bash
# The issue-25 grid (nice 19, one thread a process); cached: rerunning continues where it stopped.
# --share: start it once per core (e.g. twice, each with nohup ... &); the processes split the runs.
# --stop-by HH:MM (or +2h): start only runs that can end by then (e.g. before the machine goes away).
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec nice -n 19 python -m mdm_kernels.train.analyze reproduce --out docs/reproduction/grid --doc docs/reproduction.md \
  --models mfn,ef_lstm,lmf,mag --seeds 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19 --model-seeds mag=0,1,2,3,4,5,6,7,8,9 \
  --text-features utterance --device cpu --lambdas 0.1,1 --unrolls 1 --critic-hiddens 128 --epochs 40 --patience 6 \
  --glove-models ef_lstm,mfn --glove-penalties none,wasserstein \
  --order 'mfn:none+wasserstein;mfn:mine+nwj;ef_lstm;lmf;glove/mfn:none+wasserstein,glove/ef_lstm:none+wasserstein;mag:none+wasserstein;mag:mine+nwj' \
  --previous docs/reproduction/reproduce_10seed.json --drop-checkpoints --share "$@"
