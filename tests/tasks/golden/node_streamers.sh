#!/bin/bash
# stemstream node streamers: one streamer per node. Rendered by tasks/nersc/batch.py; do not edit by hand.
# Slurm keeps a copy of this script, so it never holds secrets: keys are read from files on the nodes.
#SBATCH -q realtime
#SBATCH -A m1234
#SBATCH -C cpu
#SBATCH -N 4
#SBATCH -t 01:30:00
#SBATCH -J stemstream-nodes
#SBATCH --exclusive
# After a node failure Slurm would put the job back in the queue and start the streamers again later, with
# no session waiting for them: never requeue; the session sees NODE_FAIL and releases everything.
#SBATCH --no-requeue
#SBATCH -o /pscratch/sd/u/user/stemstream_logs/%x_%j.out
#SBATCH --reservation=ncem_rt
#SBATCH --mail-type=END
set -euo pipefail
export HDF5_USE_FILE_LOCKING=FALSE
export NOTE='it'"'"'s quoted'
export STEMSTREAM_LOG_LEVEL=INFO
# One task per node; --kill-on-bad-exit ends the whole job when one streamer fails, so the session sees it.
srun -N 4 --ntasks-per-node=1 --kill-on-bad-exit=1 -c 256 --cpu-bind=cores stemstream node --aggregator tcp://128.3.0.10:6000 --label 'session 7'
