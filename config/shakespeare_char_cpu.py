# Char-level MDM on tinyshakespeare, sized for a 2-core CPU (~5 min a run): nanoGPT's CPU model
# (block 64, 4 layers x 128, no dropout) with a bigger budget than its recipe (batch 12, 2000 iters,
# ARM val 1.88): an MDM barely gets below the unigram entropy (3.31 nats/char) on that budget.
# Data: data/tinyshakespeare.txt, shipped with the repository (public domain, 1.1 MB, 65 characters;
# Karpathy's char-rnn tinyshakespeare); a relative data_path is found from any directory.
#   python train.py config/shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu --prompt=ROMEO:
task = "text"
data_path = "data/tinyshakespeare.txt"
out_dir = "out-shakespeare-char-cpu"
block_size = 64
batch_size = 32
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
warmup_iters = 100
eval_interval = 500
eval_iters = 20  # 20 x 32 windows for the val ELBO, each batch on the same fixed 32-point t-grid
variance_interval = 2500
sample_prompt = "ROMEO:"
