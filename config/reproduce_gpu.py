# python reproduce.py config/reproduce_gpu.py : Table 1 on one GPU, a bigger model on a longer sort.
# UNCALIBRATED (made on a CPU-only machine): first check that Standard is not saturated with
#   python reproduce.py config/reproduce_gpu.py --methods=Standard --seeds=3
# and move --max_iters until its mean held-out exact match lands in 30-80 %.
device = "cuda"
out = "results_gpu"
seeds = 10
max_iters = 600
task_args = ("--task=sort --num_digits=16 --n_layer=6 --n_head=8 --n_embd=256 --batch_size=64 "
             "--eval_problems=4096 --variance_n_x0=64 --variance_grad_n_x0=16")
