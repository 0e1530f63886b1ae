"""ImageFolderDataset and dataset_tool.py: round trips, options, and a clear error for each bad input."""

import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import DatasetError, ImageFolderDataset


def write_images(folder, arrays, labels=None, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f'sub/img{i:03d}.png' for i in range(len(arrays))]
    for name, array in zip(names, arrays):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(array).save(folder / name)
    if labels is not None:
        (folder / 'dataset.json').write_text(json.dumps({'labels': [[n, l] for n, l in zip(names, labels)]}))
    return names


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, list(args))


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(7)]
    labels = [3, 0, 1, 3, 2, 0, 1]
    write_images(tmp_path / 'src', arrays, labels)
    return tmp_path / 'src', arrays, labels


@pytest.mark.parametrize('dest_name', ['out.zip', 'outdir'])
def test_round_trip_is_bit_exact_with_labels(source, tmp_path, dest_name):
    src, arrays, labels = source
    dest = tmp_path / dest_name
    result = run_tool('--source', str(src), '--dest', str(dest))
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(str(dest), use_labels=True)
    assert len(ds) == 7 and ds.resolution == 16 and ds.num_channels == 3 and ds.label_dim == 4
    for i, (array, label) in enumerate(zip(arrays, labels)):
        image, onehot = ds[i]
        assert image.dtype == np.uint8 and image.shape == (3, 16, 16)
        np.testing.assert_array_equal(image, array.transpose(2, 0, 1))
        assert onehot.dtype == np.float32 and onehot.argmax() == label and onehot.sum() == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_xflip_max_size_cache_and_grayscale(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(5)]
    write_images(tmp_path / 'gray', arrays)
    ds = ImageFolderDataset(str(tmp_path / 'gray'), xflip=True, cache=True)
    assert ds.num_channels == 1 and len(ds) == 10 and ds.label_dim == 0 and ds[0][1].shape == (0,)
    for i in range(5):
        np.testing.assert_array_equal(ds[i][0][0], arrays[i])
        np.testing.assert_array_equal(ds[i + 5][0][0], arrays[i][:, ::-1])
    sub = ImageFolderDataset(str(tmp_path / 'gray'), max_size=3, random_seed=4)
    assert len(sub) == 3
    assert [sub[i][0].tobytes() for i in range(3)] == [ImageFolderDataset(str(tmp_path / 'gray'), max_size=3, random_seed=4)[i][0].tobytes() for i in range(3)]


def test_resize_and_center_crop(tmp_path):
    write_images(tmp_path / 'rect', [np.full((20, 40, 3), 200, np.uint8), np.full((30, 50, 3), 100, np.uint8)])
    result = run_tool('--source', str(tmp_path / 'rect'), '--dest', str(tmp_path / 'sq.zip'), '--resolution', '16x16', '--transform', 'center-crop')
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(str(tmp_path / 'sq.zip'))
    assert ds.resolution == 16 and len(ds) == 2 and ds[0][0].min() == 200
    result = run_tool('--source', str(tmp_path / 'rect'), '--dest', str(tmp_path / 'wide.zip'), '--resolution', '16x8', '--transform', 'center-crop-wide')
    assert result.exit_code == 0, result.output
    image = ImageFolderDataset(str(tmp_path / 'wide.zip'))[0][0]
    assert image.shape == (3, 16, 16) and image[:, :4].max() == 0 and image[:, 4:12].min() == 200 and image[:, 12:].max() == 0


def test_failed_conversion_leaves_nothing(tmp_path):
    write_images(tmp_path / 'src', [np.zeros((8, 8, 3), np.uint8)] * 3)
    (tmp_path / 'src' / 'sub' / 'img001.png').write_bytes(b'not a png')
    result = run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'out.zip'))
    assert result.exit_code == 1 and 'cannot read sub/img001.png' in result.output
    assert sorted(os.listdir(tmp_path)) == ['src']


@pytest.mark.parametrize('args, message', [
    (['--source', 'nowhere'], 'not a directory, a zip file or demo:shapes'),
    (['--source', 'demo:shapes', '--resolution', '32'], 'not of the form WxH'),
    (['--source', 'demo:circles', '--resolution', '32x32'], 'unknown demo set'),
    (['--source', 'demo:shapes'], 'give one, e.g. --resolution=16x16'),
    (['--source', 'demo:shapes', '--resolution', '32x16'], 'images must be square'),
])
def test_tool_bad_arguments(tmp_path, args, message):
    result = run_tool(*args, '--dest', str(tmp_path / 'x.zip'))
    assert result.exit_code == 2 and message in result.output


