"""Draw docs/patches.png: a demo image, random patches of the three sizes, and their coordinate channels.

Run: python docs/make_figures.py
"""

import os
import sys

import PIL.Image
import PIL.ImageDraw
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training import demo_shapes  # noqa: E402
from training.patch import crop_at, random_positions  # noqa: E402

SCALE = 6   # screen pixels per image pixel
PAD = 12


def as_picture(array: torch.Tensor) -> PIL.Image.Image:
    """A [C, H, W] tensor in [-1, 1] (C = 1 or 3) as an enlarged PIL image."""
    pixels = ((array + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    pixels = pixels.expand(3, -1, -1) if len(pixels) == 1 else pixels
    image = PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return image.resize((image.width * SCALE, image.height * SCALE), PIL.Image.NEAREST)


def main() -> None:
    """Render the figure."""
    resolution = 32
    image = torch.from_numpy(demo_shapes.make_image(3, resolution)[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    generator = torch.Generator().manual_seed(1)
    rows, boxes = [], []
    for size, colour in ((resolution, None), (resolution // 2, 'red'), (resolution // 4, 'orange')):
        top, left = random_positions(1, resolution, size, generator=generator)
        patch, coords = crop_at(image, top, left, size)
        rows.append((size, colour, [as_picture(patch[0]), as_picture(coords[0, :1]), as_picture(coords[0, 1:])]))
        boxes.append((int(top), int(left), size, colour))

    cell = resolution * SCALE
    width = PAD + 3 * (cell + PAD)
    height = PAD + sum(size * SCALE + 3 * PAD for size, _, _ in rows)
    canvas = PIL.Image.new('RGB', (width, height), 'white')
    draw = PIL.ImageDraw.Draw(canvas)
    y = PAD
    for size, colour, pictures in rows:
        for k, (picture, title) in enumerate(zip(pictures, ['patch', 'x channel (column)', 'y channel (row)'])):
            x = PAD + k * (cell + PAD)
            draw.text((x, y), f'{title}, {size}x{size}' + (f' ({colour} box)' if colour and k == 0 else ''), fill='black')
            canvas.paste(picture, (x, y + 2 * PAD))
            if colour:
                draw.rectangle([x, y + 2 * PAD, x + picture.width - 1, y + 2 * PAD + picture.height - 1], outline=colour, width=2)
        y += size * SCALE + 3 * PAD
    for top, left, size, colour in boxes:  # where the smaller patches lie in the whole image
        if colour:
            x0, y0 = PAD + left * SCALE, 3 * PAD + top * SCALE
            draw.rectangle([x0, y0, x0 + size * SCALE - 1, y0 + size * SCALE - 1], outline=colour, width=2)
    path = os.path.join(ROOT, 'docs', 'patches.png')
    canvas.save(path)
    print(f'Wrote {path}')


if __name__ == '__main__':
    main()
