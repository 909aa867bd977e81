"""The FastVLM paper's published numbers (arXiv 2412.13303v2, CVPR 2025), for side-by-side reports.

The paper measured encoders with Core ML on an M1 Max Neural Engine and LLM prefill with
MLX fp16 on its GPU; absolute times on other hardware differ, so reports compare
*ratios*. Accuracy numbers are published results, never measured here.
"""

from __future__ import annotations

from statistics import mean

# Parameter counts in millions as published (CLIP image heads included, as the paper counts them).
PUBLISHED_PARAMS_M = {
    "fastvithd": 125.1,
    "fastvit_mci2": 35.7,
    "vit_l14": 304.0,
    "siglip_so400m": 430.0,
    "convnext_l": 200.0,
    "convnext_xxl": 846.0,
}

# Encoder latency in ms at an input side (Tab. 10; FastViTHD at 512 from Tab. 4; §2.5 list).
ENCODER_LATENCY_MS = {
    ("fastvithd", 256): 6.8,
    ("fastvithd", 512): 33.5,
    ("fastvithd", 768): 54.8,
    ("fastvithd", 1024): 116.3,
    ("fastvit_mci2", 256): 3.0,
    ("fastvit_mci2", 768): 34.5,
    ("vit_l14", 224): 47.2,
    ("vit_l14", 336): 127.4,
    ("siglip_so400m", 384): 272.1,
    ("convnext_l", 320): 34.4,
    ("convnext_l", 512): 71.9,
    ("convnext_l", 768): 164.3,
    ("convnext_l", 1024): 696.1,
    ("convnext_l", 1536): 1569.7,
    ("convnext_xxl", 256): 89.9,
    ("convnext_xxl", 512): 397.1,
    ("convnext_xxl", 1024): 2290.4,
}

# LLM prefill in ms for a number of visual tokens (Tab. 10).
PREFILL_MS = {
    ("qwen2-0.5b", 256): 50.5,
    ("qwen2-0.5b", 1280): 336.4,
    ("qwen2-1.5b", 144): 97.1,
    ("qwen2-1.5b", 256): 116.1,
    ("qwen2-1.5b", 1280): 681.7,
    ("qwen2-7b", 144): 391.2,
    ("qwen2-7b", 256): 524.5,
    ("qwen2-7b", 1280): 3139.5,
    ("vicuna-7b", 16): 143.4,
    ("vicuna-7b", 144): 332.1,
    ("vicuna-7b", 256): 461.1,
    ("vicuna-7b", 576): 1170.0,
}

# Avg-5 = mean(GQA, TextVQA, POPE, DocVQA, SeedBench-I) as published, per (encoder, side, LLM).
_AVG5_SCORES = {
    # LLaVA-1.5 setup, Vicuna-7B (Tab. 1 and Tab. 4)
    ("fastvithd", 256, "vicuna-7b"): ("Tab. 4", (60.6, 53.1, 82.3, 17.4, 63.7)),
    ("fastvithd", 512, "vicuna-7b"): ("Tab. 4", (63.0, 59.3, 86.4, 25.7, 67.1)),
    ("fastvithd", 768, "vicuna-7b"): ("Tab. 4", (62.4, 62.9, 87.7, 32.9, 68.2)),
    ("fastvithd", 1024, "vicuna-7b"): ("Tab. 4", (63.1, 64.4, 88.1, 35.6, 68.5)),
    ("convnext_l", 320, "vicuna-7b"): ("Tab. 4", (61.9, 55.5, 85.3, 21.3, 64.6)),
    ("convnext_l", 512, "vicuna-7b"): ("Tab. 4", (61.8, 61.0, 86.3, 30.8, 66.8)),
    ("convnext_xxl", 256, "vicuna-7b"): ("Tab. 4", (62.7, 56.3, 85.3, 21.6, 65.6)),
    ("convnext_xxl", 512, "vicuna-7b"): ("Tab. 4", (62.3, 65.1, 87.7, 36.2, 68.4)),
    ("vit_l14", 336, "vicuna-7b"): ("Tab. 1", (62.0, 58.2, 85.9, 28.1, 66.1)),
    ("fastvit_mci2", 256, "vicuna-7b"): ("Tab. 1", (60.2, 51.6, 82.9, 15.8, 61.5)),
    ("fastvit_mci2", 768, "vicuna-7b"): ("Tab. 1", (62.7, 62.3, 86.5, 34.4, 67.1)),
    # Scaled recipe, 15M + 1.1M (Tab. 6 rows R3, R7, R11, R22, R30)
    ("fastvithd", 1024, "qwen2-0.5b"): ("Tab. 6 R3", (61.6, 57.4, 87.4, 61.0, 65.6)),
    ("fastvithd", 768, "qwen2-1.5b"): ("Tab. 6 R7", (63.9, 64.4, 87.2, 61.3, 71.7)),
    ("fastvithd", 1024, "qwen2-1.5b"): ("Tab. 6 R11", (64.2, 66.0, 88.0, 67.7, 71.4)),
    ("fastvithd", 768, "qwen2-7b"): ("Tab. 6 R22", (65.6, 69.5, 87.2, 66.9, 75.3)),
    ("fastvithd", 1024, "qwen2-7b"): ("Tab. 6 R30", (65.8, 72.1, 87.8, 73.3, 75.1)),
}
PUBLISHED_AVG5 = {key: (source, round(mean(scores), 2)) for key, (source, scores) in _AVG5_SCORES.items()}

