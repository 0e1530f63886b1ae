"""dataset_tool.py sources: transparent images composited onto white, and the fixed --heldout split by file name."""

import io
import json
import os
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])


def convert_one(tmp_path, image, *args):
    """Run dataset_tool.py on a folder holding just `image`; returns the written image as uint8 CHW."""
    (tmp_path / 'src').mkdir()
    image.save(tmp_path / 'src' / 'a.png')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', *args)
    assert result.exit_code == 0, result.output
    return ImageFolderDataset(str(tmp_path / 'out.zip'))[0][0]


def test_rgba_transparent_region_is_white_and_opaque_colours_exact(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)        # left half: fully transparent, stored colour black
    rgba[:, 4:] = (200, 30, 90, 255)            # right half: opaque
    rgba[7, 7] = (10, 100, 250, 128)            # one half-transparent pixel
    image = convert_one(tmp_path, PIL.Image.fromarray(rgba, 'RGBA'))
    assert image.shape == (3, 8, 8)
    assert (image[:, :, :4] == 255).all()
    assert (image[:, :7, 4:] == np.array([200, 30, 90])[:, None, None]).all() and (image[:, 7, 4:7] == [[200], [30], [90]]).all()
    assert image[:, 7, 7].tolist() == [132, 177, 252]  # 128/255 * c + 127/255 * 255, rounded, by hand
    a = 128 / 255
    assert np.abs(image[:, 7, 7] - np.round(a * np.array([10, 100, 250]) + (1 - a) * 255)).max() <= 1


def test_la_image_composites_onto_white_and_stays_grayscale(tmp_path):
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, 4:] = (77, 255)
    la[0, 0] = (0, 128)
    image = convert_one(tmp_path, PIL.Image.fromarray(la, 'LA'))
    assert image.shape == (1, 8, 8)
    assert image[0, 0, 0] == 127 and (image[0, 1:, :4] == 255).all() and (image[0, :, 4:] == 77).all()


def test_palette_image_with_transparency_composites_onto_white(tmp_path):
    indices = np.zeros((8, 8), np.uint8)
    indices[:, 4:] = 1
    image = PIL.Image.fromarray(indices, 'P')
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    image.info['transparency'] = 0              # index 0 (black) is transparent, as in Twemoji's palette PNGs
    out = convert_one(tmp_path, image)
    assert (out[:, :, :4] == 255).all() and (out[:, :, 4:] == np.array([12, 34, 56])[:, None, None]).all()


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_images_without_alpha_keep_their_pixels(tmp_path, mode):
    array = np.zeros((8, 8, 3) if mode == 'RGB' else (8, 8), np.uint8)
    array[:, 4:] = 90
    out = convert_one(tmp_path, PIL.Image.fromarray(array, mode))
    assert out.shape[0] == (3 if mode == 'RGB' else 1) and (out[:, :, :4] == 0).all() and (out[:, :, 4:] == 90).all()


def test_resizing_happens_after_compositing(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)      # transparent black | opaque red: no dark fringe at the edge
    rgba[:, 8:] = (255, 0, 0, 255)
    out = convert_one(tmp_path, PIL.Image.fromarray(rgba, 'RGBA'), '--resolution', '8x8')
    assert out.shape == (3, 8, 8) and out[0].min() >= 254 and (out[:, :, :2] >= 254).all()


def write_source(folder, indices):
    """Images whose pixels encode their index i, named in sub-folders, with label i % 5 in dataset.json."""
    names = [f'class{i % 3}/img{i:03d}.png' for i in indices]
    for i, name in zip(indices, names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((8, 8, 3), (i, 255 - i, 7), np.uint8)).save(folder / name)
    (folder / 'dataset.json').write_text(json.dumps({'labels': [[f'class{i % 3}/img{i:03d}.png', i % 5] for i in range(100)]}))
    return names


