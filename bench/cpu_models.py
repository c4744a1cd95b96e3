"""Training throughput of candidate demo backbones on this CPU: prints images/s per (model, input size)."""
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from pipeline.train.model import MaskNet

torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
models = sys.argv[1].split(",") if len(sys.argv) > 1 else ["resnet10t", "mobilenetv3_small_050", "lcnet_050",
                                                          "regnetx_002", "test_efficientnet", "test_resnet",
                                                          "test_convnext", "test_vit"]
sizes = [tuple(int(v) for v in s.split("x")) for s in __import__("os").environ.get("SIZES", "48x64,64x80").split(",")]
for name in models:
    for w, h in sizes:
        model = MaskNet(name, "multihead")
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        x = torch.randn(64, 3, h, w)
        y = torch.randint(0, 2, (64,))
        for step in range(7):
            if step == 2:
                start = time.time()
            loss = torch.nn.functional.cross_entropy(model(x)[:, 3:5], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rate = 5 * 64 / (time.time() - start)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<24} {w}x{h}  {rate:7.0f} img/s train  {params:.2f}M params", flush=True)