# TTFT in ms as published (Tab. 6 / Tab. 10), per (encoder, side, LLM).
PUBLISHED_TTFT_MS = {
    ("fastvithd", 256, "vicuna-7b"): 150,
    ("fastvithd", 768, "vicuna-7b"): 387,
    ("fastvithd", 1024, "vicuna-7b"): 577,
    ("fastvithd", 1024, "qwen2-0.5b"): 166,
    ("fastvithd", 768, "qwen2-1.5b"): 152,
    ("fastvithd", 1024, "qwen2-1.5b"): 233,
    ("fastvithd", 768, "qwen2-7b"): 446,
    ("fastvithd", 1024, "qwen2-7b"): 641,
    ("vit_l14", 336, "vicuna-7b"): 1297,
    ("convnext_l", 768, "vicuna-7b"): 496,
    ("convnext_l", 1024, "vicuna-7b"): 1157,
}

# Claims checked against our measurements: (label, kind, numerator, denominator, paper ratio, source).
# kind "latency": encoder latency ratio; "ttft": TTFT ratio with the same LLM; "tokens": token ratio.
# numerator/denominator: (encoder, side) — the slower / larger one first.
PAPER_RATIOS = [
    ("ConvNeXt-L@1024 / FastViTHD@1024 encoder latency", "latency", ("convnext_l", 1024), ("fastvithd", 1024),
     696.1 / 116.3, "Tab. 10"),
    ("ConvNeXt-L@768 / FastViTHD@768 encoder latency", "latency", ("convnext_l", 768), ("fastvithd", 768),
     164.3 / 54.8, "Tab. 10"),
    ("ConvNeXt-XXL@1024 / FastViTHD@1024 encoder latency", "latency", ("convnext_xxl", 1024), ("fastvithd", 1024),
     2290.4 / 116.3, "Tab. 10"),
    ("ViT-L/14@336 / FastViTHD@1024 encoder latency", "latency", ("vit_l14", 336), ("fastvithd", 1024),
     127.4 / 116.3, "Tab. 10"),
    ("ViT-L/14@336 / FastViTHD@1024 TTFT", "ttft", ("vit_l14", 336), ("fastvithd", 1024),
     1297 / 577, "Tab. 6 R31 vs R27 (Vicuna-7B)"),
    ("ConvNeXt-L@1024 / FastViTHD@1024 TTFT", "ttft", ("convnext_l", 1024), ("fastvithd", 1024),
     1157 / 577, "Tab. 6 R26 vs R27 (Vicuna-7B)"),
    ("SigLIP-SO400M@384 / FastViTHD@1024 encoder latency", "latency", ("siglip_so400m", 384), ("fastvithd", 1024),
     272.1 / 116.3, "Tab. 10"),
    ("ViT-L/14@336 / FastViTHD@1024 visual tokens", "tokens", ("vit_l14", 336), ("fastvithd", 1024),
     576 / 256, "Tab. 6"),
]  # fmt: skip
