"""Why PyTorch + PEFT trains the bench model faster than MLX here: the output layer + loss, alone.

Times the tied lm_head (151936 x 512) and the cross-entropy over its logits
for one training batch (2 x 128 tokens), forward and backward to the hidden
state, in MLX (OpenBLAS preloaded) and in PyTorch, plus a bare softmax over
the logits. Prints the timings; numbers quoted in bench/README.md.

    python bench/profile_lm_head.py
"""
import sys, time
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__))))
import fishtune  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
B, L, V, H = 2, 128, 151936, 512
W = mx.random.normal((V, H)) * 0.02
x = mx.random.normal((B, L, H))
y = mx.random.randint(0, V, (B, L))
def head_loss(x):
    logits = x @ W.T
    return nn.losses.cross_entropy(logits.astype(mx.float32), y).mean()
g = mx.grad(head_loss)
def bench(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return min(ts)
t_fwd_mm = bench(lambda: mx.eval(x @ W.T))
t_fwd = bench(lambda: mx.eval(head_loss(x)))
t_grad = bench(lambda: mx.eval(g(x)))
fl = 2*B*L*V*H
print(f"MLX lm_head matmul fwd {t_fwd_mm:.3f}s ({fl/t_fwd_mm/1e9:.0f} GFLOP/s); fwd+CE {t_fwd:.3f}s; fwd+CE+bwd(dx) {t_grad:.3f}s (matmul-only ideal {2*fl/ (fl/t_fwd_mm):.3f}s)")
import torch
torch.set_num_threads(2)
Wt = torch.randn(V, H) * 0.02
xt = torch.randn(B, L, H, requires_grad=True)
yt = torch.randint(0, V, (B, L))
def tstep():
    logits = xt @ Wt.T
    loss = torch.nn.functional.cross_entropy(logits.view(-1, V), yt.view(-1))
    loss.backward()
tt = bench(tstep)
tm = bench(lambda: xt.detach() @ Wt.T)
print(f"torch lm_head matmul fwd {tm:.3f}s; fwd+CE+bwd(dx) {tt:.3f}s")
# elementwise / softmax throughput
z = mx.random.normal((B*L, V))
print(f"MLX softmax over {B*L}x{V}: {bench(lambda: mx.eval(mx.softmax(z, axis=-1))):.3f}s")
zt = torch.randn(B*L, V)
print(f"torch softmax over {B*L}x{V}: {bench(lambda: torch.softmax(zt, dim=-1)):.3f}s")
