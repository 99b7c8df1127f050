# python -m lab.reproduce lab/config/reproduce_gpu.py : the from-scratch study on one GPU, a bigger model
# on a longer sort. Calibrated on one H200 (docs/scaling.md): Standard, 3 seeds, gave held-out
# exact match 0.303 ± 0.196 at 200 steps, 0.780 ± 0.095 at 300 and 0.907 ± 0.111 at 600
# (python -m lab.reproduce lab/config/reproduce_gpu.py --methods=Standard --seeds=3 --jobs=3
#  --max_iters=N).
device = "cuda"
out = "results_gpu"
seeds = 10
max_iters = 300
task_args = ("--task=sort --num_digits=16 --n_layer=6 --n_head=8 --n_embd=256 --batch_size=64 "
             "--eval_problems=4096 --variance_n_x0=64 --variance_grad_n_x0=16")
jobs = 1  # one run at a time on the GPU, with every CPU core (threads = cores // jobs)
threads = 0
