"""Snapshots of EDM, of the official Patch Diffusion code and of this project load without running code from the file.

The EDM-format pickles here are written by the test in EDM's layout (persistence format 6: a reduce to
torch_utils.persistence._reconstruct_persistent_obj with class name, module source and state) from this project's
networks, whose parameter names are EDM's; their stored module source is a stand-in that would leave a marker file
if it ran. docs/compatibility.md describes the check against pickles written by the references' own code.
"""

import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import networks
from training.loss import EDMLoss
from training.sampler import generate_images
from training.snapshot import SnapshotError, load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
TINY = dict(img_resolution=16, label_dim=0, use_fp16=False, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


def stand_in_source(marker: str) -> str:
    """Module source that leaves `marker` behind if anything executes it."""
    return f'open({marker!r}, "w").close()\nraise RuntimeError("the stored module source was executed")\n'


def edm_style_pickle(data: dict, net: torch.nn.Module, class_name: str, init_kwargs: dict, module_src: str) -> bytes:
    """`data` pickled as EDM's training loop writes it, every persistent module as a format-6 persistent object;
    `net` is recorded under `class_name` with `init_kwargs`, the other modules under their own class names."""
    class EDMPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, type) or not persistence.is_persistent(obj):
                return NotImplemented
            state = dict(obj.__getstate__())
            name = obj._orig_class_name
            if obj is net:
                name, state['_init_kwargs'] = class_name, dict(init_kwargs)
            meta = dict(type='class', version=6, module_src=module_src, class_name=name, state=state)
            return persistence._reconstruct_persistent_obj, (meta,)

    stream = io.BytesIO()
    EDMPickler(stream).dump(data)
    return stream.getvalue()


def snapshot_data(net: torch.nn.Module) -> dict:
    return dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset'))


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def outputs(net, pos_channels: int, labels: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn([2, net.img_channels, 16, 16], generator=g)
    x_pos = torch.rand([2, pos_channels, 16, 16], generator=g) * 2 - 1 if pos_channels else None
    return net(x, torch.tensor([0.3, 4.0]), x_pos, torch.eye(2) if labels else None)


EDM_CASES = {
    'EDMPrecond-SongUNet': ('EDMPrecond', dict(model_type='SongUNet')),
    'VPPrecond-SongUNet': ('VPPrecond', dict(model_type='SongUNet')),
    'VEPrecond-SongUNet': ('VEPrecond', dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual')),
    'EDMPrecond-DhariwalUNet': ('EDMPrecond', dict(model_type='DhariwalUNet', channel_mult=[1, 2], attn_resolutions=[8])),
}


@pytest.mark.parametrize('case', list(EDM_CASES))
def test_edm_pickle_loads_without_running_its_code_and_gives_the_same_outputs(tmp_path, case):
    class_name, extra = EDM_CASES[case]
    kwargs = dict(TINY, img_channels=3, **extra)
    net = randomised(getattr(networks, class_name)(**kwargs, pos_channels=0))
    marker = tmp_path / 'executed'
    (tmp_path / 'edm.pkl').write_bytes(edm_style_pickle(snapshot_data(net), net, class_name, kwargs, stand_in_source(str(marker))))
    loaded = load_network(str(tmp_path / 'edm.pkl'))
    assert not marker.exists()
    assert type(loaded) is getattr(networks, class_name) and loaded.pos_channels == 0 and loaded.img_channels == 3
    assert torch.equal(outputs(loaded, 0), outputs(net, 0))
    images = generate_images(loaded, [0, 1], torch.device('cpu'), num_steps=3)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8


def test_official_patch_pickle_splits_coordinates_out_of_img_channels(tmp_path):
    kwargs = dict(TINY, model_type='SongUNet')
    net = randomised(networks.EDMPrecond(**kwargs, img_channels=3, pos_channels=2))
    official_kwargs = dict(kwargs, img_channels=5, out_channels=3)  # the official training loop counts x and y in img_channels
    marker = tmp_path / 'executed'
    (tmp_path / 'patch.pkl').write_bytes(edm_style_pickle(snapshot_data(net), net, 'Patch_EDMPrecond', official_kwargs,
                                                          stand_in_source(str(marker))))
    loaded = load_network(str(tmp_path / 'patch.pkl'))
    assert not marker.exists()
    assert loaded.img_channels == 3 and loaded.pos_channels == 2
    assert torch.equal(outputs(loaded, 2), outputs(net, 2))
    images = generate_images(loaded, [0, 1], torch.device('cpu'), num_steps=3)  # whole-image coordinates at every step
    assert images.shape == (2, 3, 16, 16)


def test_generate_py_samples_from_an_edm_pickle(tmp_path):
    kwargs = dict(TINY, img_channels=3, model_type='SongUNet')
    net = randomised(networks.EDMPrecond(**kwargs, pos_channels=0))
    (tmp_path / 'edm.pkl').write_bytes(edm_style_pickle(snapshot_data(net), net, 'EDMPrecond', kwargs, stand_in_source(str(tmp_path / 'x'))))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'generate.py'), f'--network={tmp_path / "edm.pkl"}', '--seeds=0-1',
                           f'--outdir={tmp_path / "out"}', '--steps=3', '--device=cpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / 'out')) == ['000000.png', '000001.png'] and not (tmp_path / 'x').exists()


class CallsOsSystem:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('payload', ['os.system', 'eval', 'getattr'])
def test_a_pickle_that_names_another_global_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / 'executed'
    evil = {'os.system': CallsOsSystem(str(marker)),
            'eval': type('E', (), {'__reduce__': lambda self: (eval, (f'open({str(marker)!r}, "w")',))})(),
            'getattr': type('G', (), {'__reduce__': lambda self: (getattr, ('text', 'upper'))})()}[payload]
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(dict(ema=evil)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'generate.py'), f'--network={tmp_path / "evil.pkl"}', '--seeds=0',
                           f'--outdir={tmp_path / "out"}', '--device=cpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not marker.exists()
    assert 'Traceback' not in proc.stderr, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]  # click's usage lines, then one line of error
    assert message.startswith('Error: Invalid value for --network') and 'nothing from the file was run' in message
    assert {'os.system': 'system', 'eval': 'builtins.eval', 'getattr': 'builtins.getattr'}[payload] in message


