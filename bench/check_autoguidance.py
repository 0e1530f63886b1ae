"""Check autoguidance against NVlabs/edm2's own sampler: the same two EDM2 networks and seeds give the same uint8 images.

EDM2_SCRIPT runs in EDM2's checkout (a subprocess with the checkout on PYTHONPATH; its packages clash with ours). It
builds a main network and two guides with EDM2's Precond and the deterministic weights of bench/edm2_cases.py,
pickles each as EDM2's training loop does (EasyDict(encoder, dataset_kwargs, loss_fn, ema)), once with the float16
EMA that EDM2's training loop and reconstruct_phema.py write and once in float32, and samples with EDM2's
generate_images() from those pickle files (its edm_sampler, StackedRandomGenerator, random class labels and
encoder), in a one-process gloo group for its barriers. This process loads the pickles with
training.snapshot.load_network, samples with training.sampler.generate_images(guide=, guidance=) and counts the
uint8 values that differ: with the networks as loaded (in the pickle's dtype, as EDM2 samples a float16 EMA as it
is), and with the networks rebuilt from edm2_cases without any pickle, as the CI test tests/test_autoguidance.py
does against the images that --data stores.

  python bench/check_autoguidance.py --edm2=.baselines/edm2 --json=bench-out/autoguidance.json --data=tests/data/edm2-autoguidance.pt
"""

import json
import os
import platform
import sys
from typing import Dict, List, Optional

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import edm2_cases  # noqa: E402
from bench.check_references import git_commit, run_reference  # noqa: E402
from bench.common import write_json  # noqa: E402
from training.sampler import generate_images  # noqa: E402
from training.snapshot import load_network  # noqa: E402

NETWORKS = {  # name: EDM2 Precond arguments; the guides have the main network's images and classes, or no classes
    'main': dict(edm2_cases.TINY, img_channels=3, label_dim=4, model_channels=16, logvar_channels=16),
    'guide': dict(edm2_cases.TINY, img_channels=3, label_dim=4, model_channels=8, logvar_channels=8),
    'uncond': dict(edm2_cases.TINY, img_channels=3, label_dim=0, model_channels=8, logvar_channels=8),
}
SEEDS = [0, 1, 2, 7]
DTYPES = ['float16', 'float32']  # of the pickled EMA: EDM2 writes float16
WAYS = ['loaded', 'rebuilt']  # how this process gets the networks
MODES = {  # name: (guide network or None, class or None, edm_sampler settings as EDM2's generate_images takes them)
    'autoguidance': ('guide', None, dict(num_steps=8, guidance=2.0)),
    'autoguidance-weak': ('guide', None, dict(num_steps=8, guidance=0.4)),  # torch.lerp's other branch (weight < 0.5)
    'autoguidance-churn-class': ('guide', 1, dict(num_steps=8, guidance=1.7, S_churn=40, S_min=0.1, S_max=5, S_noise=1.003)),
    'unconditional-guide': ('uncond', None, dict(num_steps=6, guidance=1.4, rho=5)),  # EDM2's classifier-free guidance presets
    'no-guidance': (None, 3, dict(num_steps=8)),
}

EDM2_SCRIPT = r'''
import copy, json, pickle, sys
import torch
import dnnlib
from generate_images import generate_images
from training.encoders import StandardRGBEncoder
from training.networks_edm2 import Precond
from training.training_loop import EDM2Loss
outdir, networks, modes, seeds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
sys.path.insert(0, sys.argv[5])
import edm2_cases
torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)
for dtype in json.loads(sys.argv[6]):
    for name, kwargs in networks.items():
        net = edm2_cases.fill_deterministic(Precond(**kwargs)).eval().requires_grad_(False)
        data = dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip'),
                               loss_fn=EDM2Loss(), ema=copy.deepcopy(net).to(getattr(torch, dtype)))
        with open(f'{outdir}/{name}-{dtype}.pkl', 'wb') as f:
            pickle.dump(data, f)
    for mode, (guide, class_idx, settings) in modes.items():
        batches = generate_images(net=f'{outdir}/main-{dtype}.pkl', gnet=f'{outdir}/{guide}-{dtype}.pkl' if guide else None, seeds=seeds,
                                  class_idx=class_idx, max_batch_size=len(seeds), verbose=False, device=torch.device('cpu'), **settings)
        r = list(batches)[0]
        torch.save(dict(images=r.images, noise=r.noise, labels=r.labels), f'{outdir}/sample-{mode}-{dtype}.pt')
'''


def sample_ours(nets: Dict[str, torch.nn.Module], mode: str) -> torch.Tensor:
    """uint8 images of one MODES entry from this project's sampler, with `nets` as the main network and guides."""
    guide, class_idx, settings = MODES[mode]
    with torch.no_grad():
        return generate_images(nets['main'], SEEDS, torch.device('cpu'), class_idx=class_idx,
                               guide=nets[guide] if guide else None, **settings)