def read_output(path):
    """{source index: label} of a data set written by dataset_tool.py (a zip or a folder)."""
    if str(path).endswith('.zip'):
        archive = zipfile.ZipFile(path)
        read = archive.read
    else:
        read = lambda name: (path / name).read_bytes()  # noqa: E731
    labels = json.loads(read('dataset.json'))['labels']
    result = {}
    for name, label in labels:
        with PIL.Image.open(io.BytesIO(read(name))) as image:
            result[int(np.asarray(image)[0, 0, 0])] = label
    return result


def expected_heldout(names, percent):
    return {int(n[-7:-4]) for n in names if zlib.crc32(n.encode('utf-8')) % 10000 < percent * 100}


def split(tmp_path, src, tag, *args, percent=30):
    train, heldout = tmp_path / f'{tag}.zip', tmp_path / f'{tag}-heldout'
    result = run_tool('--source', src, '--dest', train, '--heldout', percent, '--heldout-dest', heldout, *args)
    assert result.exit_code == 0, result.output
    return read_output(train), read_output(heldout), result.output


def test_heldout_split_is_fixed_by_file_name(tmp_path):
    names = write_source(tmp_path / 'src', range(40))
    held = expected_heldout(names, 30)
    assert 0 < len(held) < 40
    train, heldout, output = split(tmp_path, tmp_path / 'src', 'a')
    assert set(heldout) == held and set(train) == set(range(40)) - held
    assert f'Wrote {40 - len(held)} images' in output and f'Wrote {len(held)} held-out images' in output
    assert all(label == i % 5 for part in (train, heldout) for i, label in part.items())

    capped_train, capped_heldout, _ = split(tmp_path, tmp_path / 'src', 'b', '--max-images', 5)
    assert capped_heldout == heldout and len(capped_train) == 5 and set(capped_train) <= set(train)

    more = write_source(tmp_path / 'src', range(40, 70))
    grown_train, grown_heldout, _ = split(tmp_path, tmp_path / 'src', 'c')
    assert set(grown_heldout) == held | expected_heldout(more, 30)
    assert set(grown_train) | set(grown_heldout) == set(range(70)) and not set(grown_train) & set(grown_heldout)
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_failure_in_heldout_part_leaves_neither_output(tmp_path):
    names = write_source(tmp_path / 'src', range(20))
    bad = sorted(expected_heldout(names, 30))[-1]
    (tmp_path / 'src' / f'class{bad % 3}/img{bad:03d}.png').write_bytes(b'not a png')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'a.zip', '--heldout', 30, '--heldout-dest', tmp_path / 'h.zip')
    assert result.exit_code == 1 and f'cannot read class{bad % 3}/img{bad:03d}.png' in result.output
    assert sorted(os.listdir(tmp_path)) == ['src']


@pytest.mark.parametrize('args, flag, message', [
    (['--heldout', '10'], '--heldout-dest', '--heldout=10 needs --heldout-dest'),
    (['--heldout-dest', 'h.zip'], '--heldout-dest', 'needs --heldout=PERCENT'),
    (['--heldout', '10', '--heldout-dest', 'x.zip'], '--heldout-dest', 'is also --dest'),
    (['--heldout', '100', '--heldout-dest', 'h.zip'], '--heldout', '0<x<100'),
    (['--source', 'demo:shapes', '--resolution', '16x16', '--heldout', '10', '--heldout-dest', 'h.zip'], '--heldout',
     'demo:shapes has its own held-out images'),
])
def test_heldout_bad_arguments(tmp_path, monkeypatch, args, flag, message):
    write_source(tmp_path / 'src', range(3))
    monkeypatch.chdir(tmp_path)
    source = [] if '--source' in args else ['--source', 'src']
    result = run_tool(*source, '--dest', 'x.zip', *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert f'Invalid value for {flag}:' in result.output.replace("'", ''), result.output
    assert sorted(os.listdir(tmp_path)) == ['src']


def test_heldout_that_leaves_a_part_empty_is_an_error(tmp_path):
    assert not expected_heldout(write_source(tmp_path / 'src', range(3)), 0.01)
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'x.zip', '--heldout', 0.01, '--heldout-dest', tmp_path / 'h.zip')
    assert result.exit_code == 1 and 'leaves no images for --heldout-dest' in result.output
