"""Named presets: precision (w8a8, w4a8, w4a6, w4a4) and effort (fast, gpu, paper).

A preset is a partial recipe (a nested dict of field values). Defaults that depend on the
method (G, split shortcut, weight init, AdaRound, DMQ's stage lengths) are declared by the
method itself (recipe/methods.py). ``resolve`` merges the
layers in a fixed order and builds the dataclasses once, so that one validation pass sees
the final values. Derive variants with ``dataclasses.replace``, never by copying a file.
"""

from __future__ import annotations

from quest_export.recipe.config import QuantRecipe

W8A8 = QuantRecipe(w_bits=8, a_bits=8)
W4A8 = QuantRecipe(w_bits=4, a_bits=8)
W4A6 = QuantRecipe(w_bits=4, a_bits=6)
W4A4 = QuantRecipe(w_bits=4, a_bits=4, w_symmetric=False, a_symmetric=False)

BITS: dict[str, dict] = {
    "w8a8": {"quant": {"w_bits": 8, "a_bits": 8}},
    "w4a8": {"quant": {"w_bits": 4, "a_bits": 8}},
    # DMQ's headline setting (quest.md 7.6): 6-bit per-tensor activations, min/max init like A8
    "w4a6": {"quant": {"w_bits": 4, "a_bits": 6}},
    # 4-bit activations need a searched clipping range: min/max init leaves W4A4 unusable for every method
    # (fmnist-cond, qdiffusion: FD 393 with min/max vs 25.5 with MSE), and zero points: with 16 levels a one-sided
    # activation (after SiLU) loses half its grid to a symmetric range (fmnist-cond QuEST, three seeds: FD 10.6
    # asymmetric vs 21.2 symmetric; docs/BENCHMARKS.md 2.5). TensorRT targets force symmetric grids back (their
    # target layer comes later in the merge); ONNX Runtime, the runtime with native 4-bit activations, keeps these.
    "w4a4": {
        "quant": {"w_bits": 4, "a_bits": 4, "w_symmetric": False, "a_symmetric": False},
        "ptq": {"act_init": "mse"},
    },
}

# quest.md section 5.4. `fast` runs the bundled models on 2 CPU cores in minutes; `gpu` is the starting point
# of quest.md's fast column with a shorter AdaRound, the setting of the published benchmarks (a few minutes
# on one GPU); `paper` is the reference implementation's settings and is never silently changed (a deviation
# is a new preset name).
EFFORT: dict[str, dict] = {
    "fast": {
        "calib": {"samples_per_group": 64},
        "ptq": {"adaround_iters": 200, "adaround_batch": 16, "act_batch": 64, "act_recon_iters": 200},
        "finetune": {
            "preset": "fast",
            "b_epochs": 10,
            "b_samples": 8,
            "b_batch": 2,
            "c_epochs": 2,
            "c_samples": 16,
            "c_batch": 4,
        },  # fmt: skip
    },
    "paper": {
        "calib": {"samples_per_group": 256},
        "ptq": {"adaround_iters": 20000, "adaround_batch": 16, "act_batch": 64, "act_recon_iters": 5000},
        "finetune": {
            "preset": "paper",
            "b_epochs": 300,
            "b_samples": 8,
            "b_batch": 2,
            "c_epochs": 20,
            "c_samples": 64,
            "c_batch": 4,
            "b_lr_weight": 1e-5,
            "b_lr_scale": 1e-5,
            "c_lr_weight": 1e-5,
            "c_lr_scale": 1e-4,
        },  # fmt: skip
    },
}

# `gpu` = `fast` with quest.md's fast-column finetune lengths (Stage B 50 x 8, Stage C 5 x 32)
EFFORT["gpu"] = {**EFFORT["fast"], "finetune": {**EFFORT["fast"]["finetune"], "preset": "gpu", "b_epochs": 50,
                                                 "c_epochs": 5, "c_samples": 32}}  # fmt: skip

# Stage B epochs of the paper preset per model family (quest.md 5.2: ImageNet 300, LSUN 200).
PAPER_B_EPOCHS = {"class-cond": 300, "uncond": 200, "text": 200}