def rebuilt_networks(dtype: torch.dtype = torch.float32) -> Dict[str, torch.nn.Module]:
    """NETWORKS built here as EDM2Precond with edm2_cases' deterministic weights, without any pickle, in `dtype`."""
    from training.networks_edm2 import EDM2Precond
    return {name: edm2_cases.fill_deterministic(EDM2Precond(**kwargs)).eval().requires_grad_(False).to(dtype)
            for name, kwargs in NETWORKS.items()}


def count_differing(ours: torch.Tensor, theirs: torch.Tensor) -> Dict[str, int]:
    """How many uint8 values differ, and by how much at most."""
    diff = (ours.to(torch.int16) - theirs.to(torch.int16)).abs()
    return dict(differing=int((diff > 0).sum()), max_diff=int(diff.max()))


def compare(outdir: str) -> List[Dict]:
    """Per mode and pickle dtype: the uint8 values that differ from EDM2's, for each way of getting the networks here."""
    rows = []
    for dtype in DTYPES:
        loaded = {name: load_network(os.path.join(outdir, f'{name}-{dtype}.pkl')) for name in NETWORKS}
        ways = {'loaded': loaded, 'rebuilt': rebuilt_networks(getattr(torch, dtype))}
        for mode, (guide, class_idx, settings) in MODES.items():
            theirs = torch.load(os.path.join(outdir, f'sample-{mode}-{dtype}.pt'))['images']
            row = dict(mode=mode, pickle_dtype=dtype, guide=guide, class_idx=class_idx, settings=settings, values=theirs.numel())
            for way, nets in ways.items():
                row[way] = count_differing(sample_ours(nets, mode), theirs)
            rows.append(row)
    return rows


def write_data(outdir: str, path: str, commit: str) -> None:
    """EDM2's images of every mode and dtype, its noise and labels, and the networks' arguments, for tests/test_autoguidance.py."""
    samples = {(mode, dtype): torch.load(os.path.join(outdir, f'sample-{mode}-{dtype}.pt')) for mode in MODES for dtype in DTYPES}
    noise = samples[next(iter(samples))]['noise']
    assert all(torch.equal(sample['noise'], noise) for sample in samples.values())  # the same seeds throughout
    torch.save(dict(edm2_commit=commit, torch=str(torch.__version__), cpu=cpu_name(), networks=NETWORKS, seeds=SEEDS, modes=MODES,
                    noise=noise, labels={mode: samples[mode, DTYPES[0]]['labels'] for mode in MODES},
                    images={key: sample['images'] for key, sample in samples.items()}), path)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown'


@click.command()
@click.option('--edm2', 'edm2_dir', help='Checkout of NVlabs/edm2', metavar='DIR', required=True)
@click.option('--outdir', help='Where EDM2 writes its pickles and images', metavar='DIR', default='bench-out/autoguidance', show_default=True)
@click.option('--data', 'data_path', help='Also write EDM2\'s images and inputs here (the test data)', metavar='PATH')
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(edm2_dir: str, outdir: str, data_path: Optional[str], json_path: Optional[str]) -> None:
    """Sample the same networks and seeds with EDM2's sampler and ours; exits 1 if any uint8 value differs."""
    commit = git_commit(edm2_dir)
    print(f'edm2: {edm2_dir} at {commit}', flush=True)
    run_reference('edm2', edm2_dir, outdir, EDM2_SCRIPT,
                  [json.dumps(NETWORKS), json.dumps(MODES), json.dumps(SEEDS), os.path.join(ROOT, 'bench'), json.dumps(DTYPES)])
    rows = compare(outdir)
    print(f'\n| mode (seeds {",".join(map(str, SEEDS))}) | EDM2 pickle | guidance | differing uint8 values (max difference): loaded here | '
          'rebuilt (CI) |\n| --- | --- | --- | --- | --- |')
    for row in rows:
        cells = ' | '.join(f'{row[way]["differing"]} of {row["values"]} ({row[way]["max_diff"]})' for way in WAYS)
        print(f'| {row["mode"]} | {row["pickle_dtype"]} | {row["settings"].get("guidance", 1)} | {cells} |')
    if data_path:
        write_data(outdir, data_path, commit)
        print(f'wrote {data_path}')
    if json_path:
        write_json(json_path, dict(torch=torch.__version__, edm2_commit=commit, cpu=cpu_name(), modes=rows))
    if any(row[way]['differing'] for row in rows for way in WAYS):
        raise click.ClickException('autoguided images differ from EDM2\'s')


if __name__ == '__main__':
    main()
