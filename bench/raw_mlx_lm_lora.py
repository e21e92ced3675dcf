"""`python -m mlx_lm lora` exactly as the seed runs it, plus one precise log line per report.

MLX-LM prints tokens/s rounded to an integer, too coarse for the slow raw
run; this launcher wraps ``TrainUI.report_train`` to also print the exact
values, then runs MLX-LM's own ``lora`` entry point. It never imports
fishtune, so MLX keeps the BLAS it bundles (no OpenBLAS preload): the seed's
situation on Linux.

    python bench/raw_mlx_lm_lora.py <the same flags as python -m mlx_lm lora>
"""
import sys

import mlx_lm.cli_ui as cli_ui

_orig = cli_ui.TrainUI.report_train


def _report(self, it, train_loss, tokens_sec, trained_tokens):
    print(f"BENCH_STEP {it} {float(tokens_sec)!r} {int(trained_tokens)}", flush=True)
    return _orig(self, it, train_loss, tokens_sec, trained_tokens)


cli_ui.TrainUI.report_train = _report

if __name__ == "__main__":
    from mlx_lm import lora

    sys.argv = ["mlx_lm.lora", *sys.argv[1:]]
    lora.main()
