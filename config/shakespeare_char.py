# Char-level MDM on tinyshakespeare, GPU-sized: nanoGPT's shakespeare_char preset (6 layers x 384,
# block 256, dropout 0.2, 5000 iters; its ARM reaches val ~1.47 nats/char on an A100).
# Data: data/tinyshakespeare.txt, shipped with the repository (public domain, 1.1 MB, 65 characters;
# Karpathy's char-rnn tinyshakespeare); a relative data_path is found from any directory.
#   python train.py config/shakespeare_char.py
#   python sample.py --out_dir=out-shakespeare-char --prompt=ROMEO:
task = "text"
data_path = "data/tinyshakespeare.txt"
out_dir = "out-shakespeare-char"
block_size = 256
batch_size = 64
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
variance_interval = 1000
sample_prompt = "ROMEO:"
