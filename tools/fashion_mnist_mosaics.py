#!/usr/bin/env python
"""Write Fashion-MNIST mosaics (distill/data/mosaics.py) as a segmentation dataset `distill eval segment` reads:

    DIR/images/00000.png   grey canvas
    DIR/masks/00000.png    class indices (0 background, 1 + Fashion-MNIST class; 255 is reserved for "ignore")
    DIR/classes.txt        the class names, index 0 first
    DIR/boxes.json         per mosaic: each item's class (0-9) and tight box (x0, y0, x1, y1), ends exclusive

    .venv/bin/python tools/fashion_mnist_mosaics.py --count 500 --split train --output .data/mosaics/train
    .venv/bin/python tools/fashion_mnist_mosaics.py --count 100 --split test --seed 1 --output .data/mosaics/val
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_mosaics(mosaics, output: Path) -> None:
    """Images, masks, classes.txt and boxes.json of Mosaics under `output`, each file written atomically."""
    import io

    from PIL import Image

    from distill.files import atomic_write, atomic_write_text

    def png(array) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array.numpy()).save(buffer, format="PNG")  # uint8 [H, W]: 8-bit grey
        return buffer.getvalue()

    digits = max(5, len(str(max(len(mosaics) - 1, 0))))
    for index in range(len(mosaics)):
        name = f"{index:0{digits}d}.png"
        for folder, array in (("images", mosaics.images[index]), ("masks", mosaics.masks[index])):
            data = png(array)
            atomic_write(output / folder / name, lambda handle: handle.write(data))
    atomic_write_text(output / "classes.txt", "\n".join(mosaics.classes) + "\n")
    boxes = [{"image": f"images/{index:0{digits}d}.png", "labels": mosaics.labels[index].tolist(),
              "boxes": mosaics.boxes[index].tolist()} for index in range(len(mosaics))]
    atomic_write_text(output / "boxes.json", json.dumps({"split": mosaics.split, "mosaics": boxes}) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, required=True, help="number of mosaics")
    parser.add_argument("--size", type=int, default=56, help="side of a mosaic in pixels (items are 28)")
    parser.add_argument("--items", type=int, nargs=2, default=(2, 4), metavar=("LEAST", "MOST"))
    parser.add_argument("--split", default="train", choices=("train", "test"), help="Fashion-MNIST split of the items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="folder to write into")
    args = parser.parse_args(argv)

    from distill.data.mosaics import make_mosaics
    from distill.errors import DistillError

    try:
        mosaics = make_mosaics(args.count, args.size, tuple(args.items), args.split, args.seed)
    except DistillError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_mosaics(mosaics, Path(args.output))
    print(f"{len(mosaics)} mosaics of {args.size} px from Fashion-MNIST {args.split} written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
