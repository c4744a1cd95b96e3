"""preview stage: what the model is fed. N training images, each as the config crops and sizes it, then K draws of
its training augmentation (the engine the train stage would use here, or augment.engine), then its TTA views
(infer.tta), in one PNG, <output.dir>/check/preview.png, also added as a section of check/report.html.

    ./run.sh preview -c configs/demo.yaml [--images 8] [--draws 4] [augment.engine=kornia]
"""
from __future__ import annotations

import numpy as np

from pipeline import labels
from pipeline.artifacts import output_dir
from pipeline.stages import stage_main


def _arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=8, help="training images, one per row (default 8)")
    parser.add_argument("--draws", type=int, default=4, help="augmentation draws per image (default 4)")


def augmented(cfg: dict, engine: str, crop: np.ndarray, seed: int) -> np.ndarray:
    """One draw of the training augmentation of a uint8 HWC crop, as the train stage's engine makes it (seeded)."""
    import torch

    if engine == "albumentations":
        from pipeline.train.augment import train_transform

        transform = train_transform(cfg)
        transform.set_random_seed(seed)
        return transform(image=crop)["image"]
    from pipeline.train.augment import gpu_augmenter

    augmenter = gpu_augmenter(cfg)
    if augmenter is None:
        return crop
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
    return (augmenter(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def views(cfg: dict, crop: np.ndarray) -> list[np.ndarray]:
    """The crop under each TTA view of infer.tta (geometric: shown on the pixels, before normalisation)."""
    import torch

    from pipeline.train.views import tta_views

    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float()
    return [v[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy() for v in tta_views(x, cfg["infer"]["tta"])]


def run(cfg: dict, force: bool = False, images: int = 8, draws: int = 4) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.train.batches import sample_seed
    from pipeline.data.eda import add_section
    from pipeline.data.images import cached_images
    from pipeline.data.layout import load_train
    from pipeline.data.pixels import image_set
    from pipeline.errors import ConfigError
    from pipeline.train.engines import engine as engine_for
    from pipeline.train.model import resolve_device

    if images < 1 or draws < 0:
        raise ConfigError(f"--images {images} / --draws {draws}: at least one image, and no negative draws")
    table, _ = load_train(cfg)
    pixels = cached_images(cfg, image_set(cfg, "train", table["file"]), desc="decode train")
    engine = engine_for(cfg["augment"]["engine"], resolve_device(cfg["train"]["device"]).type)
    rng = np.random.default_rng(cfg["train"]["seed"])
    classes = rng.permutation(np.unique(table["label"]))  # a spread of classes before a second of any
    rows = [int(rng.choice(np.flatnonzero(table["label"].to_numpy() == c))) for c in classes[:images]]
    rows += [int(r) for r in rng.choice(len(table), size=max(images - len(rows), 0), replace=False)]
    tta = list(cfg["infer"]["tta"])
    columns = 1 + draws + len(tta)
    figure = plt.figure(figsize=(columns * 1.5, len(rows) * 2.0), dpi=100)
    for i, row in enumerate(rows):
        crop = np.asarray(pixels[row])
        cells = [("crop", crop)] + [(f"{engine} {k + 1}", augmented(cfg, engine, crop, sample_seed(row, k)))
                                    for k in range(draws)] + [(f"TTA {name}", view) for name, view in zip(tta, views(cfg, crop))]
        for j, (title, picture) in enumerate(cells):
            axis = figure.add_subplot(len(rows), columns, i * columns + j + 1)
            axis.imshow(picture)
            axis.set_xticks([])
            axis.set_yticks([])
            if i == 0:
                axis.set_title(title, fontsize=8)
            if j == 0:
                m, g, a = labels.decompose(int(table.at[row, "label"]))
                axis.set_ylabel(f"{labels.MASK_NAMES[m]}\n{labels.GENDER_NAMES[g]} {labels.AGE_NAMES[a]}", fontsize=7)
    figure.suptitle(f"what the model is fed: {cfg['data']['crop']['mode']} crop at {cfg['data']['image_size']} (w x h), "
                    f"{draws} draws of the {engine} augmentation, TTA {tta}", fontsize=9)
    import io

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    folder = output_dir(cfg, "check")
    path, page = add_section(folder, "preview.png", buffer.getvalue(), "what the model is fed")
    print(f"[preview] {len(rows)} images x ({draws} {engine} draws + {len(tta)} TTA views): {path}; section in {page}")
    return {"png": str(path), "page": str(page), "engine": engine, "rows": rows}


if __name__ == "__main__":
    stage_main(run, "preview", _arguments)