def test_tool_mixed_sizes_need_resolution(tmp_path):
    write_images(tmp_path / 'src', [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    result = run_tool('--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'x.zip'))
    assert result.exit_code == 1 and 'sub/img001.png: image is 16x16 but the first was 8x8' in result.output


def bad_source(tmp_path, kind):
    folder = tmp_path / kind
    if kind == 'empty':
        folder.mkdir()
    elif kind == 'nonsquare':
        write_images(folder, [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)])
    elif kind == 'mixed':
        write_images(folder, [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    elif kind == 'not-pow2':
        write_images(folder, [np.zeros((12, 12, 3), np.uint8)])
    elif kind == 'corrupt':
        write_images(folder, [np.zeros((8, 8, 3), np.uint8)] * 2)
        (folder / 'sub' / 'img001.png').write_bytes(b'\x89PNG garbage')
    elif kind.startswith('json'):
        names = write_images(folder, [np.zeros((8, 8, 3), np.uint8)] * 2)
        text = {'json-syntax': '{"labels": [', 'json-nolabels': '{"classes": []}',
                'json-entry': json.dumps({'labels': [[names[0]], [names[1], 1]]}),
                'json-missing': json.dumps({'labels': [[names[0], 1]]})}[kind]
        (folder / 'dataset.json').write_text(text)
    return str(folder)


@pytest.mark.parametrize('kind, message', [
    ('empty', 'contains no images'),
    ('not-pow2', 'resolution 12 is not a power of two'),
    ('json-syntax', 'dataset.json: not valid JSON'),
    ('json-nolabels', 'dataset.json: expected {"labels"'),
    ('json-entry', "dataset.json: malformed entry ['sub/img000.png']"),
    ('json-missing', 'dataset.json: no label for sub/img001.png'),
])
def test_bad_data_sets_give_clear_errors(tmp_path, kind, message):
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(bad_source(tmp_path, kind), use_labels=True)
    assert message in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('kind, message', [
    ('nonsquare', 'img001.png: image is 16x8 but sub/img000.png is 8x8'),
    ('mixed', 'img001.png: image is 16x16 but sub/img000.png is 8x8'),
    ('corrupt', 'img001.png: cannot decode image'),
])
def test_bad_images_after_the_first_are_found_when_decoded(tmp_path, kind, message):
    # Only the first image is decoded up front (tests/test_dataset_scale.py: mid-run, through the loader).
    ds = ImageFolderDataset(bad_source(tmp_path, kind))
    assert ds.resolution == 8
    with pytest.raises(DatasetError) as info:
        ds[1]
    assert message in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('kind, message', [
    ('nonsquare', 'img000.png: image is 16x8; images must be square'),
    ('corrupt', 'img000.png: cannot read image'),
])
def test_bad_first_image_is_found_up_front(tmp_path, kind, message):
    folder = tmp_path / kind
    if kind == 'nonsquare':
        write_images(folder, [np.zeros((8, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)])
    else:
        write_images(folder, [np.zeros((8, 8, 3), np.uint8)] * 2)
        (folder / 'sub' / 'img000.png').write_bytes(b'\x89PNG garbage')
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(str(folder))
    assert message in str(info.value) and '\n' not in str(info.value)


def test_corrupt_image_data_named_at_load_time(tmp_path):
    # A valid PNG header with truncated pixel data passes the header check and fails when decoded.
    names = write_images(tmp_path / 'trunc', [np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)] * 2)
    path = tmp_path / 'trunc' / names[1]
    path.write_bytes(path.read_bytes()[:200])
    ds = ImageFolderDataset(str(tmp_path / 'trunc'))
    with pytest.raises(DatasetError, match='img001.png: cannot decode image'):
        ds[1]


def test_not_a_zip_and_missing_path(tmp_path):
    (tmp_path / 'file.txt').write_text('hi')
    with pytest.raises(DatasetError, match='not a zip archive'):
        ImageFolderDataset(str(tmp_path / 'file.txt'))
    with pytest.raises(DatasetError, match='no such directory or zip file'):
        ImageFolderDataset(str(tmp_path / 'none.zip'))


def test_zip_dataset_survives_pickling_for_workers(source, tmp_path):
    import pickle
    src, arrays, _ = source
    run_tool('--source', str(src), '--dest', str(tmp_path / 'd.zip'))
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[3][0], arrays[3].transpose(2, 0, 1))
    assert zipfile.is_zipfile(tmp_path / 'd.zip')


def test_cache_is_shared_by_loader_workers(source, tmp_path):
    import torch
    src, arrays, _ = source
    run_tool('--source', str(src), '--dest', str(tmp_path / 'd.zip'))
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), cache=True)
    assert ds.cache is None  # allocated by prepare_cache (make_loader) or the first read, not at construction
    assert ds.prepare_cache()
    if ds.cache.kind != 'shm':
        pytest.skip('/dev/shm has too little room for a shared cache on this machine')
    assert not ds.cache.filled.any()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context='spawn')
    loaded = torch.cat([images for images, _labels in loader])
    # The workers decoded every image; their writes are visible here, in the parent, without decoding again.
    assert ds.cache.filled.all()
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(ds.cache.get(i), array.transpose(2, 0, 1))
        np.testing.assert_array_equal(loaded[i].numpy(), array.transpose(2, 0, 1))


@pytest.mark.parametrize('cache', [False, True])
def test_forked_loader_workers_read_zip_correctly(source, tmp_path, cache):
    # The parent has the zip open (shape check, a first read); forked workers must not share its file position.
    import torch
    src, arrays, _ = source
    run_tool('--source', str(src), '--dest', str(tmp_path / 'd.zip'))
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), cache=cache)
    ds[0]
    indices = list(range(len(arrays))) * 8
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=1, num_workers=2,
                                         multiprocessing_context='fork')
    for i, (image, _label) in zip(indices, loader):
        np.testing.assert_array_equal(image[0].numpy(), arrays[i].transpose(2, 0, 1))