def test_an_unknown_network_class_is_one_line_naming_it(tmp_path):
    kwargs = dict(TINY, img_channels=3, model_type='SongUNet')
    net = networks.EDMPrecond(**kwargs, pos_channels=0)
    (tmp_path / 'other.pkl').write_bytes(edm_style_pickle(snapshot_data(net), net, 'MyOwnPrecond', kwargs, 'pass'))
    with pytest.raises(SnapshotError, match='its network is a MyOwnPrecond') as err:
        load_network(str(tmp_path / 'other.pkl'))
    assert '\n' not in str(err.value) and 'other.pkl' in str(err.value)


def test_this_projects_pickles_from_before_the_change_still_load():
    """tests/data/own-format-1-7b00973.pkl was written by commit 7b00973 (the last to run code from pickles)."""
    loaded = load_network(os.path.join(DATA, 'own-format-1-7b00973.pkl'))
    expected = torch.load(os.path.join(DATA, 'own-format-1-7b00973-io.pt'))
    got = loaded(expected['x'], expected['sigma'], expected['x_pos'], expected['class_labels'])
    # The stored output was computed on another CPU, whose SIMD width and threads sum the 35 convolutions, 24 group
    # norms and the attention in another order. This output's float32 rounding error (against a float64 evaluation)
    # is 3.4e-7 at values of up to 2.4, and two CPUs' outputs differ by 4e-7 at most; 5e-6 leaves a factor of 12. A
    # loading fault is far above it: scaling any one weight tensor by 1 + 1e-3 moves the output by 1.4e-5 or more.
    torch.testing.assert_close(got, expected['out'], rtol=0, atol=5e-6)
    assert type(loaded).__module__ == 'training.networks' and loaded.label_dim == 2


def test_this_projects_new_pickles_load(tmp_path):
    from training.snapshot import save_network_snapshot
    net = randomised(networks.EDMPrecond(**dict(TINY, label_dim=2), img_channels=3))
    save_network_snapshot(str(tmp_path / 'net'), snapshot_data(net))
    assert torch.equal(outputs(load_network(str(tmp_path / 'net.pkl')), 2, labels=True), outputs(net, 2, labels=True))


def test_transfer_widens_the_input_convolutions_with_zeros():
    """An EDM network copied into a Patch Diffusion one computes the same whatever the coordinates, until trained."""
    from torch_utils.misc import copy_params_and_buffers
    for model in (dict(model_type='SongUNet', encoder_type='residual'), dict(model_type='DhariwalUNet')):
        edm = randomised(networks.EDMPrecond(**TINY, **model, img_channels=3, pos_channels=0))
        patch = networks.EDMPrecond(**TINY, **model, img_channels=3, pos_channels=2).eval()
        with pytest.raises(ValueError, match='does not match'):
            copy_params_and_buffers(edm, patch)
        copy_params_and_buffers(edm, patch, extra_inputs=2)
        g = torch.Generator().manual_seed(3)
        x, x_pos = torch.randn([2, 3, 16, 16], generator=g), torch.rand([2, 2, 16, 16], generator=g) * 2 - 1
        sigma = torch.tensor([0.3, 4.0])
        assert torch.equal(patch(x, sigma, x_pos), edm(x, sigma))


def test_train_py_transfers_from_an_edm_pickle(tmp_path):
    import training_helpers as h
    kwargs = dict(img_resolution=16, label_dim=0, use_fp16=False, model_type='SongUNet', embedding_type='positional',
                  encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                  model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.13, img_channels=3)
    net = randomised(networks.EDMPrecond(**kwargs, pos_channels=0))
    (tmp_path / 'edm.pkl').write_bytes(edm_style_pickle(snapshot_data(net), net, 'EDMPrecond', kwargs, stand_in_source(str(tmp_path / 'x'))))
    data = h.make_dataset(str(tmp_path / 'data.zip'))
    proc = h.run_train(f'--outdir={tmp_path / "run"}', f'--data={data}', *h.TINY, f'--transfer={tmp_path / "edm.pkl"}',
                       '--duration=0.00002', '--snap=1', '--dump=1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Transferring weights from' in proc.stdout and not (tmp_path / 'x').exists()


def test_a_training_state_that_would_run_code_is_refused(tmp_path):
    from training.snapshot import load_state
    marker = tmp_path / 'executed'
    torch.save(dict(net={}, ema={}, optimizer=CallsOsSystem(str(marker))), tmp_path / 'state.pt')
    with pytest.raises(SnapshotError) as err:
        load_state(str(tmp_path / 'state.pt'))
    assert 'names posix.system' in str(err.value) and '\n' not in str(err.value) and not marker.exists()


def test_a_weights_only_file_builds_only_this_projects_networks(tmp_path):
    marker = tmp_path / 'executed'
    torch.save(dict(class_name='subprocess.Popen', init_kwargs=dict(args=f'touch {marker}', shell=True), state_dict={}),
               tmp_path / 'evil.pt')
    with pytest.raises(SnapshotError, match="its class_name 'subprocess.Popen' is not one of this project's networks"):
        load_network(str(tmp_path / 'evil.pt'))
    assert not marker.exists()
